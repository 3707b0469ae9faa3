"""Freshness of a live stream at a fixed rate: the worker's batches, waits and flushes, in process.

    python benchmarks/freshness.py [--rate 8000] [--seconds 10]
    FRESHREC_FORWARD_WAIT_S=0 python benchmarks/freshness.py     # forwards wait for the next batch

A fresh embedded Tansu broker on 127.0.0.1; ``freshrec produce --synthetic`` (a subprocess, the ingest
benchmark's stream: 50k users, 20k items, 4 partitions) produces at ``--rate`` events/s; one
``StreamWorker`` runs ``step`` in this process (the CLI's GC thresholds). After 3 s of warm-up it
measures, over ``--seconds``: batches, the cycle (wall time per batch), the CPU share of the main thread
and of the broker, the time per batch in the producers' ``flush``, in ``consume`` and in the wait for a
batch's own forwards (its item stage included), and the
freshness (record time to the commit that makes the update readable) of the user and the item stage.
``benchmarks/ingest.py`` reports the item figure at half its measured rate; this one fixes the rate,
so that settings compare at the same load. Last line:
``freshness: forward_wait_s=... rate=... batches=... cycle_ms=... main_cpu_share=... broker_cpu_share=...
flush_ms_per_batch=... consume_ms_per_batch=... forward_wait_ms_per_batch=... user_p50_ms=... user_p99_ms=...
item_p50_ms=... item_p99_ms=...``
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.ingest import cpu_s  # noqa: E402
from streams.broker import EmbeddedBroker, ensure_topics, free_port  # noqa: E402
from streams.config import Settings  # noqa: E402
from streams.worker import StreamWorker  # noqa: E402


class _Timed:
    """A worker's Kafka client, timing one method (``flush``: waits for the broker's acks; ``consume``)."""

    def __init__(self, real: Any, method: str) -> None:
        self._real = real
        self.seconds = 0.0
        timed = getattr(real, method)

        def call(*args: Any) -> Any:
            t = time.perf_counter()
            try:
                return timed(*args)
            finally:
                self.seconds += time.perf_counter() - t

        setattr(self, method, call)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=8000.0, help="events/s produced")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured window")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="freshrec-fresh-"))
    broker = EmbeddedBroker(port=free_port(), log_path=str(tmp / "tansu.log")).start()
    feeder = None
    try:
        settings = Settings(bootstrap_servers=broker.bootstrap, partitions=4, data_dir=str(tmp / "data"))
        ensure_topics(settings)
        gc.set_threshold(500_000, 20, 1_000)  # as `freshrec worker` (streams/cli.py)
        worker = StreamWorker(settings)
        worker.start()
        while not worker.assigned.is_set():
            worker.step()
        # both producers' flushes: the state records' and the forward packs'
        timed = _Timed(worker._producer, "flush")
        timed_packs = _Timed(worker._pack_producer, "flush")
        consume = _Timed(worker._consumer, "consume")
        worker._producer, worker._pack_producer, worker._consumer = timed, timed_packs, consume  # type: ignore[assignment]  # duck-typed wrappers
        n = int(args.rate * (args.seconds + 5))
        feeder = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "produce", "--bootstrap-servers", broker.bootstrap,
             "--partitions", "4", "--synthetic", str(n), "--users", "50000", "--items", "20000",
             "--rate", str(args.rate)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        warm_until = time.monotonic() + 3.0
        while time.monotonic() < warm_until:
            worker.step()
        st = worker.stats
        st.reset_freshness()
        b0, w0, k0 = st.batches, st.forward_wait_total_s, consume.seconds
        f0 = timed.seconds + timed_packs.seconds
        assert broker.pid is not None
        bc0 = cpu_s(broker.pid)
        c0, t0 = time.thread_time(), time.monotonic()
        while time.monotonic() < t0 + args.seconds:
            worker.step()
        wall, cpu = time.monotonic() - t0, time.thread_time() - c0
        broker_cpu = cpu_s(broker.pid) - bc0
        batches = max(1, st.batches - b0)
        snap = st.snapshot()
        worker.close()
        print(
            f"freshness: forward_wait_s={settings.forward_wait_s} rate={args.rate:.0f} batches={batches} "
            f"cycle_ms={1000 * wall / batches:.1f} main_cpu_share={cpu / wall:.2f} "
            f"broker_cpu_share={broker_cpu / wall:.2f} "
            f"flush_ms_per_batch={1000 * (timed.seconds + timed_packs.seconds - f0) / batches:.1f} "
            f"consume_ms_per_batch={1000 * (consume.seconds - k0) / batches:.1f} "
            f"forward_wait_ms_per_batch={1000 * (st.forward_wait_total_s - w0) / batches:.1f} "
            f"user_p50_ms={snap['user_fresh_p50_ms']:.1f} user_p99_ms={snap['user_fresh_p99_ms']:.1f} "
            f"item_p50_ms={snap['item_fresh_p50_ms']:.1f} item_p99_ms={snap['item_fresh_p99_ms']:.1f}",
            flush=True,
        )
    finally:
        if feeder is not None:
            feeder.kill()
        broker.stop()


if __name__ == "__main__":
    main()
