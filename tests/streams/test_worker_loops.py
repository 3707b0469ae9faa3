"""The worker's per-record loops (module-level functions, typed in streams/worker.pxd) without a broker."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest
from confluent_kafka import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from streams import worker
from streams.core import serde
from streams.core.partition import partition_for
from streams.core.state import (
    FORWARD_SLOTS,
    CoreConfig,
    Forward,
    ItemState,
    Outcome,
    UserState,
    apply_item_batch,
    apply_item_entries,
)
from streams.events import EventType


def _msg(offset: int, value: bytes, ts_ms: int = 1_795_341_600_000, topic: str = "events") -> Message:
    return Message(topic=topic, partition=0, offset=offset, key=None, value=value, timestamp=(1, ts_ms))


def _event(i: int, user: str | None, etype: str = "click", item: str = "i1") -> bytes:
    ev: dict[str, Any] = {"event_id": f"e{i}", "type": etype, "item_id": item,
                          "event_time": "2026-11-22T10:00:00.250Z", "schema_version": 1}  # fmt: skip
    if user is not None:
        ev["user_id"] = user
    return orjson.dumps(ev)


class _Producer:
    """Records produce calls; the first ``full`` calls raise BufferError (a full queue)."""

    def __init__(self, full: int = 0) -> None:
        self.records: list[tuple[Any, ...]] = []
        self.full = full
        self.polls = 0

    def produce(self, *args: Any) -> None:
        if self.full:
            self.full -= 1
            raise BufferError
        self.records.append(args)

    def poll(self, timeout: float) -> int:
        self.polls += 1
        return 0


def test_send_polls_while_the_queue_is_full() -> None:
    p = _Producer(full=2)
    worker._send(p, "t", b"v", b"k", 3, 7)  # type: ignore[arg-type]
    assert p.records == [("t", b"v", b"k", 3, None, None, 7)] and p.polls == 2


def test_send_passes_only_the_arguments_it_needs() -> None:
    p = _Producer()
    worker._send(p, "t", b"v", b"k", 3)  # type: ignore[arg-type]  # a changelog record: no timestamp, no callback
    worker._send(p, "t", b"v", None, 3, 0, print)  # type: ignore[arg-type]
    assert p.records == [("t", b"v", b"k", 3), ("t", b"v", None, 3, print, None, 0)]


def test_cache_put_keeps_recent_entries_and_evicts_the_oldest_tenth() -> None:
    cache: dict[str, Any] = {}
    for i in range(20):
        worker._cache_put(cache, 20, str(i), i)
    worker._cache_put(cache, 20, "0", "again")  # now the most recent
    worker._cache_put(cache, 20, "new", "x")  # 21 > 20: drop 1 + 2 oldest
    assert list(cache)[-2:] == ["0", "new"] and cache["0"] == "again"
    assert len(cache) == 18 and "1" not in cache and "3" not in cache and "4" in cache
    worker._cache_put(cache, 0, "off", 1)
    assert "off" not in cache


class _Held:
    """A shard as ``_share_cache`` sees it: a cache and a limit."""

    def __init__(self, held: int) -> None:
        self.cache = {str(i): i for i in range(held)}
        self.cache_entries = -1


def test_share_cache_lets_a_busy_shard_grow_into_what_the_others_leave_free() -> None:
    users, items = _Held(50), _Held(5)
    share: Any = worker._share_cache  # (stand-in shards)
    share([users, items], 100)
    # 45 free: either shard may take all of it this batch, and neither is held below an equal share
    assert (users.cache_entries, items.cache_entries) == (95, 50)
    full, small = _Held(97), _Held(5)  # one batch overshot the budget by 2
    share([full, small], 100)
    assert (full.cache_entries, small.cache_entries) == (95, 50)  # the big shard evicts back under
    share([_Held(0)], 0)
    off = _Held(3)
    share([off], 0)
    assert off.cache_entries == 0  # 0 turns the cache off
    share([], 100)  # nothing open: nothing to do


class _Store:
    def __init__(self, data: dict[bytes, bytes]) -> None:
        self.data = data
        self.asked: list[bytes] = []

    def multi_get(self, keys: list[bytes]) -> list[bytes | None]:
        self.asked.extend(keys)
        return [self.data.get(k) for k in keys]


def test_fetch_states_reads_the_cache_then_the_pending_values_then_the_store() -> None:
    """The cache by id; the batch's pending values and the store by store key."""
    store = _Store({b"ka": b"A", b"kb": b"B-old", b"kc": b"C-old"})
    fetch: Any = worker._fetch_states  # (a fake store, str "states")
    ids = ["a", "b", "c", "d"]
    out, misses = fetch({"c": "cached", "kb": "not by key"}, store, ids, [b"ka", b"kb", b"kc", b"kd"], {b"kb": b"B"},
                        bytes.decode)  # fmt: skip
    assert out == ["A", "B", "cached", None] and misses == 3
    assert store.asked == [b"ka", b"kd"]  # never the store for a key with a pending value
    with pytest.raises(ValueError):
        fetch({}, store, ids, [b"ka"], {}, bytes.decode)


def test_group_user_events_groups_by_user_and_sets_aside_bad_records_and_upserts() -> None:
    batch = [_msg(10, _event(1, "u1")), _msg(11, b"{not json"), _msg(12, _event(2, "u2")),
             _msg(13, _event(3, None, "item_upsert", "i7")), _msg(14, _event(4, "u1"), ts_ms=0)]  # fmt: skip
    forwards: list[tuple[int, Forward, int]] = []
    rec_ts: dict[int, int] = {}
    rejected: list[tuple[Message, str, str]] = []
    stamps: list[int] = []
    per_user = worker._group_user_events(batch, forwards, rec_ts, rejected, stamps)
    assert list(per_user) == ["u1", "u2"]
    assert per_user["u1"][0] == [10, 14] and [e.event_id for e in per_user["u1"][1]] == ["e1", "e4"]
    assert [(m.offset(), reason) for m, reason, _ in rejected] == [(11, "bad_json")]
    assert [(seq, fw.item_id, ts) for seq, fw, ts in forwards] == [(13 * FORWARD_SLOTS, "i7", 1_795_341_600_000)]
    assert rec_ts == {10: 1_795_341_600_000, 12: 1_795_341_600_000, 13: 1_795_341_600_000, 14: 0}
    assert stamps == [1_795_341_600_000] * 4 + [0]


def test_past_guards_drops_what_the_states_already_include() -> None:
    ev = [f"x{i}" for i in range(5)]
    seen = UserState(offsets={"events": 11})
    other_topic = UserState(offsets={"impressions": 99})
    inputs = {"a": ([10, 11, 12], ev[:3]), "b": ([5], ev[3:4]), "c": ([7, 8], ev[:2]), "d": ([3], ev[4:])}
    work, offsets, dropped = worker._past_guards(  # type: ignore[type-var]
        ["a", "b", "c", "d"], [seen, UserState(offsets={"events": 5}), None, other_topic], inputs, "events"
    )
    assert [(k, xs) for k, _, xs in work] == [("a", ["x2"]), ("c", ["x0", "x1"]), ("d", ["x4"])]
    assert offsets == [[12], [7, 8], [3]] and dropped == 3
    with pytest.raises(ValueError):
        worker._past_guards(["a"], [], inputs, "events")  # type: ignore[type-var]


def test_past_guards_reads_the_offsets_of_either_state_type_and_of_any_object_with_them() -> None:
    """User and item states (typed reads, compiled) and another object with ``offsets`` guard alike."""

    class _Other:
        offsets = {"by-item": 4}

    inputs = {"a": ([4, 5], ["x0", "x1"]), "b": ([3, 4], ["x2", "x3"]), "c": ([4], ["x4"])}
    states: list[Any] = [ItemState(offsets={"by-item": 4}), UserState(offsets={"by-item": 3}), _Other()]
    work, offsets, dropped = worker._past_guards(["a", "b", "c"], states, inputs, "by-item")  # type: ignore[type-var]
    assert [(k, xs) for k, _, xs in work] == [("a", ["x1"]), ("b", ["x3"])] and offsets == [[5], [4]]
    assert dropped == 3


def test_store_users_gives_each_forward_its_seq_and_its_records_timestamp() -> None:
    """A slate's forwards (consecutive, one source record) share the record's timestamp; the next record's differ."""
    out = Outcome()
    out.forwards = [_fw(f"i{n}", n) for n in range(6)]
    out.forward_src = [0, 0, 0, 1, 2, 2]
    work: list[Any] = [("u1", None, ["e0", "e1", "e2"])]
    raw, keys = worker._state_keys(["u1"])
    forwards: list[Any] = []
    late: list[int] = []
    puts: dict[bytes, bytes] = {}
    p = _Producer()
    shard: Any = _Shard(10)
    rec_ts = {10: 1000, 11: 1100, 12: 1200}
    dups = worker._store_users(
        work, [[10, 11, 12]], [(UserState(), out)], "events", rec_ts, forwards, late, puts, shard, p, "chg", ["u1"],
        raw, keys,
    )  # fmt: skip
    s = FORWARD_SLOTS
    assert [(seq, ts) for seq, _, ts in forwards] == [
        (10 * s, 1000), (10 * s + 1, 1000), (10 * s + 2, 1000), (11 * s, 1100), (12 * s, 1200), (12 * s + 1, 1200)
    ]  # fmt: skip
    assert [f for _, f, _ in forwards] == out.forwards and dups == 0 and late == []
    assert list(puts) == [b"ku1"] and [r[2] for r in p.records] == [b"u1"]


def _fw(item: str, i: int) -> Forward:
    return Forward(item, f"e{i}", EventType.CLICK, 1_000 + i, "u1")


def test_send_forward_packs_packs_per_item_partition_in_seq_order() -> None:
    forwards = [(5, _fw("i1", 5), 50), (1, _fw("i2", 1), 10), (3, _fw("i1", 3), 30)]
    p = _Producer()
    memo: dict[str, int] = {}
    worker._send_forward_packs(p, "by-item", 9, forwards, memo, 4)  # type: ignore[arg-type]
    assert memo == {"i2": partition_for("i2", 4), "i1": partition_for("i1", 4)}
    got: dict[int, list[tuple[int, str]]] = {}
    for topic, value, key, part, _h, _x, ts in p.records:
        src, seqs, pack, stamps = serde.decode_forward_pack(value)
        assert (topic, key, src) == ("by-item", None, 9) and ts == stamps[0]
        got[part] = got.get(part, []) + list(zip(seqs, [f.item_id for f in pack], strict=True))
    assert sorted(s for pairs in got.values() for s, _ in pairs) == [1, 3, 5]
    for part, pairs in got.items():
        assert all(partition_for(iid, 4) == part for _, iid in pairs) and pairs == sorted(pairs)


def test_group_forward_packs_skips_what_a_resend_repeats() -> None:
    pack1 = serde.encode_forward_pack(7, [(1, _fw("i1", 1), 10), (2, _fw("i2", 2), 20)])
    pack2 = serde.encode_forward_pack(7, [(2, _fw("i2", 2), 20), (3, _fw("i1", 3), 30)])  # re-sends seq 2
    hwm: dict[int, int] = {}
    touched: set[int] = set()
    stamps: list[int] = []
    per_item, U, S, read, resent = worker._group_forward_packs([_msg(0, pack1), _msg(1, pack2)], hwm, touched, stamps)
    assert (read, resent, hwm, touched, stamps) == (4, 1, {7: 3}, {7}, [10, 20, 30])
    # entries are (type, ts_us, row, first score, scores, upsert): the forwards e1 and e3 (ts 1001, 1003)
    assert per_item["i1"][0] == [0, 1] and [e[1] for e in per_item["i1"][1]] == [1_001, 1_003]
    assert per_item["i2"][0] == [0] and [e[1] for e in per_item["i2"][1]] == [1_002]
    assert U is None and len(S) == 0  # no user vectors, no scores
    again, _, _, read, resent = worker._group_forward_packs([_msg(2, pack2)], hwm, set(), [])
    assert (again, read, resent) == ({}, 2, 2)


def test_by_partition_keeps_each_partitions_records_in_order_and_skips_errors() -> None:
    from confluent_kafka import KafkaError

    def m(topic: str, part: int, off: int) -> Message:
        return Message(topic=topic, partition=part, offset=off, value=b"")

    eof = Message(topic="a", partition=0, error=KafkaError(KafkaError._PARTITION_EOF))
    groups = worker._by_partition([m("a", 0, 1), m("b", 0, 7), eof, m("a", 1, 3), m("a", 0, 2)])
    assert {k: [x.offset() for x in v] for k, v in groups.items()} == {("a", 0): [1, 2], ("b", 0): [7], ("a", 1): [3]}
    # runs of one partition (what a consume returns), one broken by an error, and a run that returns
    runs = [m("a", 0, 1), m("a", 0, 2), eof, m("a", 0, 3), m("b", 0, 7), m("b", 0, 8), m("a", 0, 4), m("b", 1, 9)]
    groups = worker._by_partition(runs)
    assert list(groups) == [("a", 0), ("b", 0), ("b", 1)]
    assert {k: [x.offset() for x in v] for k, v in groups.items()} == {
        ("a", 0): [1, 2, 3, 4], ("b", 0): [7, 8], ("b", 1): [9]
    }  # fmt: skip


def test_lowest_and_highest_are_min_and_max() -> None:
    for xs in ([3], [5, 2, 9, 2], [10, 11, 12], [2**70, -1, 0]):
        assert (worker._lowest(xs), worker._highest(xs)) == (min(xs), max(xs))
    with pytest.raises(IndexError):
        worker._lowest([])


@st.composite
def _item_forwards(draw: Any) -> list[tuple[int, Forward, int]]:
    """(seq, forward, ts ms) of a few source records: views and clicks with user vectors and 0-3 negatives'
    scores (mostly the same number), impressions without, and upserts (eligibility, a bootstrap vector)."""
    out: list[tuple[int, Forward, int]] = []
    k = draw(st.integers(1, 3))
    floats = st.floats(-2, 2, allow_nan=False, width=32)
    for pos in range(draw(st.integers(1, 40))):
        item = f"i{draw(st.integers(0, 4))}"
        ts_us = 1_795_341_600_000_000 + draw(st.integers(-(10**10), 10**10))
        kind = draw(st.sampled_from(["view", "click", "click", "impression", "upsert"]))
        if kind == "upsert":
            boot = draw(st.none() | st.just(tuple(draw(st.lists(floats, min_size=_CFG.dim, max_size=_CFG.dim)))))
            fw = Forward(item, f"e{pos}", EventType.ITEM_UPSERT, ts_us, None, None, (), draw(st.booleans()),
                         draw(st.none() | st.just("c")), boot)  # fmt: skip
        elif kind == "impression":
            fw = Forward(item, f"e{pos}", EventType.IMPRESSION, ts_us, "u1")
        else:
            vec = np.array(draw(st.lists(floats, min_size=_CFG.dim, max_size=_CFG.dim)), dtype=np.float32)
            n = draw(st.sampled_from([k, k, k, 0, 2]))
            scores = tuple(draw(st.lists(st.floats(-3, 3, allow_nan=False), min_size=n, max_size=n)))
            fw = Forward(item, f"e{pos}", EventType(kind), ts_us, "u1", vec, scores)
        out.append((pos * FORWARD_SLOTS, fw, 1_000 + pos))
    return out


_CFG = CoreConfig(dim=4, max_rounds=2)


@settings(max_examples=60, deadline=None)
@given(_item_forwards(), st.integers(1, 3), st.booleans())
def test_the_item_stage_applies_pack_entries_as_the_core_applies_their_forwards(
    forwards: list[tuple[int, Forward, int]], n_packs: int, with_states: bool
) -> None:
    """Packs -> ``_group_forward_packs`` -> ``apply_item_entries`` (live) equals ``apply_item_batch`` (replay).

    Several packs per batch (the entries index one matrix and score array across them), one of them
    re-sent in part; items with and without a state; more forwards per item than rounds; upserts with
    bootstrap vectors between embedding steps; ragged negatives.
    """
    cuts = sorted({len(forwards) * c // n_packs for c in range(n_packs + 1)})
    packs = [serde.encode_forward_pack(7, forwards[a:b]) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]
    packs.insert(1, packs[0])  # a re-send: skipped, its blocks too
    start: dict[str, ItemState | None] = {f"i{j}": None for j in range(5)}
    if with_states:
        vec = np.full(_CFG.dim, 0.25, dtype=np.float32)
        warm = [(f"i{j}", None, [Forward(f"i{j}", "w", EventType.CLICK, 1_795_341_000_000_000, "u0", vec, (0.5,))])
                for j in range(3)]  # fmt: skip
        for (iid, _, _), st_ in zip(warm, apply_item_batch(warm, _CFG), strict=True):
            start[iid] = st_
    per_item, U, S, read, resent = worker._group_forward_packs([_msg(i, p) for i, p in enumerate(packs)], {}, set(), [])
    assert read - resent == len(forwards)
    live = apply_item_entries(
        [(iid, start[iid] and start[iid].copy(), es) for iid, (_, es) in per_item.items()],
        _CFG,
        U,
        S,  # type: ignore[union-attr]
    )
    by_item: dict[str, list[Forward]] = {}
    for _, fw, _ in forwards:
        by_item.setdefault(fw.item_id, []).append(fw)
    assert list(by_item) == list(per_item)
    replay = apply_item_batch([(iid, start[iid], fws) for iid, fws in by_item.items()], _CFG)
    for a, b in zip(live, replay, strict=True):
        assert serde.item_digest(a) == serde.item_digest(b)
        assert serde.encode_item(a) == serde.encode_item(b)  # vectors too, bit for bit


def test_state_keys_are_the_ids_utf8_with_and_without_the_store_prefix() -> None:
    raw, keys = worker._state_keys(["u1", "é", ""])
    assert raw == [b"u1", b"\xc3\xa9", b""] and keys == [b"ku1", b"k\xc3\xa9", b"k"]


class _Shard:
    def __init__(self, cache_entries: int) -> None:
        self.cache: dict[str, Any] = {}
        self.cache_entries = cache_entries
        self.partition = 2


@pytest.mark.parametrize("cache_entries", [0, 100])
def test_put_states_finds_each_work_items_keys_among_the_batchs_ids(cache_entries: int) -> None:
    """The guards dropped "b" and "d" (fully redelivered): the others' values go under their own keys."""
    ids = ["a", "b", "c", "d", "e"]
    raw, keys = worker._state_keys(ids)
    work = [(ids[0], None, []), (ids[2], None, []), (ids[4], None, [])]
    news = ["A", "C", "E"]
    values = [b"va", b"vc", b"ve"]
    puts: dict[bytes, bytes] = {}
    shard: Any = _Shard(cache_entries)
    p = _Producer(full=1)
    worker._put_states(work, news, values, ids, raw, keys, puts, shard, p, "chg")  # type: ignore[arg-type]
    assert puts == {b"ka": b"va", b"kc": b"vc", b"ke": b"ve"}
    assert p.records == [("chg", b"va", b"a", 2), ("chg", b"vc", b"c", 2), ("chg", b"ve", b"e", 2)]
    assert p.polls == 1  # the full queue: polled once, then the record taken (as _send does)
    assert shard.cache == ({"a": "A", "c": "C", "e": "E"} if cache_entries else {})
    with pytest.raises(ValueError):
        worker._put_states(work, news, values[:2], ids, raw, keys, puts, shard, p, "chg")  # type: ignore[arg-type]


def test_tail_replica_leaves_the_replica_as_a_put_per_record(tmp_path: Any) -> None:
    """The changelog tail's one ``put_many`` a consume: each item's newest vector, new items' rows in order of
    first appearance (what the negatives' sampling reads), meta records, deletes and vectorless states skipped."""
    from streams.config import Settings
    from streams.core.vectors import ItemReplica

    w = worker.StreamWorker(Settings(data_dir=str(tmp_path)))
    rng = np.random.default_rng(3)
    vecs = [rng.standard_normal(w.cfg.dim).astype(np.float32) for _ in range(5)]
    records: list[tuple[bytes | None, bytes]] = [
        (b"i1", serde.encode_item(ItemState(vector=vecs[0]))),
        (b"i2", serde.encode_item(ItemState(vector=vecs[1]))),
        (b"\x00off:events:0", b"5"),
        (b"i1", serde.encode_item(ItemState(vector=vecs[2]))),
        (b"i3", serde.encode_item(ItemState())),
        (b"i0", serde.encode_item(ItemState(vector=vecs[3]))),
        (None, b"x"),
        (b"i2", b""),
        (b"i4", serde.encode_item(ItemState(vector=vecs[4]))),
    ]

    class _Tail:
        def consume(self, n: int, timeout: float) -> list[Message]:
            return [Message(topic="ic", partition=0, offset=i, key=k, value=v) for i, (k, v) in enumerate(records)]

    want = ItemReplica(w.cfg)
    for r in (want, w.replica):
        r.put("i0", np.ones(w.cfg.dim, dtype=np.float32))
    for k, v in records:
        if k and v and k[:1] != b"\x00" and serde.vector_of(v) is not None:
            want.put(k.decode(), serde.vector_of(v))  # type: ignore[arg-type]
    w._tail = _Tail()  # type: ignore[assignment]
    w._tail_replica()
    ids = ["i0", "i1", "i2", "i4"]
    assert w.replica._rows == want._rows and w.replica.get("i3") is None
    assert np.array_equal(w.replica.get_many(ids), want.get_many(ids))
    assert np.array_equal(w.replica.get("i1"), vecs[2])  # type: ignore[arg-type]
