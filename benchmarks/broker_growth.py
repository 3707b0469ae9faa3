"""The embedded broker's CPU for a fixed live workload, as a function of the record batches it holds.

    python benchmarks/broker_growth.py [--steps 0 5000 20000 50000 100000] [--rate 200] [--seconds 5]

Tansu keeps its log in memory (``memory://`` storage), one stored object per produced record
batch, and nothing here expires or compacts them. This measures what that costs while the log
grows: a fresh broker, then for each step, fill a separate topic (``bulk``, 4 partitions) up to
that many one-record batches, and run the same live workload on a second topic (``live``): a
producer sends ``--rate`` records/s, one batch each (as a worker's flush per batch does), and a
tailing consumer (fetch wait 50 ms) reads them. The broker's CPU (``/proc``) over the window,
against the empty broker measured first in the same run, is the figure.

Last line: ``broker_growth: batches=<n,...> cpu_pct=<a,...> ratio_vs_empty=<r at the last step>``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from confluent_kafka import Consumer, Producer, TopicPartition  # noqa: E402
from confluent_kafka.admin import AdminClient, NewTopic  # noqa: E402

from benchmarks.ingest import cpu_s  # noqa: E402
from streams.broker import EmbeddedBroker, free_port  # noqa: E402

PARTITIONS = 4


def live_window(bootstrap: str, pid: int, producer: Producer, rate: float, seconds: float, group: str) -> float:
    """The broker's CPU (% of a core) while ``rate`` one-record batches/s are produced and tailed."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
         "fetch.wait.max.ms": 50, "log_level": 3}
    )  # fmt: skip
    consumer.assign([TopicPartition("live", p, -1) for p in range(PARTITIONS)])
    for _ in range(20):  # settle the assignment before the window
        consumer.poll(0.05)
    c0, t0 = cpu_s(pid), time.monotonic()
    n = 0
    while time.monotonic() - t0 < seconds:
        producer.produce("live", b"y" * 200, partition=n % PARTITIONS)
        producer.flush(10)  # one batch per record, as a worker's flush per batch
        n += 1
        consumer.poll(0.005)
        time.sleep(max(0.0, t0 + n / rate - time.monotonic()))
    used = cpu_s(pid) - c0
    consumer.close()
    return 100.0 * used / (time.monotonic() - t0)


def main() -> None:
    """Run the steps and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[0, 5000, 20000, 50000, 100000])
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    with EmbeddedBroker(port=free_port()) as broker:
        assert broker._proc is not None
        pid = broker._proc.pid
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        for fut in admin.create_topics([NewTopic("bulk", PARTITIONS, 1), NewTopic("live", PARTITIONS, 1)]).values():
            fut.result()
        # one record per batch: each produce is one stored batch
        producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 0, "batch.num.messages": 1})
        held = 0
        figures: list[tuple[int, float]] = []
        for step in sorted(args.steps):
            while held < step:
                for _ in range(min(500, step - held)):
                    producer.produce("bulk", b"x" * 200, partition=held % PARTITIONS)
                    held += 1
                producer.flush(60)
            time.sleep(1.0)
            pct = live_window(broker.bootstrap, pid, producer, args.rate, args.seconds, f"g{step}")
            figures.append((held, pct))
            print(f"{held:>7} batches held: broker {pct:5.1f}% of a core for {args.rate:.0f} batches/s", flush=True)
    base = figures[0][1]
    print(
        f"broker_growth: batches={','.join(str(b) for b, _ in figures)} "
        f"cpu_pct={','.join(f'{p:.1f}' for _, p in figures)} ratio_vs_empty={figures[-1][1] / base:.2f}"
    )


if __name__ == "__main__":
    main()
