"""The embedded broker's CPU for a live event stream, by the producer's linger.

    python benchmarks/broker_linger.py [--lingers 5 50] [--preload 600000] [--rate 16500] [--seconds 10]

Every record batch a producer sends is an object Tansu's memory storage keeps for good and lists on each
fetch of its partition (docs/ARCHITECTURE.md, "Tansu quirks"), so a producer's ``linger.ms`` sets what a
live stream costs the broker. For each linger, on a fresh broker: ``--preload`` events of the ingest
benchmark's stream (50k users, 20k items, 4 partitions) are produced as fast as they go (as the ingest
benchmark's backlog), then one tailing consumer (fetch wait 50 ms, from the end) reads while a producer with
that linger sends ``--rate`` events/s of the same stream for ``--seconds``. The broker's CPU over that window
(``/proc``) is the figure; the first linger is the baseline of the ratio. Last line:
``broker_linger: lingers=<a,b,...> cpu_pct=<x,y,...> ratio_last_vs_first=<r>``
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from confluent_kafka import OFFSET_END, Consumer, TopicPartition  # noqa: E402

from benchmarks.ingest import cpu_s  # noqa: E402
from streams.broker import EmbeddedBroker, ensure_topics, free_port  # noqa: E402
from streams.config import Settings  # noqa: E402
from streams.producer import make_producer, produce_records, synthetic_events  # noqa: E402


def window(linger_ms: int, preload: int, rate: float, seconds: float) -> tuple[float, int, int]:
    """(broker CPU % of a core, events produced, events the tailing consumer read) for one linger."""
    with EmbeddedBroker(port=free_port()) as broker:
        pid = broker.pid
        assert pid is not None
        settings = Settings(bootstrap_servers=broker.bootstrap, partitions=4)
        ensure_topics(settings)
        topic = settings.topics.events
        now_us = int(time.time() * 1_000_000)
        if preload:
            bulk = make_producer(broker.bootstrap, linger_ms)
            produce_records(bulk, topic, synthetic_events(preload, 50_000, 20_000, seed=1, start_us=now_us - 10**9,
                                                           step_us=1))  # fmt: skip
            bulk.flush(60)
        stop = threading.Event()
        got = [0]

        def tail() -> None:
            c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "tail", "enable.auto.commit": False,
                          "fetch.wait.max.ms": 50, "log_level": 3})  # fmt: skip
            c.assign([TopicPartition(topic, p, OFFSET_END) for p in range(settings.partitions)])
            while not stop.is_set():
                got[0] += len(c.consume(5000, 0.05))
            c.close()

        reader = threading.Thread(target=tail)
        reader.start()
        time.sleep(2.0)  # the assignment settles at the end of the log
        producer = make_producer(broker.bootstrap, linger_ms)
        live = synthetic_events(int(rate * seconds), 50_000, 20_000, seed=2, start_us=now_us, step_us=int(1e6 / rate))
        c0, t0 = cpu_s(pid), time.monotonic()
        n = produce_records(producer, topic, live, rate=rate)
        producer.flush(30)
        time.sleep(0.5)
        pct = 100.0 * (cpu_s(pid) - c0) / (time.monotonic() - t0)
        stop.set()
        reader.join()
        return pct, n, got[0]


def main() -> None:
    """Run one window per linger and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lingers", type=int, nargs="+", default=[5, 50])
    ap.add_argument("--preload", type=int, default=600_000)
    ap.add_argument("--rate", type=float, default=16_500.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    figures: list[float] = []
    for linger in args.lingers:
        pct, n, got = window(linger, args.preload, args.rate, args.seconds)
        figures.append(pct)
        print(f"linger {linger:>4} ms: broker {pct:5.1f}% of a core for {n:,} events at {args.rate:,.0f}/s "
              f"after {args.preload:,} preloaded (tail read {got:,})", flush=True)  # fmt: skip
    print(
        f"broker_linger: lingers={','.join(map(str, args.lingers))} cpu_pct={','.join(f'{p:.1f}' for p in figures)} "
        f"ratio_last_vs_first={figures[-1] / figures[0]:.2f}"
    )


if __name__ == "__main__":
    main()
