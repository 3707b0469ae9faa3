"""Ingest benchmark: the full stream worker against a raw confluent-kafka consumer, same run.

    python benchmarks/ingest.py [--events 600000] [--partitions 4]

Phases, all against a fresh embedded Tansu broker on 127.0.0.1:

1. Produce N synthetic events (1 in 1000 malformed) to ``events``.
2. Baseline: a plain confluent-kafka consumer reads the same topic -> raw events/s.
3. Throughput: a worker *process* (``freshrec worker``; features + embeddings,
   RocksDB, changelogs, DLQ) catches up on the backlog; events/s is measured from
   its first batch to the moment the item stage applied the last forward.
4. Freshness: events produced at about half the measured rate; freshness is the
   time from the record's produce timestamp to the end of the RocksDB write that
   made the item-stage update readable (both stages done), p50/p99.
5. Crash: more events at full speed; the worker is SIGKILLed mid-stream and
   restarted; afterwards every user's and item's counters are compared with the
   expected counts of all events ever produced: lost / duplicated.

Last line:
``ingest: events_per_s=... raw_consumer_events_per_s=... ratio=... freshness_p50_ms=... freshness_p99_ms=...
dlq=... lost=... duplicated=...``

``--impression-cpu`` runs another measurement instead: what the API's impression stream costs the
worker and the broker (the serving benchmark runs them on the same two cores as the API). Impressions
shaped like ``serving/impressions.py`` writes them (20-item slates over a 1M-item catalog: 15 items
uniform, 5 from a 200-item "trending" head; 10k users) are produced to ``impressions`` at ``--rate``
(one round every 50 ms, as the API's impression logger drains) for ``--seconds`` after a warm-up; the
worker's and the broker's CPU time (``/proc``) over the window,
until the worker applied the last forward, is divided by the impressions produced in it (the worker writes
its stats every 0.5 s here). Last line:
``impression_cpu: rate=... impressions=... worker_cpu_ms_per_impression=... broker_cpu_ms_per_impression=...
by_item_records_per_impression=... item_changelog_records_per_impression=... worker_batches_per_s=...``
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, cast

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition  # noqa: E402

from streams.broker import EmbeddedBroker, ensure_topics, free_port  # noqa: E402
from streams.codec import format_time  # noqa: E402
from streams.config import Settings  # noqa: E402
from streams.core import serde  # noqa: E402
from streams.producer import Record, make_producer, produce_records, synthetic_events  # noqa: E402
from streams.store import STATE_PREFIX, open_store  # noqa: E402


def expected_counts(records: list[Record]) -> tuple[Counter[str], Counter[str], int]:
    """Per-user event counts, per-item forward counts, number of malformed records."""
    users: Counter[str] = Counter()
    items: Counter[str] = Counter()
    bad = 0
    for r in records:
        try:
            obj = orjson.loads(r.value)
        except orjson.JSONDecodeError:
            bad += 1
            continue
        users[obj["user_id"]] += 1
        if obj["type"] == "impression":
            for i in obj["items"]:
                items[i] += 1
        else:
            items[obj["item_id"]] += 1
    return users, items, bad


def raw_consumer_rate(settings: Settings, n: int) -> float:
    """A plain confluent-kafka consumer reading the events topic from the beginning."""
    c = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": "raw-baseline",
                  "enable.auto.commit": False, "log_level": 3})  # fmt: skip
    c.assign([TopicPartition(settings.topics.events, p, OFFSET_BEGINNING) for p in range(settings.partitions)])
    got = 0
    t_first = None
    deadline = time.monotonic() + 120
    while got < n and time.monotonic() < deadline:
        msgs = c.consume(10000, 0.5)
        if msgs and t_first is None:
            t_first = time.perf_counter()
        for m in msgs:
            if m.error() is None:
                m.value()
                got += 1
    dt = time.perf_counter() - (t_first or time.perf_counter())
    c.close()
    if got < n:
        raise SystemExit(f"raw consumer read only {got} of {n}")
    return got / dt


def cycle_line(s: dict[str, Any]) -> str:
    """The worker's batches since its phase times were reset: records a batch, ms a batch in each phase,
    the loop thread's CPU a record, the longest batch and the collector's pauses."""
    n = int(s.get("window_batches") or 0)
    if not n:
        return "no batches"
    records = int(s["window_records"])
    phases: dict[str, float] = s["phase_s"]
    parts = " ".join(f"{k} {v * 1000 / n:.1f}" for k, v in phases.items())
    total = sum(phases.values()) * 1000 / n
    return (
        f"{n} batches of {records / n:,.0f} records; ms a batch: {parts} (sum {total:.1f}); loop thread "
        f"{float(s['window_cpu_s']) * 1e6 / max(1, records):.1f} us CPU a record; longest batch "
        f"{s['window_max_batch_ms']} ms; gc pauses {s['gc_runs']}, {float(s['gc_s']) * 1000:.0f} ms, longest "
        f"{s['gc_max_ms']} ms"
    )


#: the worker subprocesses this run started: killed when the run ends early (``_cleanup``)
_WORKERS: list[subprocess.Popen[bytes]] = []


def _cleanup_on_exit() -> None:
    """SIGTERM ends the run as an exception does: the ``finally`` blocks stop the broker and ``_cleanup``
    the workers (an interrupted run once left a Tansu and a worker running for an hour)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _cleanup() -> None:
    for proc in _WORKERS:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class WorkerProc:
    """A ``freshrec worker`` subprocess with a fast stats file."""

    def __init__(self, settings: Settings, stats: Path, stats_interval_s: float = 0.05) -> None:
        self.stats_path = stats
        env = {**os.environ, "FRESHREC_STATS_INTERVAL_S": str(stats_interval_s), "PYTHONUNBUFFERED": "1"}
        stats.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "worker", "--bootstrap-servers", settings.bootstrap_servers,
             "--partitions", str(settings.partitions), "--data-dir", settings.data_dir,
             "--stats-path", str(stats)],
            cwd=ROOT, env=env, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _WORKERS.append(self.proc)

    def stats(self) -> dict[str, object]:
        try:
            return dict(orjson.loads(self.stats_path.read_bytes()))
        except (FileNotFoundError, orjson.JSONDecodeError):
            return {}

    def wait(self, pred, timeout: float) -> dict[str, object]:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.stats()
            if s and pred(s):
                return s
            if self.proc.poll() is not None:
                raise SystemExit(f"worker exited with {self.proc.returncode}")
            time.sleep(0.02)
        raise SystemExit(f"timed out waiting for the worker; last stats {self.stats()}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


def read_store_counts(settings: Settings) -> tuple[Counter[str], Counter[str]]:
    """Sum of counters per user and per item, straight from the RocksDB shards."""
    users: Counter[str] = Counter()
    items: Counter[str] = Counter()
    for p in range(settings.partitions):
        st = open_store(settings.store_url, "user", p, read_only=True)
        for k, v in st.scan(STATE_PREFIX):
            users[k[1:].decode()] = sum(serde.decode_user(v).counts)
        st.close()
        st = open_store(settings.store_url, "item", p, read_only=True)
        for k, v in st.scan(STATE_PREFIX):
            items[k[1:].decode()] = sum(serde.decode_item(v).counts)
        st.close()
    return users, items


def diff(expected: Counter[str], actual: Counter[str]) -> tuple[int, int]:
    """(lost, duplicated) applications summed over keys."""
    lost = dup = 0
    for key in expected.keys() | actual.keys():
        d = actual.get(key, 0) - expected.get(key, 0)
        if d < 0:
            lost -= d
        else:
            dup += d
    return lost, dup


def count_dlq(settings: Settings) -> int:
    """Distinct source records in the DLQ topic (a crash may re-send a DLQ record)."""
    c = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": "dlq-count",
                  "enable.auto.commit": False, "log_level": 3})  # fmt: skip
    c.assign([TopicPartition(settings.topics.dlq, 0, OFFSET_BEGINNING)])
    sources = set()
    idle = 0
    while idle < 3:
        msgs = c.consume(10000, 0.5)
        idle = 0 if msgs else idle + 1
        for m in msgs:
            if m.error() is None:
                sources.add(dict(m.headers() or [])["source"])
    c.close()
    return len(sources)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (``/proc/<pid>/stat``, Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _impressions(n: int, seed: int, slate: int = 20, users: int = 10_000, items: int = 1_000_000) -> list[Record]:
    """Impression events as the API logs them (``serving/impressions.py``)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        user = f"u{rng.randrange(users)}"
        head = rng.sample(range(200), 5)
        picked = [f"i{j}" for j in head] + [f"i{rng.randrange(200, items)}" for _ in range(slate - 5)]
        ts = int(time.time() * 1_000_000)
        event = {
            "event_id": f"imp-s{seed}-{i}", "type": "impression", "user_id": user,
            "event_time": format_time(ts), "schema_version": 1, "request_id": f"s{seed}-{i}",
            "items": picked, "positions": list(range(slate)), "scores": [round(1.0 - k / 100, 6) for k in range(slate)],
            "sources": ["ann"] * slate, "fallback": False,
            "versions": {"model": "m0", "index": 1, "state_event_watermark_us": ts},
            "context": {"surface": "home"},
        }  # fmt: skip
        out.append(Record(user.encode(), orjson.dumps(event), ts))
    return out


def count_records(settings: Settings, topic: str) -> int:
    """Records in every partition of ``topic`` (read to the end: Tansu's high watermark is too low)."""
    c = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": f"count-{topic}",
                  "enable.auto.commit": False, "log_level": 3})  # fmt: skip
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(settings.partitions)])
    n, idle = 0, 0
    while idle < 3:
        msgs = c.consume(10000, 0.5)
        idle = 0 if msgs else idle + 1
        n += sum(1 for m in msgs if m.error() is None)
    c.close()
    return n


def _produce_like_the_api(producer: Any, topic: str, records: list[Record], rate: float) -> None:
    """``rate`` records/s in one round every 50 ms, as the API's impression logger drains its queue."""
    t0 = time.monotonic()
    sent = 0
    while sent < len(records):
        due = min(len(records), int((time.monotonic() - t0) * rate) + 1)
        for rec in records[sent:due]:
            producer.produce(topic, rec.value, rec.key)
        sent = max(sent, due)
        producer.poll(0)
        time.sleep(0.05)
    producer.flush(10)


def impression_cpu(args: argparse.Namespace) -> None:
    """The worker's and the broker's CPU per impression of an API-like impression stream."""
    tmp = Path(tempfile.mkdtemp(prefix="freshrec-impr-"))
    broker = EmbeddedBroker(port=free_port(), log_path=str(tmp / "tansu.log")).start()
    settings = Settings(bootstrap_servers=broker.bootstrap, partitions=args.partitions, data_dir=str(tmp / "data"))
    ensure_topics(settings)
    producer = make_producer(broker.bootstrap)
    topic = settings.topics.impressions
    try:
        # stats every 0.5 s, not every 50 ms: each write recomputes the freshness quantiles over up to 50k
        # samples (~1.6 ms): at 20 writes a second, ~24% of the worker's py-spy samples in this measurement
        worker = WorkerProc(settings, tmp / "stats.json", stats_interval_s=0.5)
        worker.wait(lambda s: True, 60)
        warm = _impressions(int(args.rate * 5), seed=11, slate=args.slate)
        _produce_like_the_api(producer, topic, warm, args.rate)
        worker.wait(lambda s: s["events"] >= len(warm) and s["item_records"] >= s["forwards"], 120)
        n = int(args.rate * args.seconds)
        records = _impressions(n, seed=12, slate=args.slate)
        assert broker._proc is not None
        steps0 = cast(int, worker.stats()["batches"])
        t0 = time.monotonic()
        w0, b0 = cpu_s(worker.proc.pid), cpu_s(broker._proc.pid)
        _produce_like_the_api(producer, topic, records, args.rate)
        final = worker.wait(lambda s: s["events"] >= len(warm) + n and s["item_records"] >= s["forwards"], 120)
        w1, b1 = cpu_s(worker.proc.pid), cpu_s(broker._proc.pid)
        steps_per_s = (cast(int, final["batches"]) - steps0) / (time.monotonic() - t0)
        worker.stop()
        total = len(warm) + n
        by_item = count_records(settings, settings.topics.by_item) / total
        item_cl = count_records(settings, settings.topics.item_changelog) / total
        print(
            f"impression_cpu: rate={args.rate:.0f} impressions={n} slate={args.slate} "
            f"worker_cpu_ms_per_impression={(w1 - w0) * 1000 / n:.3f} broker_cpu_ms_per_impression="
            f"{(b1 - b0) * 1000 / n:.3f} by_item_records_per_impression={by_item:.2f} "
            f"item_changelog_records_per_impression={item_cl:.2f} worker_batches_per_s={steps_per_s:.1f}"
        )
    finally:
        _cleanup()
        broker.stop()


def main() -> None:
    _cleanup_on_exit()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=600_000)
    ap.add_argument("--crash-events", type=int, default=200_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--users", type=int, default=50_000)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--fresh-seconds", type=float, default=10.0)
    ap.add_argument("--fresh-rate", type=float, default=0.0,
                    help="events/s of the freshness phase (default: half the measured rate); fix it to compare "
                         "settings or builds, whose measured rates differ")  # fmt: skip
    ap.add_argument("--impression-cpu", action="store_true", help="measure the CPU per impression instead")
    ap.add_argument("--rate", type=float, default=300.0, help="impressions/s (--impression-cpu)")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured window (--impression-cpu)")
    ap.add_argument("--slate", type=int, default=20, help="items per impression (--impression-cpu)")
    args = ap.parse_args()
    if args.impression_cpu:
        impression_cpu(args)
        return

    tmp = Path(tempfile.mkdtemp(prefix="freshrec-ingest-"))
    broker = EmbeddedBroker(port=free_port(), log_path=str(tmp / "tansu.log")).start()
    settings = Settings(bootstrap_servers=broker.bootstrap, partitions=args.partitions, data_dir=str(tmp / "data"))
    ensure_topics(settings)
    producer = make_producer(broker.bootstrap)
    all_records: list[Record] = []
    try:
        # 1. backlog
        now_us = int(time.time() * 1_000_000)
        backlog = list(synthetic_events(args.events, args.users, args.items, seed=1, start_us=now_us - 10**9,
                                        step_us=1, bad_every=1000))  # fmt: skip
        all_records += backlog
        t0 = time.perf_counter()
        produce_records(producer, settings.topics.events, iter(backlog))
        produce_s = time.perf_counter() - t0
        print(f"produced {len(backlog)} events in {produce_s:.1f}s ({len(backlog) / produce_s:,.0f}/s)", flush=True)
        _, exp_items_backlog, _ = expected_counts(backlog)
        n_forwards = sum(exp_items_backlog.values())

        # 2. raw consumer baseline
        raw = raw_consumer_rate(settings, len(backlog))
        print(f"raw consumer: {raw:,.0f} events/s", flush=True)

        # 3. worker throughput on the backlog
        worker = WorkerProc(settings, tmp / "stats.json")
        s = worker.wait(lambda s: s["events"] >= len(backlog) and s["item_records"] >= n_forwards, 600)
        rate = len(backlog) / (float(s["last_batch_at"]) - float(s["first_batch_at"]))  # type: ignore[arg-type]
        cpu_us = (float(s["last_batch_cpu_s"]) - float(s["first_batch_cpu_s"])) / len(backlog) * 1e6  # type: ignore[arg-type]
        print(f"worker: {rate:,.0f} events/s, loop thread {cpu_us:.1f} us CPU an event ({s})", flush=True)

        # 4. freshness at about half the sustained rate
        target = args.fresh_rate or max(1000.0, rate / 2)
        n_fresh = int(target * args.fresh_seconds)
        fresh = list(synthetic_events(n_fresh, args.users, args.items, seed=2,
                                      start_us=int(time.time() * 1_000_000), step_us=int(1e6 / target)))  # fmt: skip
        all_records += fresh
        _, exp_items_fresh, _ = expected_counts(fresh)
        worker.proc.send_signal(signal.SIGUSR1)  # reset the freshness samples
        time.sleep(0.3)
        produce_records(producer, settings.topics.events, iter(fresh), rate=target)
        ev_goal = len(backlog) + len(fresh)
        it_goal = n_forwards + sum(exp_items_fresh.values())
        s = worker.wait(lambda s: s["events"] >= ev_goal and s["item_records"] >= it_goal, 120)
        time.sleep(0.2)
        s = worker.stats()
        f50, f99 = s["item_fresh_p50_ms"], s["item_fresh_p99_ms"]
        u50, u99 = s["user_fresh_p50_ms"], s["user_fresh_p99_ms"]
        print(f"freshness at {target:,.0f} events/s: p50 {f50:.1f} ms p99 {f99:.1f} ms "
              f"(user stage p50 {u50:.1f} p99 {u99:.1f}; batches {s['batches']}, waits for own forwards "
              f"{s['forward_waits']}: {s['forward_wait_total_s']} s, {s['forward_wait_timeouts']} at the limit; "
              f"packs applied from their delivery reports {s['own_packs_inline']})",
              flush=True)  # fmt: skip
        print(f"live cycle: {cycle_line(s)}", flush=True)

        # 5. SIGKILL mid-stream, restart, check nothing lost or doubled
        crash = list(synthetic_events(args.crash_events, args.users, args.items, seed=3,
                                      start_us=int(time.time() * 1_000_000), step_us=1, bad_every=1000))  # fmt: skip
        all_records += crash
        feeder = threading.Thread(target=produce_records, args=(producer, settings.topics.events, iter(crash)))
        feeder.start()
        base = int(worker.stats()["events"])  # type: ignore[call-overload]
        worker.wait(lambda s: s["events"] >= base + args.crash_events // 3, 120)
        worker.kill()
        print("worker SIGKILLed mid-stream; restarting", flush=True)
        feeder.join()
        worker = WorkerProc(settings, tmp / "stats2.json")
        exp_users, exp_items, bad = expected_counts(all_records)
        total_forwards = sum(exp_items.values())

        # the restarted worker has fresh counters: wait until the stores hold every expected count
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            time.sleep(1.0)
            st = worker.stats()
            if st and int(st.get("batches", 0)) > 0 and st.get("idle_s", 0) and float(st["idle_s"]) > 1.0:  # type: ignore[arg-type,call-overload]
                break
        worker.stop()
        users, items = read_store_counts(settings)
        lost_u, dup_u = diff(exp_users, users)
        lost_i, dup_i = diff(exp_items, items)
        dlq = count_dlq(settings)
        print(f"after crash: users lost {lost_u} dup {dup_u}; items lost {lost_i} dup {dup_i}; "
              f"expected forwards {total_forwards}; dlq {dlq} (expected {bad})", flush=True)  # fmt: skip
        print(
            f"ingest: events_per_s={rate:.0f} raw_consumer_events_per_s={raw:.0f} ratio={rate / raw:.3f} "
            f"freshness_p50_ms={f50:.1f} freshness_p99_ms={f99:.1f} dlq={dlq} "
            f"lost={lost_u + lost_i} duplicated={dup_u + dup_i}"
        )
    finally:
        _cleanup()
        broker.stop()


if __name__ == "__main__":
    main()
