"""The stream worker: a batch loop over confluent-kafka, sharded RocksDB stores, changelogs.

Per loop iteration (see docs/ARCHITECTURE.md for why this is not a Faust agent):

1. ``consume`` a batch from the input topics (``events``, ``impressions``; the user
   stage) and from ``events.by-item`` (the item stage). One consumer group; the
   range assignor gives a member partition ``p`` of every topic, so a worker owns
   user shard ``p`` and item shard ``p`` together.
2. Per partition: decode (bad input -> ``events.dlq`` with the original bytes and a
   reason), group by key, ``multi_get`` the states, call the pure core
   (:mod:`streams.core.state`), coalesce to one new value per key.
3. Produce forwards (one pack per item partition: all of the batch's forwards bound for
   it, in source-offset order, see :func:`streams.core.serde.encode_forward_pack`),
   changelog records and DLQ records, then ``flush`` so they are durable *before* the
   states commit.
4. Write each shard's states together with its next input offsets in one RocksDB
   WriteBatch. That write is the commit: on assignment the worker seeks to the
   stored offsets, so a SIGKILL anywhere neither loses nor repeats an update.
   Forwards re-sent after a crash are dropped by the item stage's per-source
   high-water marks; redelivered records are dropped by per-key offset guards.
"""

from __future__ import annotations

import itertools
import logging
import resource
import shutil
import threading
import time
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, Producer, TopicPartition

from streams import _compiled, codec
from streams.config import Settings
from streams.core import serde
from streams.core.partition import partition_for
from streams.core.state import (
    FORWARD_SLOTS,
    CoreConfig,
    Forward,
    ItemState,
    UserState,
    apply_item_batch,
    apply_user_batch,
    forward_seqs,
    upsert_forward,
)
from streams.core.vectors import ItemReplica
from streams.errors import InvalidEvent, StateMismatch
from streams.events import Event, EventType
from streams.store import META_PREFIX, STATE_PREFIX, Store, open_store, shard_path

# ItemReplica is re-exported
__all__ = ["ItemReplica", "StreamWorker", "WorkerStats", "reset_state", "restore_from_changelog"]

log = logging.getLogger(__name__)

#: the longest an empty fetch waits on the broker. Tansu answers a waiting fetch a few ms after data
#: arrives either way (measured: 3 ms at 10, 6 ms at 50), but every empty answer costs it ~1.5 ms
#: of CPU: an idle worker's 12 partitions kept 16% of a Tansu core busy at 10 ms, 3% at 50 ms
FETCH_WAIT_MS = 50

#: forwards per ``events.by-item`` record at most (a positive's forward is ~350 bytes: ~350 KB a record)
PACK_FORWARDS = 1000

#: item ids whose partition the worker remembers (a memo cleared when full, not a catalog)
_ITEM_PART_MEMO = 1 << 18


@dataclass
class WorkerStats:
    """Counters and recent freshness samples of one worker process."""

    events: int = 0
    forwards: int = 0
    dlq: int = 0
    dlq_reasons: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    duplicates: int = 0
    redelivered: int = 0
    resent_forwards: int = 0
    batches: int = 0
    restored_records: int = 0
    #: forwards the item stage read (re-sent ones included; a record of ``events.by-item`` packs many)
    item_records: int = 0
    state_cache_hits: int = 0
    state_cache_misses: int = 0
    first_batch_at: float | None = None
    last_batch_at: float | None = None
    user_fresh_ms: list[float] = field(default_factory=list)
    item_fresh_ms: list[float] = field(default_factory=list)

    #: (samples added so far, p50/p99 of both lists) as of the last snapshot
    _fresh_cache: tuple[int, list[float | None]] = (-1, [])
    fresh_added: int = 0

    def reset_freshness(self) -> None:
        """Forget the freshness samples (e.g. between benchmark phases)."""
        self.user_fresh_ms = []
        self.item_fresh_ms = []
        self.fresh_added += 1

    def _quantiles(self) -> list[float | None]:
        """p50/p99 of the user and the item samples, recomputed only when samples came in."""
        added, cached = self._fresh_cache
        if added != self.fresh_added:
            cached = []
            for xs in (self.user_fresh_ms, self.item_fresh_ms):
                if xs:
                    cached.extend(float(v) for v in np.percentile(np.array(xs), (50, 99)))
                else:
                    cached.extend((None, None))
            self._fresh_cache = (self.fresh_added, cached)
        return cached

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able summary (freshness as p50/p99 of the recent samples)."""
        u50, u99, i50, i99 = self._quantiles()

        return {
            "events": self.events,
            "forwards": self.forwards,
            "dlq": self.dlq,
            "dlq_reasons": dict(self.dlq_reasons),
            "duplicates": self.duplicates,
            "redelivered": self.redelivered,
            "resent_forwards": self.resent_forwards,
            "batches": self.batches,
            "restored_records": self.restored_records,
            "state_cache_hits": self.state_cache_hits,
            "state_cache_misses": self.state_cache_misses,
            "build": _compiled.build(),
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
            "item_records": self.item_records,
            "first_batch_at": self.first_batch_at,
            "last_batch_at": self.last_batch_at,
            "idle_s": None if self.last_batch_at is None else time.time() - self.last_batch_at,
            "user_fresh_p50_ms": u50,
            "user_fresh_p99_ms": u99,
            "item_fresh_p50_ms": i50,
            "item_fresh_p99_ms": i99,
        }


_S = TypeVar("_S", UserState, ItemState)
_first = itemgetter(0)


def _off_key(topic: str, partition: int) -> bytes:
    return META_PREFIX + f"off:{topic}:{partition}".encode()


class _Shard:
    """One stage's store for one partition, plus its cached meta and decoded states.

    ``cache`` holds decoded states, write-through: a state enters it only together with the
    write that stores it, and the cache lives and dies with the shard (dropped on revoke; a
    crash loses the process). States are mutated in place by the core before the commit, so
    ``step`` empties every shard's cache when a batch fails.
    """

    def __init__(self, store: Store, stage: str, partition: int, cache_entries: int = 0) -> None:
        self.store = store
        self.stage = stage
        self.partition = partition
        self.src_hwm: dict[int, int] = {}
        for key, value in store.scan(META_PREFIX + b"src:"):
            self.src_hwm[int(key[5:])] = int(value)
        self.cache: dict[bytes, Any] = {}
        self.cache_entries = cache_entries

    def remember(self, key: bytes, state: object) -> None:
        """Put ``state`` in the cache as the most recently used entry; evict the oldest tenth when full."""
        if self.cache_entries <= 0:
            return
        cache = self.cache
        cache.pop(key, None)
        cache[key] = state
        if len(cache) > self.cache_entries:
            for old in list(itertools.islice(cache, len(cache) - self.cache_entries + self.cache_entries // 10)):
                del cache[old]

    def next_offset(self, topic: str) -> int | None:
        raw = self.store.get(_off_key(topic, self.partition))
        return None if raw is None else int(raw)


def restore_from_changelog(settings: Settings, stage: str, partition: int, store: Store, quiet_s: float = 0.5) -> int:
    """Copy partition ``partition`` of the stage's changelog into ``store``; returns records read.

    The changelog holds full state values keyed by id plus the shard's meta records (next
    input offsets, the item stage's per-source high-water marks), so the restored shard
    resumes exactly where the last committed batch left off. "The end" is never taken from
    the high watermark alone (Tansu's is too low): reading stops once the position passed
    it **and** no record arrived for ``quiet_s``. A prefix cut inside a batch is still safe:
    the per-key offset guards skip the records the restored states already include.
    """
    topic = settings.topics.user_changelog if stage == "user" else settings.topics.item_changelog
    consumer = Consumer(
        {"bootstrap.servers": settings.bootstrap_servers, "group.id": f"{settings.group_id}-restore",
         "enable.auto.commit": False, "fetch.wait.max.ms": 50, "log_level": 3}
    )  # fmt: skip
    try:
        tp = TopicPartition(topic, partition, OFFSET_BEGINNING)
        consumer.assign([tp])
        _low, high = consumer.get_watermark_offsets(tp, timeout=10.0, cached=False)
        if high <= 0:
            return 0  # Tansu's high watermark is too low, but 0 does mean empty
        position, n, last_data = 0, 0, time.monotonic()
        puts: dict[bytes, bytes] = {}
        deletes: set[bytes] = set()
        while position < high or time.monotonic() - last_data < quiet_s:
            msgs = consumer.consume(10000, 0.1)
            for m in msgs:
                if m.error() is not None:
                    continue
                key = m.key()
                position = cast(int, m.offset()) + 1
                n += 1
                if not key:
                    continue
                k = key if key[:1] == META_PREFIX else STATE_PREFIX + key
                value = m.value()
                if value is None:
                    deletes.add(k)
                    puts.pop(k, None)
                else:
                    puts[k] = value
                    deletes.discard(k)
            if msgs:
                last_data = time.monotonic()
            if len(puts) >= 50_000:
                store.write(puts, list(deletes))
                puts, deletes = {}, set()
        store.write(puts, list(deletes), sync=True)
        return n
    finally:
        consumer.close()


def reset_state(settings: Settings) -> None:
    """Delete every local shard under ``settings.data_dir``."""
    root = Path(settings.data_dir)
    for stage in ("user", "item"):
        for path in root.glob(f"{stage}-*"):
            shutil.rmtree(path, ignore_errors=True)


class StreamWorker:
    """One worker process: both stages for the partitions the group assigns to it."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.cfg: CoreConfig = settings.model.core()
        self.clock = clock
        self.stats = WorkerStats()
        self.replica = ItemReplica(self.cfg)
        t = settings.topics
        self._user_topics = (t.events, t.impressions)
        self._src_id = {t.events: 0, t.impressions: 1}
        self._shards: dict[tuple[str, int], _Shard] = {}
        self._item_part: dict[str, int] = {}
        self._epoch: str | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._tail: Consumer | None = None
        self._last_stats = 0.0
        #: monotonic time before which the next batch does not start (see ``Settings.min_batch_interval_s``)
        self._next_batch_at = 0.0
        self.assigned = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish its current batch and exit."""
        self._stop.set()

    def _common(self) -> dict[str, Any]:
        return {"bootstrap.servers": self.settings.bootstrap_servers, "log_level": 3}

    def start(self) -> None:
        """Connect, check the log epoch, subscribe."""
        from streams.broker import ensure_topics

        s = self.settings
        self._epoch = ensure_topics(s)
        self._producer = Producer(
            {**self._common(), "linger.ms": 2, "batch.num.messages": 10000, "queue.buffering.max.messages": 500000,
             "enable.idempotence": False, "acks": "all"}
        )  # fmt: skip
        self._consumer = Consumer(
            {**self._common(), "group.id": s.group_id, "enable.auto.commit": False,
             "auto.offset.reset": "earliest", "session.timeout.ms": s.session_timeout_ms,
             "heartbeat.interval.ms": max(100, s.session_timeout_ms // 10),
             "partition.assignment.strategy": "range", "fetch.wait.max.ms": FETCH_WAIT_MS,
             "queued.max.messages.kbytes": 65536}
        )  # fmt: skip
        # the item-vector replica of items on other workers' shards (this worker's own item stage
        # updates it directly): 100 ms of lag is harmless for negatives and positives' vectors, and
        # each empty fetch costs the broker ~1 ms of CPU (a 10 ms wait kept ~18% of a Tansu core busy)
        self._tail = Consumer(
            {**self._common(), "group.id": s.group_id + "-replica", "enable.auto.commit": False,
             "fetch.wait.max.ms": 100}
        )  # fmt: skip
        self._tail.assign([TopicPartition(s.topics.item_changelog, p, OFFSET_BEGINNING) for p in range(s.partitions)])
        self._consumer.subscribe(
            [*self._user_topics, s.topics.by_item], on_assign=self._on_assign, on_revoke=self._on_revoke
        )

    def close(self) -> None:
        """Close clients and stores."""
        if self._consumer is not None:
            self._consumer.close()
        if self._tail is not None:
            self._tail.close()
        if self._producer is not None:
            self._producer.flush(10)
        for shard in self._shards.values():
            shard.store.close()
        self._shards.clear()
        self.write_stats()

    def run(self, max_seconds: float | None = None) -> None:
        """Run until :meth:`stop` (or ``max_seconds``)."""
        self.start()
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        try:
            while not self._stop.is_set():
                if deadline is not None and time.monotonic() > deadline:
                    break
                self.step()
                if self._error is not None:
                    raise self._error
        finally:
            self.close()

    # -- rebalance ---------------------------------------------------------------------------

    def _shard(self, stage: str, partition: int) -> _Shard:
        key = (stage, partition)
        shard = self._shards.get(key)
        if shard is None:
            store = open_store(self.settings.store_url, stage, partition)
            epoch_key = META_PREFIX + b"epoch"
            have = store.get(epoch_key)
            assert self._epoch is not None
            if have is None:
                # no local state for this shard (new host, lost disk): rebuild it from its changelog
                n = restore_from_changelog(self.settings, stage, partition, store)
                self.stats.restored_records += n
                if n:
                    log.info("restored %s shard %d from its changelog: %d records", stage, partition, n)
                store.write({epoch_key: self._epoch.encode()}, sync=True)
            elif have.decode() != self._epoch:
                store.close()
                path = shard_path(self.settings.data_dir, stage, partition)
                raise StateMismatch(
                    f"local shard {path} was built from log epoch {have.decode()}, but the broker's log is "
                    f"epoch {self._epoch}: the broker restarted with an empty log (the embedded broker "
                    "keeps its log in memory). Refusing to mix old state with a new log. Either discard "
                    "local state (`freshrec worker --reset-state`) or replay the old event log into the "
                    "new broker first (`freshrec produce ...`) and then reset."
                )
            per_shard = self.settings.state_cache_entries // (2 * self.settings.partitions)
            shard = self._shards[key] = _Shard(store, stage, partition, per_shard)
        return shard

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        try:
            for tp in partitions:
                stage = "item" if tp.topic == self.settings.topics.by_item else "user"
                nxt = self._shard(stage, tp.partition).next_offset(tp.topic)
                tp.offset = OFFSET_BEGINNING if nxt is None else nxt
            consumer.assign(partitions)
            log.info("assigned %s", [(tp.topic, tp.partition, tp.offset) for tp in partitions])
            self.assigned.set()
        except BaseException as exc:  # surface errors from the librdkafka callback thread
            self._error = exc
            self._stop.set()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # the loop only polls between batches, so everything consumed is already committed
        keep = {("item" if tp.topic == self.settings.topics.by_item else "user", tp.partition) for tp in partitions}
        for key in keep:
            shard = self._shards.pop(key, None)
            if shard is not None:
                shard.store.close()
        consumer.unassign()
        self.assigned.clear()

    # -- the loop ----------------------------------------------------------------------------

    def _tail_replica(self) -> None:
        assert self._tail is not None
        msgs = self._tail.consume(50000, 0)
        for m in msgs:
            if m.error():
                continue
            key = m.key()
            value = m.value()
            if not key or not value or key[:1] == META_PREFIX:
                continue
            vec = serde.vector_of(value)
            if vec is not None:
                self.replica.put(key.decode(), vec)

    def step(self) -> int:
        """Run one batch; returns the number of records consumed."""
        assert self._consumer is not None and self._producer is not None
        linger = self._next_batch_at - time.monotonic()
        if linger > 0 and self._stop.wait(linger):
            return 0
        self._tail_replica()
        started = time.monotonic()
        msgs = self._consumer.consume(self.settings.batch_size, self.settings.poll_timeout_s)
        small = len(msgs) < self.settings.batch_size // 2
        self._next_batch_at = started + self.settings.min_batch_interval_s if msgs and small else 0.0
        if not msgs:
            self._producer.poll(0)
            self._maybe_write_stats()
            return 0
        if self.stats.first_batch_at is None:
            self.stats.first_batch_at = self.clock()
        groups: dict[tuple[str, int], list[Message]] = defaultdict(list)
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer error: %s", err)
                continue
            groups[(cast(str, m.topic()), cast(int, m.partition()))].append(m)
        fresh_user: list[int] = []
        fresh_item: list[int] = []
        try:
            self._apply_and_commit(groups, fresh_user, fresh_item)
        except BaseException:
            # cached states are mutated in place before the commit: never keep them past a failure
            for shard in self._shards.values():
                shard.cache.clear()
            raise
        now_ms = self.clock() * 1000.0
        if fresh_user or fresh_item:
            self._sample(self.stats.user_fresh_ms, fresh_user, now_ms)
            self._sample(self.stats.item_fresh_ms, fresh_item, now_ms)
            self.stats.fresh_added += 1
        self.stats.batches += 1
        self.stats.last_batch_at = now_ms / 1000.0
        self._maybe_write_stats()
        return len(msgs)

    def _apply_and_commit(
        self, groups: dict[tuple[str, int], list[Message]], fresh_user: list[int], fresh_item: list[int]
    ) -> None:
        """Apply the batch's groups, flush everything produced, then commit one WriteBatch per shard."""
        assert self._producer is not None
        # one pending write set per shard: user shard p is fed by two topics (events and
        # impressions), and the second group must see the first group's new states
        writes: dict[tuple[str, int], tuple[_Shard, dict[bytes, bytes]]] = {}
        by_item = self.settings.topics.by_item
        # user-stage groups first: their changelog records (what a click changes for the next
        # recommendation) leave for the broker while the item stage of the same batch still runs
        for (topic, partition), batch in sorted(groups.items(), key=lambda kv: kv[0][0] == by_item):
            stage = "item" if topic == by_item else "user"
            shard, pending = writes.setdefault((stage, partition), (self._shard(stage, partition), {}))
            if stage == "item":
                pending.update(self._item_batch(shard, topic, batch, pending, fresh_item))
            else:
                pending.update(self._user_batch(shard, topic, batch, pending))
                fresh_user.extend(m.timestamp()[1] for m in batch)
        # forwards, changelogs and DLQ records must be durable before the states commit
        remaining = self._producer.flush(30)
        if remaining:
            raise RuntimeError(f"{remaining} records not delivered to the broker; not committing the batch")
        sync = self.settings.sync_writes
        for shard, puts in writes.values():
            shard.store.write(puts, sync=sync)

    @staticmethod
    def _sample(store: list[float], ts_ms: list[int], now_ms: float) -> None:
        if not ts_ms:
            return
        step = max(1, len(ts_ms) // 64)
        store.extend(now_ms - t for t in ts_ms[::step] if t > 0)
        if len(store) > 50000:
            del store[:25000]

    def _produce(self, topic: str, key: bytes | None, value: bytes, partition: int = -1, ts_ms: int = 0) -> None:
        assert self._producer is not None
        while True:
            try:
                # positional: confluent-kafka parses keyword arguments at ~0.6 us a record
                self._producer.produce(topic, value, key, partition, None, None, ts_ms)
                return
            except BufferError:
                self._producer.poll(0.01)

    def _dlq(self, m: Message, reason: str, detail: str) -> None:
        self.stats.dlq += 1
        self.stats.dlq_reasons[reason] += 1
        assert self._producer is not None
        headers = [
            ("reason", reason.encode()),
            ("detail", detail[:500].encode()),
            ("source", f"{m.topic()}:{m.partition()}:{m.offset()}".encode()),
        ]
        while True:
            try:
                self._producer.produce(self.settings.topics.dlq, m.value(), m.key(), headers=headers)  # type: ignore[arg-type]  # bytes header values are valid
                return
            except BufferError:
                self._producer.poll(0.01)

    def _item_partition(self, item_id: str) -> int:
        p = self._item_part.get(item_id)
        if p is None:
            if len(self._item_part) >= _ITEM_PART_MEMO:  # bounded: 1M items would hold ~100 MB
                self._item_part.clear()
            p = self._item_part[item_id] = partition_for(item_id, self.settings.partitions)
        return p

    def _fetch(
        self, shard: _Shard, keys: list[bytes], pending: dict[bytes, bytes], decode: Callable[[bytes], _S]
    ) -> list[_S | None]:
        """Decoded states of ``keys``: the shard's cache, then this batch's not-yet-written values, then the store."""
        cache = shard.cache
        out: list[_S | None] = [cache.get(k) for k in keys]
        missing = [i for i, s in enumerate(out) if s is None]
        self.stats.state_cache_hits += len(keys) - len(missing)
        if not missing:
            return out
        self.stats.state_cache_misses += len(missing)
        from_store = [i for i in missing if keys[i] not in pending]
        for i, raw in zip(from_store, shard.store.multi_get([keys[i] for i in from_store]), strict=True):
            if raw is not None:
                out[i] = decode(raw)
        for i in missing:
            raw = pending.get(keys[i])
            if raw is not None:
                out[i] = decode(raw)
        return out

    def _user_batch(
        self, shard: _Shard, topic: str, batch: list[Message], pending: dict[bytes, bytes]
    ) -> dict[bytes, bytes]:
        src = self._src_id[topic] * 65536 + shard.partition  # one sequence per source partition
        per_user: dict[str, list[tuple[int, Event]]] = defaultdict(list)
        forwards: list[tuple[int, Forward, int]] = []  # (seq, forward, record ts)
        rec_ts: dict[int, int] = {}
        raw_at: dict[int, Message] = {}
        for m in batch:
            ts_ms = m.timestamp()[1]
            try:
                ev = codec.decode(m.value() or b"", ts_ms * 1000 if ts_ms > 0 else None)
            except InvalidEvent as exc:
                self._dlq(m, exc.reason, exc.detail)
                continue
            off = cast(int, m.offset())
            rec_ts[off] = ts_ms
            raw_at[off] = m
            if ev.type is EventType.ITEM_UPSERT:
                forwards.append((off * FORWARD_SLOTS, upsert_forward(ev), ts_ms))
                continue
            assert ev.user_id is not None
            per_user[ev.user_id].append((off, ev))
        self.stats.events += len(batch)
        users = list(per_user)
        states = self._fetch(shard, [STATE_PREFIX + u.encode() for u in users], pending, serde.decode_user)
        puts: dict[bytes, bytes] = {}
        changelog = self.settings.topics.user_changelog
        work: list[tuple[str, UserState | None, list[Event]]] = []
        offsets: list[list[int]] = []
        for uid, state in zip(users, states, strict=True):
            evs = per_user[uid]
            guard = state.offsets.get(topic, -1) if state is not None else -1
            fresh = [(o, e) for o, e in evs if o > guard]
            self.stats.redelivered += len(evs) - len(fresh)
            if fresh:
                work.append((uid, state, [e for _, e in fresh]))
                offsets.append([o for o, _ in fresh])
        results = apply_user_batch(work, self.cfg, self.replica, in_place=True)  # states decoded fresh
        for (uid, _, _), offs, (new, out) in zip(work, offsets, results, strict=True):
            new.offsets[topic] = max(offs)
            self.stats.duplicates += len(out.duplicates)
            for i in out.late_src:
                self._dlq(raw_at[offs[i]], "late_event",
                          "older than the user's newest event minus the allowed lateness")  # fmt: skip
            for seq, fw, i in zip(forward_seqs(out, offs), out.forwards, out.forward_src, strict=True):
                forwards.append((seq, fw, rec_ts[offs[i]]))
            key = STATE_PREFIX + uid.encode()
            value = serde.encode_user(new)
            puts[key] = value
            shard.remember(key, new)
            self._produce(changelog, uid.encode(), value, shard.partition)
        self._produce_forwards(src, forwards)
        nxt = str(cast(int, batch[-1].offset()) + 1).encode()
        off_key = _off_key(topic, shard.partition)
        puts[off_key] = nxt
        self._produce(changelog, off_key, nxt, shard.partition)
        return puts

    def _produce_forwards(self, src: int, forwards: list[tuple[int, Forward, int]]) -> None:
        """Produce a batch's forwards as one pack per item partition (in seq order, ``PACK_FORWARDS`` at most each).

        The partition of an item is the one its state lives on (``partition_for`` over the item id,
        Kafka's default partitioner), as when every forward was a record keyed by item id.
        """
        if not forwards:
            return
        forwards.sort(key=_first)
        part = self._item_partition
        per_part: dict[int, list[tuple[int, Forward, int]]] = defaultdict(list)
        for t in forwards:
            per_part[part(t[1].item_id)].append(t)
        by_item = self.settings.topics.by_item
        for p, fws in per_part.items():
            for i in range(0, len(fws), PACK_FORWARDS):
                chunk = fws[i : i + PACK_FORWARDS]
                self._produce(by_item, None, serde.encode_forward_pack(src, chunk), p, chunk[0][2])
        self.stats.forwards += len(forwards)

    def _item_batch(
        self, shard: _Shard, topic: str, batch: list[Message], pending: dict[bytes, bytes], fresh_ts: list[int]
    ) -> dict[bytes, bytes]:
        per_item: dict[str, list[tuple[int, Forward]]] = defaultdict(list)
        hwm = shard.src_hwm
        touched_src: set[int] = set()
        for m in batch:
            src, seqs, pack, stamps = serde.decode_forward_pack(m.value() or b"")
            self.stats.item_records += len(pack)
            # seqs increase within a pack and across one source's packs: what a re-send repeats is a prefix
            start = bisect_right(seqs, hwm.get(src, -1))
            self.stats.resent_forwards += start
            if start == len(pack):
                continue
            hwm[src] = seqs[-1]
            touched_src.add(src)
            off = cast(int, m.offset())
            for fw in pack[start:] if start else pack:
                per_item[fw.item_id].append((off, fw))
            fresh_ts.extend(stamps[start:] if start else stamps)
        items = list(per_item)
        states = self._fetch(shard, [STATE_PREFIX + i.encode() for i in items], pending, serde.decode_item)
        puts: dict[bytes, bytes] = {}
        changelog = self.settings.topics.item_changelog
        work: list[tuple[str, ItemState | None, list[Forward]]] = []
        last: list[int] = []
        for iid, state in zip(items, states, strict=True):
            fws = per_item[iid]
            guard = state.offsets.get(topic, -1) if state is not None else -1
            fresh = [(o, f) for o, f in fws if o > guard]
            self.stats.redelivered += len(fws) - len(fresh)
            if fresh:
                work.append((iid, state, [f for _, f in fresh]))
                last.append(fresh[-1][0])
        for (iid, _, _), off, new in zip(work, last, apply_item_batch(work, self.cfg, in_place=True), strict=True):
            new.offsets[topic] = off
            key = STATE_PREFIX + iid.encode()
            value = serde.encode_item(new)
            puts[key] = value
            shard.remember(key, new)
            self._produce(changelog, iid.encode(), value, shard.partition)
            if new.vector is not None:
                self.replica.put(iid, new.vector)
        for src in touched_src:
            k = META_PREFIX + f"src:{src}".encode()
            puts[k] = str(hwm[src]).encode()
            self._produce(changelog, k, puts[k], shard.partition)  # restored with the shard
        nxt = str(cast(int, batch[-1].offset()) + 1).encode()
        off_key = _off_key(topic, shard.partition)
        puts[off_key] = nxt
        self._produce(changelog, off_key, nxt, shard.partition)
        return puts

    # -- stats ---------------------------------------------------------------------------------

    def _maybe_write_stats(self) -> None:
        now = time.monotonic()
        if now - self._last_stats >= self.settings.stats_interval_s:
            self._last_stats = now
            self.write_stats()

    def write_stats(self) -> None:
        """Write the stats snapshot to ``settings.stats_path`` (if set)."""
        path = self.settings.stats_path
        if path:
            tmp = f"{path}.tmp"
            Path(tmp).write_bytes(orjson.dumps(self.stats.snapshot()))
            Path(tmp).replace(path)
