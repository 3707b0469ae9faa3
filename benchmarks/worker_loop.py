"""The worker's batch loop in process: main-thread CPU per event over a synthetic backlog.

    python benchmarks/worker_loop.py [--events 300000] [--warmup 50000]
    FRESHREC_PURE_PYTHON=1 python benchmarks/worker_loop.py     # the same with the plain-Python modules

A fresh embedded Tansu broker on 127.0.0.1 gets ``--events`` synthetic events (the ingest benchmark's
stream: 50k users, 20k items, 4 partitions, 1 in 1000 malformed); one ``StreamWorker`` runs ``step`` in
this process (the CLI's GC thresholds) until it has applied them all, both stages included. After
``--warmup`` events, it measures the main thread's CPU time (``time.thread_time``: what a 50k events/s
target allows 20 µs of), the whole process's and the broker's, per event. Alternate runs of two builds
(compiled and ``FRESHREC_PURE_PYTHON=1``) to compare them on a shared box. Last line:
``worker_loop: build=... events=... main_cpu_us_per_event=... proc_cpu_us_per_event=... events_per_s=...
broker_cpu_us_per_event=...``
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.ingest import cpu_s  # noqa: E402
from streams import _compiled  # noqa: E402
from streams.broker import EmbeddedBroker, ensure_topics, free_port  # noqa: E402
from streams.config import Settings  # noqa: E402
from streams.producer import make_producer, produce_records, synthetic_events  # noqa: E402
from streams.worker import StreamWorker  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=300_000)
    ap.add_argument("--warmup", type=int, default=50_000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="freshrec-loop-"))
    broker = EmbeddedBroker(port=free_port(), log_path=str(tmp / "tansu.log")).start()
    try:
        settings = Settings(bootstrap_servers=broker.bootstrap, partitions=4, data_dir=str(tmp / "data"))
        ensure_topics(settings)
        now_us = int(time.time() * 1_000_000)
        records = synthetic_events(args.events, 50_000, 20_000, seed=1, start_us=now_us - 10**9, step_us=1,
                                   bad_every=1000)  # fmt: skip
        produce_records(make_producer(broker.bootstrap), settings.topics.events, records)
        gc.set_threshold(500_000, 20, 1_000)  # as `freshrec worker` (streams/cli.py)
        worker = StreamWorker(settings)
        worker.start()
        while worker.stats.events < args.warmup:
            worker.step()
        assert broker.pid is not None
        e0, b0 = worker.stats.events, cpu_s(broker.pid)
        t0, p0, w0 = time.thread_time(), time.process_time(), time.perf_counter()
        idle = 0
        while idle < 20:  # both stages done: 20 empty batches in a row
            idle = idle + 1 if worker.step() == 0 else 0
        main_s, proc_s, wall = time.thread_time() - t0, time.process_time() - p0, time.perf_counter() - w0
        n = worker.stats.events - e0
        broker_s = cpu_s(broker.pid) - b0
        worker.close()
        print(
            f"worker_loop: build={_compiled.build()} events={n} main_cpu_us_per_event={main_s / n * 1e6:.1f} "
            f"proc_cpu_us_per_event={proc_s / n * 1e6:.1f} events_per_s={n / wall:.0f} "
            f"broker_cpu_us_per_event={broker_s / n * 1e6:.1f}",
            flush=True,
        )
    finally:
        broker.stop()


if __name__ == "__main__":
    main()
