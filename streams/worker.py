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

import gc
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

from streams import _compiled
from streams.codec import decode_at
from streams.config import Settings
from streams.core import serde
from streams.core.partition import partition_for
from streams.core.state import (
    FORWARD_SLOTS,
    CoreConfig,
    Forward,
    ItemEntry,
    ItemState,
    Outcome,
    UserState,
    apply_item_entries,
    apply_user_batch,
    forward_seqs,
    upsert_forward,
)
from streams.core.vectors import ItemReplica
from streams.errors import InvalidEvent, StateMismatch, StoreError
from streams.events import Event, EventType
from streams.store import META_PREFIX, STATE_PREFIX, Store, open_store, shard_path

# ItemReplica is re-exported
__all__ = ["ItemReplica", "StreamWorker", "WorkerStats", "reset_state", "restore_from_changelog"]

log = logging.getLogger(__name__)

#: the longest an empty fetch waits on the broker. Tansu answers a waiting fetch a few ms after data
#: arrives either way (measured: 3 ms at 10, 6 ms at 50), but every empty answer costs it ~1.5 ms
#: of CPU: an idle worker's 12 partitions kept 16% of a Tansu core busy at 10 ms, 3% at 50 ms
FETCH_WAIT_MS = 50

#: the worker's producers hold a batch's records until its ``flush`` (which sends at once, whatever the
#: linger): one produce request per producer a batch, one stored record batch per partition it writes
#: (up to librdkafka's ``batch.size``), instead of one every 2 ms while the batch runs (~15 a batch measured).
#: The embedded broker keeps every stored batch and lists a partition's batches on each fetch of it
#: (docs/ARCHITECTURE.md, "Tansu quirks"), so fewer batches cost it less for good. A changelog record
#: therefore leaves at the end of its batch, not during the item stage (a few ms at a live rate).
PRODUCE_LINGER_MS = 1000

#: the parts of a batch that :attr:`WorkerStats.phase_s` times
PHASES = ("idle", "tail", "consume", "apply", "deliver", "write", "forwards")

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
    #: waits for a batch's own forwards (``Settings.forward_wait_s``), their total seconds, and how
    #: many ended at the limit without them
    forward_waits: int = 0
    forward_wait_total_s: float = 0.0
    forward_wait_timeouts: int = 0
    #: forward packs applied from their delivery reports, without being read back (``_apply_own_packs``)
    own_packs_inline: int = 0
    #: where the loop's wall time went since the last :meth:`reset_freshness`, in seconds: ``idle``
    #: (the pause after a small batch, ``Settings.min_batch_interval_s``), ``tail`` (the item-vector
    #: replica's changelog tail), ``consume`` (the poll for input), ``apply`` (the stages' compute and
    #: produce calls), ``deliver`` (waiting for the broker to acknowledge what was produced), ``write``
    #: (the shards' WriteBatches) and ``forwards`` (waiting for the batch's own forwards; applying them
    #: counts in apply/deliver/write). With ``window_batches`` and ``window_records``: the cycle a
    #: record waits through, and what it is made of
    phase_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    window_batches: int = 0
    window_records: int = 0
    #: the longest batch (a step that consumed records, its waits included) in the same window, in ms,
    #: and the CPU seconds of the loop's thread in those batches (``time.thread_time``)
    window_max_batch_ms: float = 0.0
    window_cpu_s: float = 0.0
    #: the cyclic garbage collector's pauses in the same window (``gc.callbacks``): seconds in all, the
    #: longest in ms, and how many
    gc_s: float = 0.0
    gc_max_ms: float = 0.0
    gc_runs: int = 0
    first_batch_at: float | None = None
    last_batch_at: float | None = None
    #: CPU seconds of the loop's thread (``time.thread_time``) when the first batch began and when the
    #: last one ended: with ``events``, what an event costs the thread every event goes through
    first_batch_cpu_s: float | None = None
    last_batch_cpu_s: float | None = None
    user_fresh_ms: list[float] = field(default_factory=list)
    item_fresh_ms: list[float] = field(default_factory=list)

    #: (samples added so far, p50/p99 of both lists) as of the last snapshot
    _fresh_cache: tuple[int, list[float | None]] = (-1, [])
    _gc_began: float = 0.0
    fresh_added: int = 0

    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        """A ``gc.callbacks`` hook: time the collector's pauses."""
        if phase == "start":
            self._gc_began = time.perf_counter()
            return
        took = time.perf_counter() - self._gc_began
        self.gc_s += took
        self.gc_runs += 1
        if took * 1000 > self.gc_max_ms:
            self.gc_max_ms = took * 1000

    def reset_freshness(self) -> None:
        """Forget the freshness samples and the phase times (e.g. between benchmark phases)."""
        self.user_fresh_ms = []
        self.item_fresh_ms = []
        self.phase_s = dict.fromkeys(PHASES, 0.0)
        self.window_batches = 0
        self.window_records = 0
        self.window_max_batch_ms = 0.0
        self.window_cpu_s = 0.0
        self.gc_s = 0.0
        self.gc_max_ms = 0.0
        self.gc_runs = 0
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
            "forward_waits": self.forward_waits,
            "forward_wait_total_s": round(self.forward_wait_total_s, 3),
            "forward_wait_timeouts": self.forward_wait_timeouts,
            "own_packs_inline": self.own_packs_inline,
            "phase_s": {k: round(v, 4) for k, v in self.phase_s.items()},
            "window_batches": self.window_batches,
            "window_records": self.window_records,
            "window_max_batch_ms": round(self.window_max_batch_ms, 1),
            "window_cpu_s": round(self.window_cpu_s, 4),
            "gc_s": round(self.gc_s, 4),
            "gc_max_ms": round(self.gc_max_ms, 1),
            "gc_runs": self.gc_runs,
            "build": _compiled.build(),
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
            "item_records": self.item_records,
            "first_batch_at": self.first_batch_at,
            "last_batch_at": self.last_batch_at,
            "first_batch_cpu_s": self.first_batch_cpu_s,
            "last_batch_cpu_s": self.last_batch_cpu_s,
            "idle_s": None if self.last_batch_at is None else time.time() - self.last_batch_at,
            "user_fresh_p50_ms": u50,
            "user_fresh_p99_ms": u99,
            "item_fresh_p50_ms": i50,
            "item_fresh_p99_ms": i99,
        }


_S = TypeVar("_S", UserState, ItemState)
_T = TypeVar("_T", Event, ItemEntry)
_first = itemgetter(0)


def _off_key(topic: str, partition: int) -> bytes:
    return META_PREFIX + f"off:{topic}:{partition}".encode()


_UPSERT = EventType.ITEM_UPSERT

# Message's methods, unbound: a call through them skips the method lookup on every record (~80
# instructions each; the loops below call three per record)
_msg_error = Message.error
_msg_topic = Message.topic
_msg_partition = Message.partition
_msg_value = Message.value
_msg_offset = Message.offset
_msg_timestamp = Message.timestamp

# -- the per-record loops ------------------------------------------------------------------
# Module-level functions (not methods): streams/worker.pxd gives their locals C types when the
# module is compiled, and calls between them are direct C calls there.

#: one key's input of a batch: the source offsets and, in the same order, the events (forwards)
_UserInput = tuple[list[int], list[Event]]
_ItemInput = tuple[list[int], list[ItemEntry]]


def _lowest(xs: list[int]) -> int:
    """``min(xs)`` of a non-empty list (the builtin costs a call with keyword parsing; typed, this is a C loop)."""
    low = xs[0]
    for i in range(1, len(xs)):  # (from the second: most lists have one element, and need no comparison)
        x = xs[i]
        if x < low:
            low = x
    return low


def _highest(xs: list[int]) -> int:
    """``max(xs)`` of a non-empty list (see ``_lowest``)."""
    high = xs[0]
    for x in xs:
        if x > high:
            high = x
    return high


def _send(
    producer: Producer,
    topic: str,
    value: bytes,
    key: bytes | None,
    partition: int,
    ts_ms: int = 0,
    on_delivery: Callable[[KafkaError | None, Message], None] | None = None,
) -> None:
    """Produce one record, polling while the client's queue is full."""
    while True:
        try:
            # positional: confluent-kafka parses keyword arguments at ~0.6 us a record, and each
            # argument given costs ~100 instructions more (the changelog's records need only four)
            if ts_ms == 0 and on_delivery is None:
                producer.produce(topic, value, key, partition)
            else:
                producer.produce(topic, value, key, partition, on_delivery, None, ts_ms)
            return
        except BufferError:
            producer.poll(0.01)


def _cache_put(cache: dict[str, Any], limit: int, key: str, state: object) -> None:
    """Put ``state`` in ``cache`` as the most recently used entry; evict the oldest tenth when over ``limit``."""
    if limit <= 0:
        return
    cache.pop(key, None)
    cache[key] = state
    if len(cache) > limit:
        for old in list(itertools.islice(cache, len(cache) - limit + limit // 10)):
            del cache[old]


def _share_cache(shards: list[_Shard], budget: int) -> None:
    """Set each shard's cache limit so that all shards together hold about ``budget`` states.

    A shard may grow into whatever the others leave free, and always to an equal share: the
    stages need very different room (50k users and 20k items over the same shard count), and an
    equal split per shard left user shards evicting and re-reading states while item shards sat
    half empty (12% misses on benchmarks/ingest.py; after it, only first sights of new keys). A
    shard over its limit evicts its own oldest entries (``_cache_put``); one batch's new states may
    overshoot the budget.
    """
    if not shards:
        return
    free = budget - sum([len(shard.cache) for shard in shards])
    fair = budget // len(shards)
    for shard in shards:
        held = len(shard.cache)
        shard.cache_entries = max(held + free, fair) if budget > 0 else 0


def _put_state(
    key: bytes,
    raw_key: bytes,
    key_id: str,
    state: object,
    value: bytes,
    puts: dict[bytes, bytes],
    cache: dict[str, Any],
    limit: int,
    producer: Producer,
    produce: Callable[..., None],
    changelog: str,
    partition: int,
) -> None:
    """A new state's encoded ``value``: into the batch's ``puts`` and the changelog, and ``state`` into the cache.

    ``key`` is the store's key (``STATE_PREFIX + raw_key``), ``raw_key`` the changelog's: both built once
    a batch, for the fetch (:func:`_state_keys`); the cache is keyed by the id, ``key_id``. ``produce`` is
    ``producer.produce``, bound once a batch (a call through the method cost a method lookup a record,
    compiled); a full queue is handled as :func:`_send` does.
    """
    puts[key] = value
    _cache_put(cache, limit, key_id, state)
    try:
        produce(changelog, value, raw_key, partition)  # (positional: see _send)
    except BufferError:
        producer.poll(0.01)
        _send(producer, changelog, value, raw_key, partition)


def _state_keys(ids: list[str]) -> tuple[list[bytes], list[bytes]]:
    """The changelog keys (the ids' UTF-8) and store keys (``STATE_PREFIX`` + those) of ``ids``."""
    raw: list[bytes] = []
    keys: list[bytes] = []
    prefix = STATE_PREFIX
    for i in ids:  # (typed str and bytes, compiled: direct C calls, not a method lookup an id)
        r = i.encode()
        raw.append(r)
        keys.append(prefix + r)
    return raw, keys


def _fetch_states(
    cache: dict[str, Any],
    store: Store,
    ids: list[str],
    keys: list[bytes],
    pending: dict[bytes, bytes],
    decode: Callable[[bytes], _S],
) -> tuple[list[_S | None], int]:
    """Decoded states of ``ids`` (the cache, by id; then the batch's unwritten values and the store, by their store
    ``keys``); the cache misses."""
    if len(ids) != len(keys):
        raise ValueError("one key per id")
    out: list[_S | None] = [cache.get(key_id) for key_id in ids]
    missing = [i for i, s in enumerate(out) if s is None]
    if not missing:
        return out, 0
    from_store = [i for i in missing if keys[i] not in pending]
    for i, raw in zip(from_store, store.multi_get([keys[i] for i in from_store]), strict=True):
        if raw is not None:
            out[i] = decode(raw)
    for i in missing:
        raw = pending.get(keys[i])
        if raw is not None:
            out[i] = decode(raw)
    return out, len(missing)


def _part_offset(m: Message) -> tuple[int, int]:
    return cast(int, _msg_partition(m)), cast(int, _msg_offset(m))


def _by_partition(msgs: list[Message]) -> dict[tuple[str, int], list[Message]]:
    """The consumed records by (topic, partition), in order; consumer errors are logged and skipped."""
    groups: dict[tuple[str, int], list[Message]] = {}
    mine: list[Message] = []
    last_topic: str | None = None
    last_partition = -1
    for m in msgs:
        err = _msg_error(m)
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer error: %s", err)
            continue
        topic = _msg_topic(m)
        partition = _msg_partition(m)
        assert topic is not None and partition is not None
        # a consume returns runs of one partition's records: look the group up once a run
        if partition != last_partition or topic != last_topic:
            key = (topic, partition)
            found = groups.get(key)
            if found is None:
                found = groups[key] = []
            mine = found
            last_topic = topic
            last_partition = partition
        mine.append(m)
    return groups


def _group_user_events(
    batch: list[Message],
    forwards: list[tuple[int, Forward, int]],
    rec_ts: dict[int, int],
    rejected: list[tuple[Message, str, str]],
    stamps: list[int],
) -> dict[str, _UserInput]:
    """Decode a user-stage batch into each user's offsets and events, in batch (offset) order.

    Item upserts skip the user stage: their forwards go to ``forwards``. Records that do not decode
    go to ``rejected`` with the reason and detail. ``rec_ts`` gets each decoded record's timestamp,
    ``stamps`` every record's, in batch order.
    """
    per_user: dict[str, _UserInput] = {}
    for m in batch:
        ts_ms = _msg_timestamp(m)[1]
        stamps.append(ts_ms)
        try:
            # (the record's timestamp is the future check's reference: a C integer there; compiled, decode_at is
            # cimported, a C call)
            ev = decode_at(_msg_value(m) or b"", ts_ms)
        except InvalidEvent as exc:
            rejected.append((m, exc.reason, exc.detail))
            continue
        off = _msg_offset(m)
        assert off is not None  # (a consumed record has one; typing.cast would be a Python call per record)
        rec_ts[off] = ts_ms
        if ev.type is _UPSERT:
            forwards.append((off * FORWARD_SLOTS, upsert_forward(ev), ts_ms))
            continue
        uid = ev.user_id
        assert uid is not None
        # most users have one event a batch: their input is made first and stored by one dict operation
        fresh = ([off], [ev])
        mine = per_user.setdefault(uid, fresh)
        if mine is not fresh:
            mine[0].append(off)
            mine[1].append(ev)
    return per_user


def _past_guards(
    keys: list[str], states: list[_S | None], inputs: dict[str, tuple[list[int], list[_T]]], topic: str
) -> tuple[list[tuple[str, _S | None, list[_T]]], list[list[int]], int]:
    """The core's work: each key's input past its state's offset guard for ``topic``.

    Returns the work items, the offsets of each one's input and how many inputs were dropped as
    redelivered (at or below the guard: the state already includes them).
    """
    if len(keys) != len(states):
        raise ValueError("one state per key")
    work: list[tuple[str, _S | None, list[_T]]] = []
    offsets: list[list[int]] = []
    dropped = 0
    for i in range(len(keys)):
        key = keys[i]
        state = states[i]
        offs, xs = inputs[key]
        guard = -1
        if state is not None:
            # the state's offsets read as a C struct member (compiled) when its type is known: a generic
            # attribute lookup cost ~130 instructions a key
            if type(state) is UserState:
                user: UserState = state
                applied = user.offsets
            elif type(state) is ItemState:
                item: ItemState = state
                applied = item.offsets
            else:
                applied = state.offsets
            guard = applied.get(topic, -1)  # (typed: an inlined dict lookup, not a method call)
        if guard >= _lowest(offs):  # a redelivery: keep what is past the guard
            fresh = [k for k in range(len(offs)) if offs[k] > guard]
            dropped += len(offs) - len(fresh)
            if not fresh:
                continue
            offs = [offs[k] for k in fresh]
            xs = [xs[k] for k in fresh]
        work.append((key, state, xs))
        offsets.append(offs)
    return work, offsets, dropped


def _group_forward_packs(
    batch: list[Message], hwm: dict[int, int], touched_src: set[int], fresh_ts: list[int]
) -> tuple[dict[str, _ItemInput], Any, Any, int, int]:
    """Decode an item-stage batch of forward packs into each item's offsets and entries.

    Forwards at or below their source's high-water mark in ``hwm`` are re-sent ones and are
    skipped; ``hwm`` and ``touched_src`` are updated. Returns the items' input, the batch's user
    vector matrix and score array the entries index (:func:`streams.core.state.apply_item_entries`),
    the forwards read and the forwards skipped.
    """
    per_item: dict[str, _ItemInput] = {}
    read = resent = 0
    vec_blocks: list[Any] = []
    score_blocks: list[Any] = []
    dim = rows = n_scores = 0
    decode = serde.decode_forward_entries
    for m in batch:
        src, seqs, items, item_of, entries, stamps, pack_dim, vec_block, score_block = decode(
            _msg_value(m) or b"", rows, n_scores
        )
        n = len(entries)
        read += n
        # seqs increase within a pack and across one source's packs: what a re-send repeats is a prefix
        start = bisect_right(seqs, hwm.get(src, -1))
        resent += start
        if start == n:
            continue  # (its blocks are left out: the next pack's entries count from the same bases)
        hwm[src] = seqs[-1]
        touched_src.add(src)
        if pack_dim:
            if dim and pack_dim != dim:
                raise StoreError(f"forward packs of one batch hold user vectors of {dim} and {pack_dim} floats")
            dim = pack_dim
            vec_blocks.append(vec_block)
            rows += len(vec_block) // (4 * dim)
        if len(score_block):
            score_blocks.append(score_block)
            n_scores += len(score_block) // 8
        off = _msg_offset(m)
        assert off is not None
        # each of the pack's items' input, found in per_item at the item's first entry: a list index a
        # forward, a dict lookup an item
        inputs: list[_ItemInput | None] = [None] * len(items)
        for i in range(start, n):
            j = item_of[i]
            mine = inputs[j]
            if mine is None:
                iid = items[j]
                mine = per_item.get(iid)
                if mine is None:
                    mine = per_item[iid] = ([], [])
                inputs[j] = mine
            mine[0].append(off)
            mine[1].append(entries[i])
        fresh_ts.extend(stamps[start:] if start else stamps)
    U, S = serde.entry_arrays(dim, vec_blocks, score_blocks)
    return per_item, U, S, read, resent


def _store_users(
    work: list[tuple[str, UserState | None, list[Event]]],
    offsets: list[list[int]],
    results: list[tuple[UserState, Outcome]],
    topic: str,
    rec_ts: dict[int, int],
    forwards: list[tuple[int, Forward, int]],
    late: list[int],
    puts: dict[bytes, bytes],
    shard: _Shard,
    producer: Producer,
    changelog: str,
    ids: list[str],
    raw_keys: list[bytes],
    keys: list[bytes],
) -> int:
    """Take the core's new user states: offset guards, forwards, ``puts``, the cache and the changelog.

    ``ids`` are the batch's users (``work`` holds some of them, in their order) and ``raw_keys``/``keys``
    their keys (:func:`_state_keys`). The offsets of late events (for the DLQ) go to ``late``; returns
    the number of duplicates.
    """
    if not len(work) == len(offsets) == len(results):
        raise ValueError("one result per work item")
    if not len(ids) == len(raw_keys) == len(keys):
        raise ValueError("one key per id")
    news: list[UserState] = []
    duplicates = 0
    for n in range(len(work)):
        offs = offsets[n]
        new, out = results[n]
        news.append(new)
        applied = new.offsets  # (typed: a C dict store, not a generic item assignment)
        applied[topic] = _highest(offs)
        duplicates += len(out.duplicates)
        for i in out.late_src:
            late.append(offs[i])
        seqs = forward_seqs(out, offs)
        fws = out.forwards
        fw_src = out.forward_src
        if not len(seqs) == len(fws) == len(fw_src):
            raise ValueError("one sequence number and source per forward")
        last_src = -1
        for j in range(len(fws)):
            src = fw_src[j]  # (a C index, compiled: ``offs[src]`` is a direct list read)
            if src != last_src:  # a record's forwards (a slate's) are consecutive: its timestamp looked up once
                ts_ms = rec_ts[offs[src]]
                last_src = src
            forwards.append((seqs[j], fws[j], ts_ms))
    values = serde.encode_users(news)  # (with their offsets: encoded after the loop above)
    _put_states(work, news, values, ids, raw_keys, keys, puts, shard, producer, changelog)
    return duplicates


def _put_states(
    work: list[Any],
    news: list[Any],
    values: list[bytes],
    ids: list[str],
    raw_keys: list[bytes],
    keys: list[bytes],
    puts: dict[bytes, bytes],
    shard: _Shard,
    producer: Producer,
    changelog: str,
) -> None:
    """:func:`_put_state` of each work item's new state and encoded value, with its id's keys."""
    if not len(work) == len(news) == len(values):
        raise ValueError("one state and value per work item")
    cache = shard.cache
    limit = shard.cache_entries
    partition = shard.partition
    produce = producer.produce
    at = 0
    for n in range(len(work)):
        key_id = work[n][0]
        # the work items are some of the ids, in order (the guards drop the fully redelivered ones): the
        # same string objects, so an identity test finds each one's keys
        while ids[at] is not key_id:
            at += 1
        _put_state(
            keys[at], raw_keys[at], key_id, news[n], values[n], puts, cache, limit, producer, produce, changelog,
            partition,
        )  # fmt: skip


def _send_forward_packs(
    producer: Producer,
    topic: str,
    src: int,
    forwards: list[tuple[int, Forward, int]],
    part_memo: dict[str, int],
    partitions: int,
    on_delivery: Callable[[KafkaError | None, Message], None] | None = None,
) -> None:
    """Produce ``forwards`` as packs per item partition: in seq order, ``PACK_FORWARDS`` at most each.

    ``part_memo`` remembers item ids' partitions (cleared when it holds ``_ITEM_PART_MEMO``);
    ``on_delivery`` is each pack's delivery callback.
    """
    forwards.sort(key=_first)
    # each item partition's forwards, by partition number (a list: no dict lookup a forward), and the
    # partitions in order of first appearance (the order their packs are produced in)
    per_part: list[list[tuple[int, Forward, int]] | None] = [None] * partitions
    found: list[int] = []
    for t in forwards:
        iid = t[1].item_id
        p = part_memo.get(iid)
        if p is None:
            if len(part_memo) >= _ITEM_PART_MEMO:  # bounded: 1M items would hold ~100 MB
                part_memo.clear()
            p = part_memo[iid] = partition_for(iid, partitions)
        n = p  # (a C index, compiled)
        mine = per_part[n]
        if mine is None:
            per_part[n] = [t]
            found.append(p)
        else:
            mine.append(t)
    for p in found:
        fws = per_part[p]
        assert fws is not None
        for i in range(0, len(fws), PACK_FORWARDS):
            chunk = fws[i : i + PACK_FORWARDS]
            _send(producer, topic, serde.encode_forward_pack(src, chunk), None, p, chunk[0][2], on_delivery)


def _store_items(
    work: list[tuple[str, ItemState | None, list[ItemEntry]]],
    offsets: list[list[int]],
    results: list[ItemState],
    topic: str,
    puts: dict[bytes, bytes],
    shard: _Shard,
    producer: Producer,
    changelog: str,
    replica: ItemReplica,
    ids: list[str],
    raw_keys: list[bytes],
    keys: list[bytes],
) -> None:
    """Take the core's new item states: offset guards, ``puts``, the cache, the changelog and the replica.

    ``ids``, ``raw_keys`` and ``keys``: as for :func:`_store_users`.
    """
    if not len(work) == len(offsets) == len(results):
        raise ValueError("one result per work item")
    if not len(ids) == len(raw_keys) == len(keys):
        raise ValueError("one key per id")
    for n in range(len(work)):
        new = results[n]
        applied = new.offsets  # (typed, as in _store_users)
        applied[topic] = offsets[n][-1]
    values = serde.encode_items(results)  # (with their offsets: encoded after the loop above)
    _put_states(work, results, values, ids, raw_keys, keys, puts, shard, producer, changelog)
    with_vector: list[str] = []
    vectors: list[Any] = []
    for n in range(len(work)):
        new = results[n]
        if new.vector is not None:
            with_vector.append(work[n][0])
            vectors.append(new.vector)
    if vectors:
        replica.put_many(with_vector, vectors)  # (one row scatter: a row assignment an item cost ~3.4k)


class _Shard:
    """One stage's store for one partition, plus its cached meta and decoded states.

    ``cache`` holds decoded states by id, write-through: a state enters it only together with the
    write that stores it, and the cache lives and dies with the shard (dropped on revoke; a
    crash loses the process). States are mutated in place by the core before the commit, so
    ``step`` empties every shard's cache when a batch fails. Keyed by the id, not the store key:
    a dict of str keys is looked up by the str's cached hash through CPython's str-only path,
    where the store keys (bytes, new each batch) were hashed and compared through the generic one.
    """

    def __init__(self, store: Store, stage: str, partition: int, cache_entries: int = 0) -> None:
        self.store = store
        self.stage = stage
        self.partition = partition
        self.src_hwm: dict[int, int] = {}
        for key, value in store.scan(META_PREFIX + b"src:"):
            self.src_hwm[int(key[5:])] = int(value)
        self.cache: dict[str, Any] = {}
        self.cache_entries = cache_entries

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
        #: changelogs and the DLQ; delivery reports for failures only (``_delivery_failed``)
        self._producer: Producer | None = None
        #: forward packs; a delivery report for every pack (``_on_pack_delivered``: the same-step application
        #: of a batch's own forwards needs their bytes and offsets). Two producers, so that the many state
        #: records cost no success report each.
        self._pack_producer: Producer | None = None
        #: records whose delivery failed since the last check: (count, "topic[partition]: error" of the first)
        self._undelivered: tuple[int, str] = (0, "")
        self._tail: Consumer | None = None
        self._last_stats = 0.0
        #: monotonic time before which the next batch does not start (see ``Settings.min_batch_interval_s``)
        self._next_batch_at = 0.0
        #: input records consumed while waiting for forwards (``_apply_own_forwards``): the next batch's head
        self._carry: list[Message] = []
        #: the delivery reports of the packs this batch sent to this worker's own item partitions (with
        #: their bytes and offsets: ``_apply_own_packs`` applies them without reading them back, and
        #: ``_apply_own_forwards`` reads back the rest)
        self._own_packs: list[Message] = []
        #: own by-item partition -> the next offset its item stage applies (committed); records below it
        #: were applied from their delivery reports and are dropped when the consumer reads them
        self._item_next: dict[int, int] = {}
        #: the by-item partitions this worker's item stage owns
        self._own_items: set[int] = set()
        #: bumped on every assignment and revocation: records consumed before one are not applied after it
        self._generation = 0
        self.assigned = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish its current batch and exit."""
        self._stop.set()

    def _common(self) -> dict[str, Any]:
        return {"bootstrap.servers": self.settings.bootstrap_servers, "log_level": 3}

    def _producer_config(self) -> dict[str, Any]:
        return {**self._common(), "linger.ms": PRODUCE_LINGER_MS, "batch.num.messages": 10000,
                "queue.buffering.max.messages": 500000, "enable.idempotence": False, "acks": "all"}  # fmt: skip

    def start(self) -> None:
        """Connect, check the log epoch, subscribe."""
        from streams.broker import ensure_topics

        s = self.settings
        self._epoch = ensure_topics(s)
        if self.stats.on_gc not in gc.callbacks:
            gc.callbacks.append(self.stats.on_gc)
        # A record whose delivery fails (an error from the broker, or ``message.timeout.ms`` passed)
        # leaves the client's queue, so ``flush`` alone reports success: the delivery reports catch it,
        # and the batch is not committed (``_check_delivered``).
        self._producer = Producer(
            {**self._producer_config(), "delivery.report.only.error": True, "on_delivery": self._delivery_failed}
        )
        self._pack_producer = Producer(self._producer_config())
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
        if self.stats.on_gc in gc.callbacks:
            gc.callbacks.remove(self.stats.on_gc)
        if self._consumer is not None:
            self._consumer.close()
        if self._tail is not None:
            self._tail.close()
        for producer in (self._producer, self._pack_producer):
            if producer is not None:
                producer.flush(10)
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
            shard = self._shards[key] = _Shard(store, stage, partition)
        return shard

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        try:
            for tp in partitions:
                stage = "item" if tp.topic == self.settings.topics.by_item else "user"
                nxt = self._shard(stage, tp.partition).next_offset(tp.topic)
                tp.offset = OFFSET_BEGINNING if nxt is None else nxt
            consumer.assign(partitions)
            self._generation += 1
            self._carry = []
            by_item = self.settings.topics.by_item
            self._own_items = {tp.partition for tp in partitions if tp.topic == by_item}
            self._item_next = {tp.partition: tp.offset for tp in partitions if tp.topic == by_item and tp.offset >= 0}
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
        self._generation += 1
        self._carry = []  # read again from the stored offsets by whoever owns them next
        self._own_items = set()
        self._item_next = {}
        self.assigned.clear()

    # -- the loop ----------------------------------------------------------------------------

    def _tail_replica(self) -> None:
        assert self._tail is not None
        msgs = self._tail.consume(50000, 0)
        # each item's newest vector, the items in order of first appearance: one put_many (a row scatter)
        # leaves the replica as a put per record would (a new item's row is its first put's), for ~3k
        # instructions a record less
        latest: dict[str, Any] = {}
        for m in msgs:
            if m.error():
                continue
            key = m.key()
            value = m.value()
            if not key or not value or key[:1] == META_PREFIX:
                continue
            vec = serde.vector_of(value)
            if vec is not None:
                latest[key.decode()] = vec
        if latest:
            self.replica.put_many(list(latest), list(latest.values()))

    def step(self) -> int:
        """Run one batch; returns the number of records consumed."""
        assert self._consumer is not None and self._producer is not None and self._pack_producer is not None
        phase = self.stats.phase_s
        linger = self._next_batch_at - time.monotonic()
        if linger > 0:
            stopped = self._stop.wait(linger)
            phase["idle"] += linger
            if stopped:
                return 0
        began = time.monotonic()
        started_ms = self.clock() * 1000.0
        started_cpu = time.thread_time()
        self._tail_replica()
        started = time.monotonic()
        msgs = self._consumer.consume(self.settings.batch_size, self.settings.poll_timeout_s)
        phase["tail"] += started - began
        phase["consume"] += time.monotonic() - started
        if self._carry:
            msgs = self._carry + msgs
            self._carry = []
        small = len(msgs) < self.settings.batch_size // 2
        self._next_batch_at = started + self.settings.min_batch_interval_s if msgs and small else 0.0
        if not msgs:
            self._producer.poll(0)
            self._pack_producer.poll(0)
            self._maybe_write_stats()
            return 0
        if self.stats.first_batch_at is None:
            self.stats.first_batch_at = self.clock()
            self.stats.first_batch_cpu_s = time.thread_time()
        groups = _by_partition(msgs)
        fresh_user: list[int] = []
        fresh_item: list[int] = []
        self._own_packs = []
        try:
            self._apply_and_commit(groups, fresh_user, fresh_item)
            wait = self.settings.forward_wait_s
            if len(msgs) < self.settings.batch_size and wait > 0:
                unread = self._apply_own_packs(fresh_item)
                if unread:
                    self._apply_own_forwards(wait, fresh_item, unread)
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
        self.stats.window_batches += 1
        self.stats.window_records += len(msgs)
        took_ms = now_ms - started_ms
        if took_ms > self.stats.window_max_batch_ms:
            self.stats.window_max_batch_ms = took_ms
        self.stats.last_batch_at = now_ms / 1000.0
        self.stats.last_batch_cpu_s = time.thread_time()
        self.stats.window_cpu_s += self.stats.last_batch_cpu_s - started_cpu
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
        phase = self.stats.phase_s
        t0 = time.monotonic()
        for topic, partition in groups:  # open the batch's shards first: the cache is shared among them all
            self._shard("item" if topic == by_item else "user", partition)
        _share_cache(list(self._shards.values()), self.settings.state_cache_entries)
        # user-stage groups first, then the item stage
        for (topic, partition), batch in sorted(groups.items(), key=lambda kv: kv[0][0] == by_item):
            stage = "item" if topic == by_item else "user"
            shard, pending = writes.setdefault((stage, partition), (self._shard(stage, partition), {}))
            if stage == "item":
                pending.update(self._item_batch(shard, topic, batch, pending, fresh_item))
            else:
                pending.update(self._user_batch(shard, topic, batch, pending, fresh_user))
        # forwards, changelogs and DLQ records must be durable before the states commit
        t1 = time.monotonic()
        self._check_delivered()
        t2 = time.monotonic()
        sync = self.settings.sync_writes
        for shard, puts in writes.values():
            shard.store.write(puts, sync=sync)
        t3 = time.monotonic()
        for (topic, partition), batch in groups.items():
            if topic == by_item and partition in self._own_items:
                nxt = cast(int, _msg_offset(batch[-1])) + 1
                if nxt > self._item_next.get(partition, -1):
                    self._item_next[partition] = nxt
        phase["apply"] += t1 - t0
        phase["deliver"] += t2 - t1
        phase["write"] += t3 - t2

    def _check_delivered(self) -> None:
        """Wait until every record produced so far is acknowledged; raise (no commit) when one is not."""
        assert self._producer is not None and self._pack_producer is not None
        remaining = self._producer.flush(30) + self._pack_producer.flush(30)
        failed, first = self._undelivered
        self._undelivered = (0, "")
        if remaining or failed:
            raise RuntimeError(
                f"{remaining + failed} records not delivered to the broker ({remaining} still queued, {failed} "
                f"failed{': ' + first if first else ''}); not committing the batch"
            )

    def _delivery_failed(self, err: KafkaError | None, msg: Message) -> None:
        """A delivery report (served inside ``flush``/``poll``): count the failures."""
        if err is not None:
            failed, first = self._undelivered
            self._undelivered = (failed + 1, first or f"{msg.topic()}[{msg.partition()}]: {err.str()}")

    def _on_pack_delivered(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._delivery_failed(err, msg)
            return
        if msg.partition() in self._own_items:
            self._own_packs.append(msg)

    def _apply_own_packs(self, fresh_item: list[int]) -> dict[int, int]:
        """Apply the forward packs the batch sent to this worker's own item partitions from their delivery reports.

        A delivery report holds the pack's bytes and offset, so the item stage need not read the pack
        back from the broker: the same records, applied at the same offsets, in the same step. Only a
        partition's packs that directly follow what its item stage applied last qualify (no other
        worker's record in between, nothing unread); the rest are read back (``_apply_own_forwards``)
        or in a later batch. The consumer reads the applied packs later and they are dropped by offset
        (``_item_batch``). A crash before the commit leaves them to be read and applied then.

        Returns the rest: partition -> offset of the last pack there that was not applied.
        """
        packs = self._own_packs
        self._own_packs = []
        packs.sort(key=_part_offset)
        take: list[Message] = []
        unread: dict[int, int] = {}
        nxt = -1
        last_p = -1
        for m in packs:
            p, off = _part_offset(m)
            if p != last_p:
                last_p = p
                nxt = self._item_next.get(p, -1)
            if off == nxt:
                take.append(m)
                nxt += 1
            else:
                unread[p] = off  # (sorted: the last one written is the partition's last)
        if take:
            self.stats.own_packs_inline += len(take)
            self._apply_and_commit(_by_partition(take), [], fresh_item)
        return unread

    def _apply_own_forwards(self, wait_s: float, fresh_item: list[int], want: dict[int, int]) -> None:
        """Read back the forward packs the batch just sent to this worker's item partitions, and apply them.

        ``want``: partition -> offset of the last pack to read there. Up to ``wait_s``. Every forward
        record read is applied (other workers' too); the other records read (new input) are kept as the
        next batch's head. A
        rebalance while waiting (its callbacks run inside ``consume``) drops what was read before it:
        the assignment seeks to the stored offsets, so it is read again. What the same ``consume``
        returns after the callbacks comes from the new assignment and is kept, and the wait ends.
        """
        assert self._consumer is not None
        by_item = self.settings.topics.by_item
        began = time.monotonic()
        deadline = began + wait_s
        forwards: list[Message] = []
        carry: list[Message] = []
        while want:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            generation = self._generation
            msgs = self._consumer.consume(self.settings.batch_size, min(left, self.settings.poll_timeout_s))
            if self._generation != generation:
                forwards, carry, want = [], [], {}
            for m in msgs:
                if m.topic() != by_item or m.error() is not None:
                    carry.append(m)  # errors too: the next batch logs them (``_by_partition``)
                    continue
                forwards.append(m)
                p = cast(int, m.partition())
                if cast(int, m.offset()) >= want.get(p, 1 << 62):
                    del want[p]
        stats = self.stats
        stats.forward_waits += 1
        stats.forward_wait_total_s += time.monotonic() - began
        stats.phase_s["forwards"] += time.monotonic() - began
        if want:
            stats.forward_wait_timeouts += 1
            log.debug("forward packs not read back within %.3f s: %s", wait_s, want)
        self._carry = carry
        if forwards:
            self._apply_and_commit(_by_partition(forwards), [], fresh_item)

    @staticmethod
    def _sample(store: list[float], ts_ms: list[int], now_ms: float) -> None:
        if not ts_ms:
            return
        step = max(1, len(ts_ms) // 64)
        store.extend(now_ms - t for t in ts_ms[::step] if t > 0)
        if len(store) > 50000:
            del store[:25000]

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

    def _fetch(
        self,
        shard: _Shard,
        ids: list[str],
        keys: list[bytes],
        pending: dict[bytes, bytes],
        decode: Callable[[bytes], _S],
    ) -> list[_S | None]:
        """Decoded states of ``ids`` (store ``keys``): the shard's cache, this batch's unwritten values, the store."""
        out, misses = _fetch_states(shard.cache, shard.store, ids, keys, pending, decode)
        self.stats.state_cache_hits += len(keys) - misses
        self.stats.state_cache_misses += misses
        return out

    def _user_batch(
        self, shard: _Shard, topic: str, batch: list[Message], pending: dict[bytes, bytes], fresh_ts: list[int]
    ) -> dict[bytes, bytes]:
        assert self._producer is not None
        producer = self._producer
        stats = self.stats
        src = self._src_id[topic] * 65536 + shard.partition  # one sequence per source partition
        forwards: list[tuple[int, Forward, int]] = []  # (seq, forward, record ts)
        rec_ts: dict[int, int] = {}
        rejected: list[tuple[Message, str, str]] = []
        per_user = _group_user_events(batch, forwards, rec_ts, rejected, fresh_ts)
        for m, reason, detail in rejected:
            self._dlq(m, reason, detail)
        stats.events += len(batch)
        users = list(per_user)
        raw_keys, keys = _state_keys(users)
        states = self._fetch(shard, users, keys, pending, serde.decode_user)
        work, offsets, redelivered = _past_guards(users, states, per_user, topic)
        stats.redelivered += redelivered
        results = apply_user_batch(work, self.cfg, self.replica, in_place=True)  # states decoded fresh
        puts: dict[bytes, bytes] = {}
        changelog = self.settings.topics.user_changelog
        late: list[int] = []
        stats.duplicates += _store_users(
            work, offsets, results, topic, rec_ts, forwards, late, puts, shard, producer, changelog, users, raw_keys,
            keys,
        )  # fmt: skip
        if late:
            raw_at = {cast(int, m.offset()): m for m in batch}
            for off in late:
                self._dlq(raw_at[off], "late_event", "older than the user's newest event minus the allowed lateness")
        self._produce_forwards(src, forwards)
        nxt = str(cast(int, batch[-1].offset()) + 1).encode()
        off_key = _off_key(topic, shard.partition)
        puts[off_key] = nxt
        _send(producer, changelog, nxt, off_key, shard.partition)
        return puts

    def _produce_forwards(self, src: int, forwards: list[tuple[int, Forward, int]]) -> None:
        """Produce a batch's forwards as one pack per item partition (in seq order, ``PACK_FORWARDS`` at most each).

        The partition of an item is the one its state lives on (``partition_for`` over the item id,
        Kafka's default partitioner), as when every forward was a record keyed by item id.
        """
        if not forwards:
            return
        assert self._pack_producer is not None
        _send_forward_packs(
            self._pack_producer, self.settings.topics.by_item, src, forwards, self._item_part, self.settings.partitions,
            self._on_pack_delivered,
        )  # fmt: skip
        self.stats.forwards += len(forwards)

    def _item_batch(
        self, shard: _Shard, topic: str, batch: list[Message], pending: dict[bytes, bytes], fresh_ts: list[int]
    ) -> dict[bytes, bytes]:
        assert self._producer is not None
        applied = self._item_next.get(shard.partition, -1)
        if cast(int, _msg_offset(batch[0])) < applied:  # packs applied from their delivery reports
            batch = [m for m in batch if cast(int, _msg_offset(m)) >= applied]
            if not batch:
                return {}
        producer = self._producer
        stats = self.stats
        hwm = shard.src_hwm
        touched_src: set[int] = set()
        per_item, U, S, read, resent = _group_forward_packs(batch, hwm, touched_src, fresh_ts)
        stats.item_records += read
        stats.resent_forwards += resent
        items = list(per_item)
        raw_keys, keys = _state_keys(items)
        states = self._fetch(shard, items, keys, pending, serde.decode_item)
        work, offsets, redelivered = _past_guards(items, states, per_item, topic)
        stats.redelivered += redelivered
        puts: dict[bytes, bytes] = {}
        changelog = self.settings.topics.item_changelog
        results = apply_item_entries(work, self.cfg, U, S, in_place=True)
        replica = self.replica
        _store_items(work, offsets, results, topic, puts, shard, producer, changelog, replica, items, raw_keys, keys)
        for src in touched_src:
            k = META_PREFIX + f"src:{src}".encode()
            puts[k] = str(hwm[src]).encode()
            _send(producer, changelog, puts[k], k, shard.partition)  # restored with the shard
        nxt = str(cast(int, batch[-1].offset()) + 1).encode()
        off_key = _off_key(topic, shard.partition)
        puts[off_key] = nxt
        _send(producer, changelog, nxt, off_key, shard.partition)
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
