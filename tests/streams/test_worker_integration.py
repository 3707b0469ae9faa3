"""The stream worker against a real Tansu broker and real RocksDB shards."""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import cast

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition

from streams import codec
from streams.broker import ensure_topics, free_port
from streams.config import Settings
from streams.core import serde
from streams.core.partition import partition_for
from streams.core.state import FORWARD_SLOTS, Forward
from streams.errors import StateMismatch
from streams.events import EventType
from streams.producer import add_arguments, make_producer, produce_records, run_produce, synthetic_events
from streams.store import STATE_PREFIX, open_store
from streams.worker import StreamWorker

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _event(i: int, user: str, item: str, etype: str = "click") -> bytes:
    return orjson.dumps({"event_id": f"e{i}", "type": etype, "user_id": user, "item_id": item,
                         "event_time": "2026-11-22T10:00:00Z", "schema_version": 1})  # fmt: skip


def _produce_clicks(producer: Producer, s: Settings, ids: range, users: int, items: int) -> None:
    """Clicks ``e<i>`` by user ``u<i % users>`` on item ``i<i % items>``, keyed by user, flushed."""
    for i in ids:
        producer.produce(s.topics.events, _event(i, f"u{i % users}", f"i{i % items}"), f"u{i % users}".encode())
    producer.flush(10)


def _read_all(settings: Settings, topic: str, partitions: int) -> list[Message]:
    c = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": "t-reader", "log_level": 3,
                  "enable.auto.commit": False})  # fmt: skip
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    out, idle = [], 0
    while idle < 4:
        msgs = [m for m in c.consume(1000, 0.5) if m.error() is None]
        idle = 0 if msgs else idle + 1
        out.extend(msgs)
    c.close()
    return out


def _user_counts(settings: Settings) -> Counter[str]:
    counts: Counter[str] = Counter()
    for p in range(settings.partitions):
        st = open_store(settings.store_url, "user", p, read_only=True)
        for k, v in st.scan(STATE_PREFIX):
            counts[k[1:].decode()] = sum(serde.decode_user(v).counts)
        st.close()
    return counts


def _step_until(worker: StreamWorker, done: Callable[[], bool], timeout: float = 60) -> None:
    """Step ``worker`` in this thread until ``done()``."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, worker.stats.snapshot()
        worker.step()


def _run_until(worker: StreamWorker, pred, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    try:
        while not pred():
            assert time.monotonic() < deadline, f"timed out; stats {worker.stats.snapshot()}"
            assert thread.is_alive(), "worker thread died"
            time.sleep(0.05)
    finally:
        worker.stop()
        thread.join(30)


def test_bad_events_go_to_the_dlq_and_duplicates_count_once(live_settings: Settings) -> None:
    s = live_settings
    ensure_topics(s)
    producer = make_producer(s.bootstrap_servers)
    good = [_event(i, f"u{i % 4}", f"i{i % 3}") for i in range(20)]
    bad = [b"{nope", orjson.dumps({"event_id": "x", "type": "click"}), _event(99, "u1", "i1", "teleport")]
    for value in good + [good[3], good[7]] + bad:  # two redelivered (duplicate) events
        producer.produce(s.topics.events, value, b"u1")
    producer.flush()
    worker = StreamWorker(s)
    _run_until(worker, lambda: worker.stats.events >= 25 and worker.stats.item_records >= 20)
    assert worker.stats.dlq == 3 and worker.stats.duplicates == 2
    assert _user_counts(s) == Counter({"u0": 5, "u1": 5, "u2": 5, "u3": 5})
    dlq = _read_all(s, s.topics.dlq, 1)
    reasons = sorted(cast(bytes, dict(m.headers() or [])["reason"]).decode() for m in dlq)
    assert reasons == ["bad_json", "missing_field", "unknown_type"]
    assert {m.value() for m in dlq} == set(bad)  # the original bytes


def test_murmur2_matches_the_client_partitioner(live_settings: Settings) -> None:
    s = live_settings
    ensure_topics(s)
    producer = make_producer(s.bootstrap_servers)
    seen: dict[str, int] = {}
    for i in range(200):
        key = f"user-{i}" * (1 + i % 4)
        producer.produce(s.topics.events, b"x", key.encode(),
                         on_delivery=lambda err, msg, k=key: seen.__setitem__(k, msg.partition()))  # fmt: skip
    producer.flush()
    assert len(seen) == 200
    assert all(partition_for(k, s.partitions) == p for k, p in seen.items())


def test_sigkill_mid_stream_loses_nothing_and_counts_nothing_twice(live_settings: Settings) -> None:
    s = live_settings
    ensure_topics(s)
    records = list(synthetic_events(30_000, users=500, items=200, seed=7, start_us=int(time.time() * 1e6) - 10**9,
                                    step_us=1, bad_every=500))  # fmt: skip
    expected: Counter[str] = Counter()
    expected_items: Counter[str] = Counter()  # forwards per item: every slate item, every other event's item
    for r in records:
        with contextlib.suppress(orjson.JSONDecodeError):
            obj = orjson.loads(r.value)
            expected[obj["user_id"]] += 1
            expected_items.update(obj.get("items") or [obj["item_id"]])
    produce_records(make_producer(s.bootstrap_servers), s.topics.events, iter(records))
    env = {**os.environ, "FRESHREC_STATS_INTERVAL_S": "0.05", "FRESHREC_TOPICS": s.topics.model_dump_json()}
    cmd = [sys.executable, "-m", "streams.cli", "worker", "--bootstrap-servers", s.bootstrap_servers,
           "--partitions", str(s.partitions), "--data-dir", s.data_dir, "--group-id", s.group_id]  # fmt: skip
    stats = Path(s.data_dir).parent / "stats.json"
    proc = subprocess.Popen([*cmd, "--stats-path", str(stats)], cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while True:
        assert time.monotonic() < deadline and proc.poll() is None
        try:
            if orjson.loads(stats.read_bytes())["events"] >= 5_000:
                break
        except (FileNotFoundError, orjson.JSONDecodeError):
            pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    mid = _user_counts(s)
    assert 0 < sum(mid.values()) < sum(expected.values())  # it really died mid-stream
    stats2 = Path(s.data_dir).parent / "stats2.json"
    proc = subprocess.Popen([*cmd, "--stats-path", str(stats2)], cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert time.monotonic() < deadline and proc.poll() is None
            try:
                st = orjson.loads(stats2.read_bytes())
                if st["batches"] > 0 and st["idle_s"] is not None and st["idle_s"] > 1.5:
                    break
            except (FileNotFoundError, orjson.JSONDecodeError):
                pass
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert _user_counts(s) == expected
    assert _item_counts(s) == expected_items


def test_a_broker_that_restarted_empty_is_detected(live_settings: Settings) -> None:
    s = live_settings
    ensure_topics(s)
    producer = make_producer(s.bootstrap_servers)
    producer.produce(s.topics.events, _event(1, "u1", "i1"), b"u1")
    producer.flush()
    worker = StreamWorker(s)
    _run_until(worker, lambda: worker.stats.events >= 1)
    # same local shards, but a log with a new epoch: what a restarted memory-only broker looks like
    fresh_log = s.model_copy(update={"topics": s.topics.model_copy(update={"meta": s.topics.meta + "-new"})})
    with pytest.raises(StateMismatch, match="restarted with an empty log"):
        StreamWorker(fresh_log).run(max_seconds=30)


@pytest.mark.parametrize("cache_entries", [0, 100_000], ids=["no-state-cache", "state-cache"])
def test_events_and_impressions_of_one_user_in_one_batch_are_both_applied(
    live_settings: Settings, cache_entries: int
) -> None:
    # user shard p is fed by two topics; a batch holding records of both for one user
    # must apply both (regression: the second topic's group overwrote the first's state)
    s = live_settings.model_copy(update={"state_cache_entries": cache_entries})
    ensure_topics(s)
    producer = make_producer(s.bootstrap_servers)
    for i in range(50):
        producer.produce(s.topics.events, _event(i, "bob", f"i{i}"), b"bob")
        imp = {"event_id": f"imp{i}", "type": "impression", "user_id": "bob", "items": ["i1", "i2"],
               "event_time": "2026-11-22T10:00:00Z", "schema_version": 1}  # fmt: skip
        producer.produce(s.topics.impressions, orjson.dumps(imp), b"bob", partition=partition_for("bob", 3))
    producer.flush(10)
    worker = StreamWorker(s)  # everything is already in the log: the first batches hold both topics
    _run_until(worker, lambda: worker.stats.events >= 100)
    p = partition_for("bob", s.partitions)
    st = open_store(s.store_url, "user", p, read_only=True)
    state = serde.decode_user(st.get(STATE_PREFIX + b"bob"))  # type: ignore[arg-type]
    st.close()
    assert state.counts[1] == 50  # clicks
    assert state.counts[4] == 50  # impressions
    assert {r[2] for r in state.recent} == {f"i{i}" for i in range(50)}


def _item_counts(settings: Settings) -> Counter[str]:
    counts: Counter[str] = Counter()
    for p in range(settings.partitions):
        st = open_store(settings.store_url, "item", p, read_only=True)
        for k, v in st.scan(STATE_PREFIX):
            counts[k[1:].decode()] = sum(serde.decode_item(v).counts)
        st.close()
    return counts


def test_a_shard_without_local_state_is_restored_from_its_changelog(live_settings: Settings, tmp_path: Path) -> None:
    s = live_settings
    ensure_topics(s)
    producer = make_producer(s.bootstrap_servers)
    _produce_clicks(producer, s, range(70), users=7, items=5)
    first = StreamWorker(s)
    _run_until(first, lambda: first.stats.events >= 70 and first.stats.item_records >= 70)

    # the same group on a new host: an empty data directory, the log and changelogs intact
    moved = s.model_copy(update={"data_dir": str(tmp_path / "new-host")})
    _produce_clicks(producer, s, range(100, 114), users=7, items=5)
    second = StreamWorker(moved)
    _run_until(second, lambda: second.stats.events >= 14 and second.stats.item_records >= 14)

    assert second.stats.restored_records > 0
    assert second.stats.events == 14  # resumed at the restored offsets instead of re-reading the log
    assert _user_counts(moved) == {f"u{j}": 12 for j in range(7)}  # 10 + 2 each, nothing twice
    # 70 events over 5 items (14 each), then 100..113: i100 % 5 == 0, so items 0..3 get 3 and item 4 gets 2
    assert _item_counts(moved) == {"i0": 17, "i1": 17, "i2": 17, "i3": 17, "i4": 16}


@pytest.mark.parametrize("cache_entries", [12, 100_000], ids=["evicting-cache", "roomy-cache"])
def test_state_cache_gives_the_same_counts_as_the_store(live_settings: Settings, cache_entries: int) -> None:
    # 12 entries over 6 shards: 2 per shard, so almost every batch evicts and re-reads the store
    s = live_settings.model_copy(update={"state_cache_entries": cache_entries, "batch_size": 200})
    ensure_topics(s)
    records = list(synthetic_events(4_000, users=300, items=80, seed=3, start_us=int(time.time() * 1e6) - 10**9,
                                    step_us=1, bad_every=0))  # fmt: skip
    expected: Counter[str] = Counter(orjson.loads(r.value)["user_id"] for r in records)
    produce_records(make_producer(s.bootstrap_servers), s.topics.events, iter(records))
    worker = StreamWorker(s)
    _run_until(worker, lambda: worker.stats.events >= len(records))
    assert worker.stats.state_cache_hits > 0
    if cache_entries == 12:
        assert worker.stats.state_cache_misses > 300  # evicted states were read back from RocksDB
    assert _user_counts(s) == expected


def test_one_cache_budget_serves_every_shard_so_busy_user_shards_keep_all_their_states(
    live_settings: Settings,
) -> None:
    # 600 users and 40 items over 2 x 3 shards, a budget of 700 states: an equal split (116 a shard)
    # would leave ~200 users a user shard evicting every pass; shared, every state stays cached, so
    # the only misses are each key's first sight (nothing stored yet) and the store is never re-read
    s = live_settings.model_copy(update={"state_cache_entries": 700, "batch_size": 500})
    ensure_topics(s)
    records = list(synthetic_events(6_000, users=600, items=40, seed=5, start_us=int(time.time() * 1e6) - 10**9,
                                    step_us=1, bad_every=0))  # fmt: skip
    objs = [orjson.loads(r.value) for r in records]
    users = {o["user_id"] for o in objs}
    items = {o["item_id"] for o in objs if o["type"] != "impression"} | {
        i for o in objs if o["type"] == "impression" for i in o["items"]
    }
    produce_records(make_producer(s.bootstrap_servers), s.topics.events, iter(records))
    worker = StreamWorker(s)
    stats = worker.stats
    _run_until(worker, lambda: stats.events >= len(records) and stats.forwards <= stats.item_records)
    assert worker.stats.state_cache_misses == len(users) + len(items)
    assert _user_counts(s) == Counter(o["user_id"] for o in objs)


class _ReportsUndelivered:
    """The worker's real producer, except that ``flush`` reports one record as not delivered."""

    def __init__(self, real: object) -> None:
        self._real = real

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)

    def flush(self, timeout: float = -1) -> int:
        self._real.flush(timeout)  # type: ignore[attr-defined]
        return 1


def test_a_failed_batch_drops_the_cached_states(live_settings: Settings) -> None:
    s = live_settings.model_copy(update={"state_cache_entries": 100_000})  # the default, spelled out
    ensure_topics(s)
    producer = make_producer(s.bootstrap_servers)
    _produce_clicks(producer, s, range(20), users=4, items=20)
    worker = StreamWorker(s)
    worker.start()
    try:
        _step_until(worker, lambda: worker.stats.events >= 20)
        assert any(shard.cache for shard in worker._shards.values())
        for i in range(20, 30):
            producer.produce(s.topics.events, _event(i, "u1", f"i{i}"), b"u1")
        producer.flush(10)
        real = worker._producer
        worker._producer = _ReportsUndelivered(real)  # type: ignore[assignment]
        with pytest.raises(RuntimeError, match="not delivered"):
            _step_until(worker, lambda: False)
        worker._producer = real
        assert not any(shard.cache for shard in worker._shards.values())
    finally:
        worker.close()


def test_a_record_the_broker_never_acknowledges_fails_the_batch_and_a_restart_loses_nothing(
    live_settings: Settings,
) -> None:
    # A record whose delivery fails leaves the client's queue, so ``flush`` alone says "all delivered":
    # the worker must learn it from the delivery reports and not commit the batch.
    s = live_settings
    ensure_topics(s)
    producer = make_producer(s.bootstrap_servers)
    _produce_clicks(producer, s, range(10), users=2, items=3)
    worker = StreamWorker(s)
    worker.start()
    try:
        _step_until(worker, lambda: worker.stats.events >= 10)
        assert _user_counts(s) == {"u0": 5, "u1": 5}
        # the state producer (changelogs, DLQ) swapped for one whose records all time out unacknowledged
        worker._producer = Producer(
            {"bootstrap.servers": f"127.0.0.1:{free_port()}", "log_level": 0, "message.timeout.ms": 300,
             "delivery.report.only.error": True, "on_delivery": worker._delivery_failed}
        )  # fmt: skip
        _produce_clicks(producer, s, range(10, 20), users=2, items=3)
        with pytest.raises(RuntimeError, match=r"records not delivered .* failed: .*timed out"):
            _step_until(worker, lambda: False)
        assert _user_counts(s) == {"u0": 5, "u1": 5}  # nothing of the failed batch was committed
    finally:
        worker.close()
    # a restarted worker reads the failed batch again from the stored offsets, and applies it once
    worker = StreamWorker(s)
    worker.start()
    try:
        _step_until(worker, lambda: _user_counts(s) == {"u0": 10, "u1": 10})
        assert worker.stats.events == 10
    finally:
        worker.close()


def _impression(i: int, user: str, items: list[str]) -> bytes:
    return orjson.dumps({"event_id": f"imp{i}", "type": "impression", "user_id": user, "items": items,
                         "event_time": "2026-11-22T10:00:00Z", "schema_version": 1})  # fmt: skip


def test_forwards_travel_in_packs_and_a_resent_pack_changes_nothing(live_settings: Settings) -> None:
    s = live_settings
    ensure_topics(s)
    producer = make_producer(s.bootstrap_servers)
    expected: Counter[str] = Counter()
    for i in range(30):
        slate = [f"i{(i + k) % 40}" for k in range(20)]
        producer.produce(s.topics.events, _impression(i, f"u{i % 3}", slate), f"u{i % 3}".encode())
        producer.produce(s.topics.events, _event(100 + i, f"u{i % 3}", f"i{i}"), f"u{i % 3}".encode())
        expected.update(slate)
        expected[f"i{i}"] += 1
    producer.flush(10)
    n_forwards = sum(expected.values())  # 630
    worker = StreamWorker(s)
    _run_until(worker, lambda: worker.stats.events >= 60 and worker.stats.item_records >= n_forwards)
    assert _item_counts(s) == expected and worker.stats.resent_forwards == 0

    packs = [(m.partition() or 0, m.value() or b"") for m in _read_all(s, s.topics.by_item, s.partitions)]
    assert len(packs) <= 60 * s.partitions  # at most one record per (source record, item partition)
    by_part: dict[int, list[tuple[int, int, Forward]]] = {}
    for p, value in packs:
        src, seqs, fws, _ = serde.decode_forward_pack(value)
        assert seqs == sorted(set(seqs))
        assert {partition_for(f.item_id, s.partitions) for f in fws} == {p}  # where the item's state lives
        by_part.setdefault(p, []).extend((src, q, f) for q, f in zip(seqs, fws, strict=True))
    assert sum(len(v) for v in by_part.values()) == n_forwards

    # a crash re-sends: the same packs again, and the same forwards grouped differently, plus a new one
    for p, value in packs:
        producer.produce(s.topics.by_item, value, None, partition=p)
    new_item = next(f"n{j}" for j in range(100) if partition_for(f"n{j}", s.partitions) == 0)
    added = False
    for p, rows in by_part.items():
        for src in {sr for sr, _, _ in rows}:  # one pack per (source, item partition) instead of per batch
            regroup = [(q, f, 0) for sr, q, f in rows if sr == src]
            if p == 0 and not added:
                fresh = Forward(new_item, "late", EventType.CLICK, regroup[-1][1].ts_us, "u0")
                regroup.append((regroup[-1][0] + FORWARD_SLOTS, fresh, 0))
                added = True
            producer.produce(s.topics.by_item, serde.encode_forward_pack(src, regroup), None, partition=p)
    producer.flush(10)
    assert added
    again = StreamWorker(s)
    _run_until(again, lambda: again.stats.item_records >= 2 * n_forwards + 1)
    assert again.stats.item_records == 2 * n_forwards + 1
    assert again.stats.resent_forwards == 2 * n_forwards
    assert _item_counts(s) == expected + Counter({new_item: 1})


class _RecordsConsumes:
    """The worker's real consumer, recording when each ``consume`` started and how many records it returned."""

    def __init__(self, real: object) -> None:
        self._real = real
        self.calls: list[tuple[float, int]] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)

    def consume(self, num_messages: int, timeout: float) -> list[Message]:
        started = time.monotonic()
        msgs: list[Message] = self._real.consume(num_messages, timeout)  # type: ignore[attr-defined]
        self.calls.append((started, len(msgs)))
        return msgs


def test_after_a_small_batch_the_next_waits_for_the_batch_interval(live_settings: Settings) -> None:
    interval = 0.2
    # forward_wait_s=0: only the batches' own consumes (the wait for forwards is tested below)
    s = live_settings.model_copy(update={"min_batch_interval_s": interval, "batch_size": 10, "forward_wait_s": 0})
    ensure_topics(s)
    producer = make_producer(s.bootstrap_servers)
    worker = StreamWorker(s)
    worker.start()
    try:
        spy = _RecordsConsumes(worker._consumer)
        worker._consumer = spy  # type: ignore[assignment]
        _produce_clicks(producer, s, range(100), users=5, items=7)  # a backlog: full batches of 10
        deadline = time.monotonic() + 60
        while worker.stats.events < 100:
            assert time.monotonic() < deadline, worker.stats.snapshot()
            worker.step()
        for i in range(100, 112):  # then a trickle: one event every 30 ms
            _produce_clicks(producer, s, range(i, i + 1), users=5, items=7)
            worker.step()
            time.sleep(0.03)
        while worker.stats.events < 112:
            assert time.monotonic() < deadline, worker.stats.snapshot()
            worker.step()
    finally:
        worker.close()
    gaps = [(n, later - t) for (t, n), (later, _) in itertools.pairwise(spy.calls)]
    after_small = [gap for n, gap in gaps if 0 < n < 5]
    after_full = [gap for n, gap in gaps if n == 10]
    assert after_small and after_full
    # no batch starts within the interval of a small one before it; a full one does not hold the next back
    assert min(after_small) >= interval - 0.005, after_small
    assert min(after_full) < interval, after_full
    assert _user_counts(s) == Counter({f"u{u}": n for u, n in Counter(i % 5 for i in range(112)).items()})


class _InjectsDuringForwardWait(_RecordsConsumes):
    """Records consumes; the first consume after one that returned records (the wait for the batch's own
    forwards) first produces ``inject`` clicks and lets them reach the client, so that the wait reads them too."""

    def __init__(self, real: object, inject: Callable[[], None]) -> None:
        super().__init__(real)
        self._inject: Callable[[], None] | None = inject
        self.while_waiting: list[Message] = []

    def consume(self, num_messages: int, timeout: float) -> list[Message]:
        injecting = self._inject is not None and bool(self.calls) and self.calls[-1][1] > 0
        if injecting:
            assert self._inject is not None
            self._inject()
            self._inject = None
            time.sleep(0.5)  # the client fetches them (and the forwards) meanwhile
        msgs = super().consume(num_messages, timeout)
        if injecting:
            self.while_waiting = msgs
        return msgs


def _assigned_worker(live_settings: Settings, wait_s: float) -> tuple[Settings, Producer, StreamWorker]:
    """Settings with ``forward_wait_s=wait_s`` and no batch interval, a producer, and a started worker
    that holds its assignment (stepped in this thread)."""
    s = live_settings.model_copy(update={"forward_wait_s": wait_s, "min_batch_interval_s": 0})
    ensure_topics(s)
    producer = make_producer(s.bootstrap_servers)
    worker = StreamWorker(s)
    worker.start()
    deadline = time.monotonic() + 60
    while not worker.assigned.is_set():
        if time.monotonic() > deadline:
            worker.close()
            raise AssertionError("no assignment within 60 s")
        worker.step()
    return s, producer, worker


@pytest.mark.parametrize("wait_s", [0.0, 2.0], ids=["forwards-next-batch", "forwards-same-batch"])
def test_a_small_batch_applies_its_own_forwards_and_keeps_the_input_read_meanwhile(
    live_settings: Settings, wait_s: float
) -> None:
    s, producer, worker = _assigned_worker(live_settings, wait_s)
    try:
        deadline = time.monotonic() + 60
        spy = _InjectsDuringForwardWait(
            worker._consumer, lambda: _produce_clicks(producer, s, range(1, 4), users=3, items=2)
        )
        worker._consumer = spy  # type: ignore[assignment]
        _produce_clicks(producer, s, range(1), users=3, items=2)  # e0: u0 clicks i0
        while worker.stats.events < 1:
            assert time.monotonic() < deadline, worker.stats.snapshot()
            worker.step()
        if wait_s:
            # the click's forward reached the item store in the step that applied it ...
            assert worker.stats.events == 1 and worker.stats.item_records == 1
            assert _item_counts(s) == Counter({"i0": 1})
            # ... and the clicks read while waiting for it wait, unapplied, for the next batch
            assert sorted(m.value() for m in spy.while_waiting if m.topic() == s.topics.events) == sorted(
                _event(i, f"u{i % 3}", f"i{i % 2}") for i in range(1, 4)
            )
            assert sorted(m.value() for m in worker._carry) == sorted(_event(i, f"u{i % 3}", f"i{i % 2}")
                                                                      for i in range(1, 4))  # fmt: skip
        else:
            assert worker.stats.item_records == 0  # the forward waits for the next batch
        while worker.stats.events < 4 or worker.stats.item_records < 4:
            assert time.monotonic() < deadline, worker.stats.snapshot()
            worker.step()
    finally:
        worker.close()
    assert worker.stats.events == 4 and worker.stats.item_records == 4 and worker.stats.duplicates == 0
    assert _user_counts(s) == Counter({"u0": 2, "u1": 1, "u2": 1})  # e0, e3 / e1 / e2
    assert _item_counts(s) == Counter({"i0": 2, "i1": 2})


def test_a_rebalance_while_waiting_for_forwards_loses_nothing(live_settings: Settings) -> None:
    s, producer, worker = _assigned_worker(live_settings, 2.0)
    try:
        deadline = time.monotonic() + 60
        real = worker._consumer
        assert real is not None

        def clicks_then_rebalance() -> None:
            # as an eager rebalance inside ``consume``: everything revoked, then assigned again at the stored
            # offsets; what that same ``consume`` returns comes from the new assignment
            _produce_clicks(producer, s, range(1, 4), users=3, items=2)
            tps = real.assignment()
            worker._on_revoke(real, tps)
            worker._on_assign(real, [TopicPartition(tp.topic, tp.partition) for tp in tps])

        spy = _InjectsDuringForwardWait(real, clicks_then_rebalance)
        worker._consumer = spy  # type: ignore[assignment]
        generation = worker._generation
        _produce_clicks(producer, s, range(1), users=3, items=2)
        while worker.stats.events < 4 or worker.stats.item_records < 4:
            assert time.monotonic() < deadline, worker.stats.snapshot()
            worker.step()
        assert worker._generation == generation + 2  # the rebalance happened, in the wait
        assert spy.while_waiting  # and that consume returned records of the new assignment
    finally:
        worker.close()
    assert worker.stats.events == 4 and worker.stats.item_records == 4 and worker.stats.duplicates == 0
    assert _user_counts(s) == Counter({"u0": 2, "u1": 1, "u2": 1})
    assert _item_counts(s) == Counter({"i0": 2, "i1": 2})


def test_a_small_batch_applies_its_own_packs_from_their_delivery_reports_once(live_settings: Settings) -> None:
    """Once an item partition's stage has caught up, the packs a batch sends there are applied from their
    delivery reports in the same step (not read back); the consumer reads them later and drops them, and
    a restarted worker applies none of them again."""
    s, producer, worker = _assigned_worker(live_settings, 2.0)
    by_item = s.topics.by_item
    part = partition_for("i0", s.partitions)
    try:
        deadline = time.monotonic() + 60
        _produce_clicks(producer, s, range(1), users=3, items=1)  # e0: the partition's first pack, read back
        while worker.stats.item_records < 1:
            assert time.monotonic() < deadline, worker.stats.snapshot()
            worker.step()
        assert worker.stats.own_packs_inline == 0 and worker.stats.forward_waits == 1
        assert worker._item_next[part] == 1
        _produce_clicks(producer, s, range(1, 2), users=3, items=1)  # e1 on i0
        while worker.stats.events < 2:
            assert time.monotonic() < deadline, worker.stats.snapshot()
            worker.step()
        # the step that applied e1 applied its pack too, without waiting to read it
        assert worker.stats.own_packs_inline == 1 and worker.stats.forward_waits == 1
        assert worker.stats.item_records == 2 and _item_counts(s) == Counter({"i0": 2})
        consumer = worker._consumer
        assert consumer is not None
        while consumer.position([TopicPartition(by_item, part)])[0].offset < 2:  # the consumer reads the pack
            assert time.monotonic() < deadline, worker.stats.snapshot()
            worker.step()
        worker.step()
    finally:
        worker.close()
    stats = worker.stats
    assert (stats.item_records, stats.resent_forwards, stats.redelivered, stats.duplicates) == (2, 0, 0, 0)
    assert _item_counts(s) == Counter({"i0": 2})
    again = StreamWorker(s)
    again.start()
    try:
        deadline = time.monotonic() + 60
        _produce_clicks(producer, s, range(2, 3), users=3, items=1)
        while again.stats.events < 1:
            assert time.monotonic() < deadline, again.stats.snapshot()
            again.step()
        while again.stats.item_records < 1:
            assert time.monotonic() < deadline, again.stats.snapshot()
            again.step()
    finally:
        again.close()
    assert again.stats.item_records == 1 and again.stats.redelivered == 0
    assert _item_counts(s) == Counter({"i0": 3}) and _user_counts(s) == Counter({"u0": 1, "u1": 1, "u2": 1})


def test_the_stats_time_the_phases_of_a_batch_and_the_collectors_pauses(live_settings: Settings) -> None:
    s, producer, worker = _assigned_worker(live_settings, 2.0)
    try:
        worker.stats.reset_freshness()
        _produce_clicks(producer, s, range(20), users=3, items=2)
        deadline = time.monotonic() + 60
        while worker.stats.events < 20 or worker.stats.item_records < 20:
            assert time.monotonic() < deadline, worker.stats.snapshot()
            worker.step()
        assert worker.stats.on_gc in gc.callbacks
        gc.collect()
        snap = worker.stats.snapshot()
    finally:
        worker.close()
    assert worker.stats.on_gc not in gc.callbacks
    phases = snap["phase_s"]
    assert set(phases) == {"idle", "tail", "consume", "apply", "deliver", "write", "forwards"}
    assert min(phases["consume"], phases["apply"], phases["deliver"], phases["write"]) > 0, phases
    assert 1 <= snap["window_batches"] <= snap["batches"] and snap["window_records"] >= 20
    assert snap["window_cpu_s"] > 0 and snap["window_max_batch_ms"] > 0
    assert snap["gc_runs"] >= 1 and snap["gc_s"] > 0 and snap["gc_max_ms"] > 0
    worker.stats.reset_freshness()
    again = worker.stats.snapshot()
    assert set(again["phase_s"].values()) == {0.0} and again["window_batches"] == again["gc_runs"] == 0


def test_the_producer_cli_plays_slate_sessions_into_the_events_topic(live_settings: Settings) -> None:
    """``freshrec produce --sessions N``: N valid events keyed by user, each user's in event-time order."""
    ensure_topics(live_settings)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--sessions", "400", "--users", "20", "--items", "50", "--seed", "3"])
    assert run_produce(args, live_settings) == 0
    msgs = _read_all(live_settings, live_settings.topics.events, live_settings.partitions)
    assert len(msgs) == 400
    last: dict[str, int] = {}
    for m in msgs:
        ev = codec.decode(m.value() or b"")
        assert m.key() == (ev.user_id or "").encode()
        assert ev.ts_us >= last.get(ev.user_id or "", 0)  # one user's events: one partition, in order
        last[ev.user_id or ""] = ev.ts_us
    assert len(last) > 1
