"""The worker's batch loop under callgrind: instructions per event, repeatable on a shared box.

    python benchmarks/worker_instructions.py [--events 30000] [--warmup 170000]
    FRESHREC_PURE_PYTHON=1 python benchmarks/worker_instructions.py    # the plain-Python modules

Wall and CPU times on these shared machines move by 30% within an hour (BENCHMARKS.md), so a change of a few
percent in the worker's per-event cost cannot be seen in ``ingest.py`` or ``worker_loop.py``. Instruction
counts can: callgrind counts the same instructions for the same input whatever else the box runs.

The script re-runs itself under ``valgrind --tool=callgrind`` with instrumentation off. It applies
``--warmup`` synthetic events (the ingest benchmark's stream: 50k users, 20k items, 4 partitions, 1 in 1000
malformed; warm-up so that states, caches and the item replica look like the middle of an ingest run, not
its cold start), produces ``--events`` more of the same stream, turns instrumentation on, runs
``StreamWorker.step`` until both stages have applied them, and turns it off. Last line:
``worker_instructions: build=... events=... main_instructions_per_event=... all_threads_instructions_per_event=...``
(main: the loop's own thread, what a 50k events/s target allows ~70k instructions of on these 3 GHz cores;
all threads: librdkafka's too). The figures vary by about 1% between runs (the batches' composition depends
on fetch timing). It needs valgrind and takes 2-5 minutes.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_INNER = "FRESHREC_CALLGRIND_INNER"


def _control(flag: str) -> None:
    subprocess.run(["callgrind_control", "-i", flag, str(os.getpid())], check=True, capture_output=True)


def _inner(events: int, warmup: int) -> None:
    """The measured run (inside valgrind): prints ``events=N`` for the outer process."""
    from streams import _compiled
    from streams.broker import EmbeddedBroker, ensure_topics, free_port
    from streams.config import Settings
    from streams.producer import make_producer, produce_records, synthetic_events
    from streams.worker import StreamWorker

    tmp = Path(tempfile.mkdtemp(prefix="freshrec-instr-"))
    broker = EmbeddedBroker(port=free_port(), log_path=str(tmp / "tansu.log")).start()
    try:
        settings = Settings(bootstrap_servers=broker.bootstrap, partitions=4, data_dir=str(tmp / "data"))
        ensure_topics(settings)
        producer = make_producer(broker.bootstrap)
        now_us = int(time.time() * 1_000_000)
        stream = iter(synthetic_events(warmup + events, 50_000, 20_000, seed=1, start_us=now_us - 10**9, step_us=1,
                                       bad_every=1000))  # fmt: skip
        produce_records(producer, settings.topics.events, itertools.islice(stream, warmup))
        gc.set_threshold(500_000, 20, 1_000)  # as `freshrec worker` (streams/cli.py)
        worker = StreamWorker(settings)
        worker.start()

        def drain(until: int) -> None:
            while worker.stats.events < until:
                worker.step()
            idle = 0
            while idle < 20:  # both stages done: 20 empty batches in a row
                idle = idle + 1 if worker.step() == 0 else 0

        drain(warmup)
        produce_records(producer, settings.topics.events, stream)
        e0 = worker.stats.events
        _control("on")
        drain(e0 + events)
        _control("off")
        print(f"build={_compiled.build()} events={worker.stats.events - e0}", flush=True)
        worker.close()
    finally:
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _totals(path: Path) -> int:
    """A callgrind file's event total (its ``totals:`` line; ``summary:`` may be 0 when collection was toggled)."""
    found = {}
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            found[line.split(":")[0]] = int(line.split()[1])
    return found.get("totals", found.get("summary", 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=30_000)
    ap.add_argument("--warmup", type=int, default=170_000)
    ap.add_argument("--keep", metavar="DIR", help="keep the callgrind files here (callgrind_annotate reads them)")
    args = ap.parse_args()
    if os.environ.get(_INNER):
        _inner(args.events, args.warmup)
        return
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("needs valgrind (Debian: apt-get install valgrind)")
    out_dir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="freshrec-callgrind-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
        f"--callgrind-out-file={out_dir}/callgrind.out", sys.executable, __file__,
        "--events", str(args.events), "--warmup", str(args.warmup),
    ]  # fmt: skip
    run = subprocess.run(cmd, env={**os.environ, _INNER: "1"}, capture_output=True, text=True)
    found = re.search(r"build=(\S+) events=(\d+)", run.stdout)
    if run.returncode != 0 or found is None:
        sys.stderr.write(run.stdout[-4000:] + run.stderr[-4000:])
        raise SystemExit(f"the run under valgrind failed (exit {run.returncode})")
    build, n = found.group(1), int(found.group(2))
    files = sorted(f for f in out_dir.glob("callgrind.out-*") if re.search(r"-\d+$", f.name))
    main_file = next(f for f in files if re.search(r"-0*1$", f.name))  # thread 1: the main thread
    main_ir = _totals(main_file)
    all_ir = sum(_totals(f) for f in files)
    if args.keep:
        print(f"callgrind files: {out_dir}")
    else:
        shutil.rmtree(out_dir, ignore_errors=True)
    print(
        f"worker_instructions: build={build} events={n} main_instructions_per_event={main_ir / n:.0f} "
        f"all_threads_instructions_per_event={all_ir / n:.0f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
