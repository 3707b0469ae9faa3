"""The embedded broker's CPU for a fixed live workload, as a function of the record batches it holds.

    python benchmarks/broker_growth.py [--steps 0 2000 5000 10000] [--rate 200] [--seconds 5]

Tansu keeps its log in memory (``memory://`` storage), one stored object per produced record
batch, and nothing here expires or compacts them. Its Fetch finds a partition's batches by listing
every object stored for that partition (tansu-storage ``dynostore.rs``), so what should cost is
what the *fetched* partitions hold, not what the whole broker holds. This measures both, on a fresh
broker: for each step, a new topic (4 partitions) is filled with that many one-record batches, then
the same live workload runs twice, on that filled topic and on a new empty topic (while everything
filled so far stays held elsewhere): a producer sends ``--rate`` records/s, one batch each (as a
worker's flush per batch does), and a tailing consumer (fetch wait 50 ms) reads them. The broker's
CPU (``/proc``) over each window is the figure; the empty broker's window, measured first, is the
baseline.

Last line: ``broker_growth: batches=<n,...> filled_topic_cpu_pct=<a,...> empty_topic_cpu_pct=<b,...>
held_elsewhere=<n,...> ratio_filled_vs_empty=<r at the last step>``
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


def live_window(bootstrap: str, pid: int, producer: Producer, topic: str, rate: float, seconds: float) -> float:
    """The broker's CPU (% of a core) while ``rate`` one-record batches/s are produced to and tailed from ``topic``."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"g-{topic}", "enable.auto.commit": False,
         "fetch.wait.max.ms": 50, "log_level": 3}
    )  # fmt: skip
    consumer.assign([TopicPartition(topic, p, -1) for p in range(PARTITIONS)])
    for _ in range(20):  # settle the assignment before the window
        consumer.poll(0.05)
    c0, t0 = cpu_s(pid), time.monotonic()
    n = 0
    while time.monotonic() - t0 < seconds:
        producer.produce(topic, b"y" * 200, partition=n % PARTITIONS)
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
    ap.add_argument("--steps", type=int, nargs="+", default=[0, 2000, 5000, 10000])
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    with EmbeddedBroker(port=free_port()) as broker:
        pid = broker.pid
        assert pid is not None
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        # one record per batch: each produce is one stored batch
        producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 0, "batch.num.messages": 1})
        held = 0  # batches stored in the broker before the step's windows
        rows: list[tuple[int, int, float, float]] = []
        for i, step in enumerate(sorted(args.steps)):
            filled, empty = f"filled-{i}", f"empty-{i}"
            for fut in admin.create_topics([NewTopic(t, PARTITIONS, 1) for t in (filled, empty)]).values():
                fut.result()
            elsewhere = held
            for n in range(step):
                producer.produce(filled, b"x" * 200, partition=n % PARTITIONS)
                if n % 500 == 499:
                    producer.flush(60)
            producer.flush(60)
            held += step
            time.sleep(1.0)
            pct_filled = live_window(broker.bootstrap, pid, producer, filled, args.rate, args.seconds)
            pct_empty = live_window(broker.bootstrap, pid, producer, empty, args.rate, args.seconds)
            held += 2 * int(args.rate * args.seconds)
            rows.append((step, elsewhere, pct_filled, pct_empty))
            print(f"{step:>6} batches in the fetched topic: broker {pct_filled:5.1f}% of a core; an empty topic while "
                  f"{elsewhere + step} are held elsewhere: {pct_empty:5.1f}%", flush=True)  # fmt: skip
    print(
        f"broker_growth: batches={','.join(str(r[0]) for r in rows)} "
        f"filled_topic_cpu_pct={','.join(f'{r[2]:.1f}' for r in rows)} "
        f"empty_topic_cpu_pct={','.join(f'{r[3]:.1f}' for r in rows)} "
        f"held_elsewhere={','.join(str(r[1] + r[0]) for r in rows)} "
        f"ratio_filled_vs_empty={rows[-1][2] / rows[-1][3]:.2f}"
    )


if __name__ == "__main__":
    main()
