"""The pure state functions: feature math worked out by hand, idempotence, order independence."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import pickle
import zlib
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.core import serde
from streams.core.state import (
    B60_US,
    FORWARD_SLOTS,
    TYPE_INDEX,
    CoreConfig,
    Forward,
    ItemState,
    Outcome,
    UserState,
    _blank_item,
    _blank_user,
    _damped_step,
    _float32s,
    _hash64s,
    _horizon,
    _rows,
    _uint64s,
    apply_item_batch,
    apply_item_entries,
    apply_item_forwards,
    apply_user_batch,
    apply_user_events,
    ctr,
    forward_entries,
    forward_seqs,
    hash64,
    init_matrix,
    item_features,
    user_features,
)
from streams.core.vectors import ItemReplica
from streams.events import Context, Event, EventType

CFG = CoreConfig(dim=8)
H = 3_600_000_000  # one hour in microseconds
T0 = 1_000 * H


def ev(i: int, etype: EventType = EventType.CLICK, item: str = "i1", t: int = 0, session: str | None = None) -> Event:
    return Event(f"e{i}", etype, T0 + t, user_id="u1", item_id=item, context=Context(session_id=session))


def fw(i: int, etype: EventType, t: int) -> Forward:
    return Forward("i1", f"e{i}", etype, T0 + t, "u1")


def test_counts_recent_and_session() -> None:
    items = ItemReplica(CFG)
    events = [ev(1, EventType.VIEW, "a", 0, "s1"), ev(2, EventType.CLICK, "b", 10, "s1"),
              ev(3, EventType.PURCHASE, "c", 5, "s2")]  # fmt: skip
    state, out = apply_user_events(None, "u1", events, CFG, items)
    f = user_features(state)
    assert f["counts"] == {"view": 1, "click": 1, "add_to_cart": 0, "purchase": 1, "impression": 0, "item_upsert": 0}
    assert f["recent_items"] == ["b", "c", "a"]  # newest event time first, whatever the arrival order
    assert f["session_id"] == "s1"  # the session of the newest event (t=10)
    assert state.version == 3 and state.steps == 3  # three positives -> three embedding steps
    assert [x.item_id for x in out.forwards] == ["a", "b", "c"]


def test_redelivered_event_changes_nothing() -> None:
    items = ItemReplica(CFG)
    once, _ = apply_user_events(None, "u1", [ev(1), ev(2)], CFG, items)
    twice, out = apply_user_events(once, "u1", [ev(2), ev(1)], CFG, items)
    assert serde.user_digest(twice) == serde.user_digest(once)
    assert twice.vector is not None and once.vector is not None
    assert np.array_equal(twice.vector, once.vector)
    assert [d.event_id for d in out.duplicates] == ["e2", "e1"]
    assert out.forwards == []


def test_late_events_are_reported_not_applied() -> None:
    items = ItemReplica(CFG)
    state, _ = apply_user_events(None, "u1", [ev(1, t=2 * H)], CFG, items)
    state2, out = apply_user_events(state, "u1", [ev(2, t=2 * H - CFG.lateness_us - 1), ev(3, t=H + 1)], CFG, items)
    assert [e.event_id for e in out.late] == ["e2"]
    assert state2.counts[1] == 2  # e1 and e3 (within the lateness) are applied


def test_horizon_is_the_exact_difference_or_int64s_minimum() -> None:
    assert _horizon(10 * H, H) == 9 * H
    assert _horizon(0, 0) == 0
    assert _horizon(-(2**62), 2**62) == -(2**63)  # exactly int64's minimum
    assert _horizon(-(2**62) - 1, 2**62) == -(2**63)  # below it: saturated
    assert _horizon(2**63 - 1, 2**63 - 1) == 0
    assert _horizon(-1, 2**63 - 1) == -(2**63)


YEAR_1_US = -62_135_596_800 * 1_000_000  # 0001-01-01T00:00:00Z, the earliest event time
YEAR_9999_US = 253_402_300_799 * 1_000_000  # 9999-12-31T23:59:59Z


@pytest.mark.parametrize("lateness", [2**63 - 1, 2**63, 2**70])
def test_a_lateness_beyond_int64_drops_no_event_time_and_still_finds_duplicates(lateness: int) -> None:
    cfg = CoreConfig(dim=8, lateness_us=lateness)
    items = ItemReplica(cfg)
    newest = Event("e1", EventType.CLICK, YEAR_9999_US, user_id="u1", item_id="a", context=Context(session_id="s9"))
    oldest = Event("e2", EventType.VIEW, YEAR_1_US, user_id="u1", item_id="b", context=Context(session_id="s1"))
    state, out = apply_user_events(None, "u1", [newest, oldest], cfg, items)
    assert out.late == () and out.duplicates == ()
    assert state.max_ts == YEAR_9999_US and state.seen == {"e1": YEAR_9999_US, "e2": YEAR_1_US}
    assert state.session == (YEAR_9999_US, "e1", "s9", None, None)
    again, out = apply_user_events(state, "u1", [oldest], cfg, items)
    assert [d.event_id for d in out.duplicates] == ["e2"] and again.version == 2


def test_the_first_event_sets_the_session_even_at_the_earliest_time() -> None:
    first = Event("", EventType.VIEW, YEAR_1_US, user_id="u1", item_id="a", context=Context("home", "s1", "tv"))
    cfg = CoreConfig(dim=8, lateness_us=2**63)  # a new state's max_ts is 0: the event is not late
    state, out = apply_user_events(None, "u1", [first], cfg, ItemReplica(cfg))
    assert out.late == () and state.session == (YEAR_1_US, "", "s1", "home", "tv")


def test_input_state_is_not_mutated() -> None:
    items = ItemReplica(CFG)
    state, _ = apply_user_events(None, "u1", [ev(1)], CFG, items)
    before = serde.encode_user(state)
    apply_user_events(state, "u1", [ev(2), ev(3, EventType.VIEW)], CFG, items)
    assert serde.encode_user(state) == before


def test_item_ctr_trending_and_popularity_by_hand() -> None:
    forwards = [fw(1, EventType.IMPRESSION, 10 * H + 1), fw(2, EventType.IMPRESSION, 10 * H + 2),
                fw(3, EventType.IMPRESSION, 10 * H + 3), fw(4, EventType.CLICK, 10 * H + 4)]  # fmt: skip
    state = apply_item_forwards(None, "i1", forwards, CFG)
    # "now" = 10h30m: every event is inside the last hour and the last day
    f = item_features(state, T0 + 10 * H + H // 2, CFG)
    assert f["ctr_1h"] == pytest.approx((1 + 1) / (3 + 20))  # (clicks + a) / (impressions + b), a=1, b=20
    assert f["ctr_24h"] == pytest.approx(2 / 23)
    assert f["pos_1h"] == 1 and f["pos_24h"] == 1  # the click is the only positive
    assert f["trending"] == pytest.approx((1 + 1) / (1 / 24 + 1))  # = 1.92
    # two hours later the hour bucket [10h, 11h) ended 1h ago, i.e. one half-life
    later = item_features(state, T0 + 12 * H, CFG)
    assert later["popularity"] == pytest.approx(0.5)
    assert later["pos_1h"] == 0 and later["ctr_1h"] == pytest.approx(1 / 20)


def test_hour_buckets_older_than_the_window_are_dropped_in_any_order() -> None:
    old, new = fw(1, EventType.CLICK, 0), fw(2, EventType.CLICK, 60 * H)
    a = apply_item_forwards(None, "i1", [old, new], CFG)
    b = apply_item_forwards(None, "i1", [new, old], CFG)
    assert serde.item_digest(a) == serde.item_digest(b)
    assert sorted(a.b60) == [(T0 + 60 * H) // B60_US]


def test_item_buckets_by_hand_with_runs_of_one_bucket_interleaved() -> None:
    m = 60_000_000  # one minute in microseconds
    up = Forward("i1", "u-1", EventType.ITEM_UPSERT, T0 + 4 * m, category="c")
    forwards = [fw(1, EventType.IMPRESSION, 1 * m), fw(2, EventType.CLICK, 2 * m), fw(3, EventType.VIEW, 7 * m),
                fw(4, EventType.IMPRESSION, 3 * m), up, fw(6, EventType.PURCHASE, 61 * m),
                fw(7, EventType.CLICK, 8 * m)]  # fmt: skip
    s = apply_item_forwards(None, "i1", forwards, CFG)
    # T0 is hour 1000, 5-minute bucket 12000; [impressions, clicks, positives], in first-arrival order
    assert list(s.b5.items()) == [(12000, [2, 1, 1]), (12001, [0, 1, 2]), (12012, [0, 0, 1])]
    assert list(s.b60.items()) == [(1000, [2, 2, 3]), (1001, [0, 0, 1])]
    assert s.counts == [1, 2, 0, 1, 2, 1]  # view, click, add_to_cart, purchase, impression, item_upsert
    assert (s.version, s.max_ts, s.category) == (7, T0 + 61 * m, "c")


def test_item_upsert_newest_wins_whatever_the_arrival_order() -> None:
    up1 = Forward("i1", "u-1", EventType.ITEM_UPSERT, T0 + 1, eligible=True, category="old")
    up2 = Forward("i1", "u-2", EventType.ITEM_UPSERT, T0 + 2, eligible=False, category="new")
    for order in ([up1, up2], [up2, up1]):
        s = apply_item_forwards(None, "i1", order, CFG)
        assert (s.eligible, s.category) == (False, "new")


def test_item_step_moves_the_vector_towards_the_user() -> None:
    u = np.ones(CFG.dim, dtype=np.float32)
    f = Forward("i1", "e1", EventType.CLICK, T0, "u1", user_vector=u, neg_scores=(0.0,))
    before = apply_item_forwards(None, "i1", [], CFG)
    after = apply_item_forwards(None, "i1", [f], CFG)
    assert before.vector is None and after.vector is not None
    from streams.core.state import init_vector

    v0 = init_vector("i1", CFG, "i")
    g = 1 / (1 + math.exp(-(0.0 - float(u @ v0))))  # sigma(-(x_ui - x_uj)) with x_uj = 0
    expected = v0 + CFG.lr * 1.0 * (g * u - CFG.reg * v0)  # click weight 1.0
    assert np.allclose(after.vector, expected, atol=1e-6)
    assert float(after.vector @ u) > float(v0 @ u)


def test_float32s_equals_fromiter_bit_for_bit() -> None:
    rng = np.random.default_rng(3)
    tiny = float(np.finfo(np.float32).smallest_subnormal)
    values = [0.0, -0.0, 1, -3, 1e-50, tiny, tiny / 2, tiny * 1.5, 3.4028235e38, 3.5e38, -1e300, math.inf, -math.inf]
    values += [1 + k * 2.0**-24 for k in range(-3, 4)]  # float32 rounding ties and their neighbours
    values += rng.standard_normal(500).tolist() + (rng.standard_normal(200) * 1e-40).tolist()
    with np.errstate(over="ignore"):  # both warn alike where a value is beyond float32 (-> inf)
        got, want = _float32s(values), np.fromiter(values, np.float32, len(values))
    assert got.dtype == np.float32 and got.tobytes() == want.tobytes()
    assert np.isnan(_float32s([math.nan])[0]) and _float32s([]).shape == (0,)


def test_uint64s_equals_fromiter() -> None:
    values = [0, 1, 2**31 - 1, 2**31, 2**32 - 1] + [zlib.crc32(b"e%d" % k) for k in range(300)]
    got, want = _uint64s(values), np.fromiter(values, np.uint64, len(values))
    assert got.dtype == np.uint64 and got.tobytes() == want.tobytes()
    assert _uint64s([]).shape == (0,)


def test_item_replica_get_many_reads_rows_and_initialises_unknown_items() -> None:
    replica = ItemReplica(CFG)
    rng = np.random.default_rng(4)
    for k in range(5):
        replica.put(f"i{k}", rng.standard_normal(CFG.dim).astype(np.float32))
    ids = ["i3", "x", "i0", "i3", "y", "i4"]
    want = np.stack([replica.get(i) if replica.get(i) is not None else init_matrix([i], CFG, "i")[0] for i in ids])
    for given_ids in (ids, tuple(ids)):  # any sequence
        got = replica.get_many(given_ids)
        assert got.dtype == np.float32 and got.tobytes() == want.tobytes()
    assert replica.get_many([]).shape == (0, CFG.dim)


def test_item_steps_with_ragged_negatives_equal_the_usual_path_for_the_other_items() -> None:
    """A round whose forwards have unequal numbers of negatives takes the masked path; the other
    items' rows in that round come out bit for bit as on the usual path (all k equal)."""
    rng = np.random.default_rng(5)

    def fw(item: str, i: int, k: int) -> Forward:
        u = rng.standard_normal(CFG.dim).astype(np.float32)
        return Forward(item, f"{item}-{i}", EventType.CLICK, T0 + i, "u1", u, tuple(rng.standard_normal(k).tolist()))

    # "a": 6 steps with 4 negatives each (more than max_rounds: damped chunks); "b": 2 steps
    a = [fw("a", i, 4) for i in range(6)]
    b_usual, b_ragged = [fw("b", i, 4) for i in range(2)], [fw("b", 0, 1), fw("b", 1, 0)]
    usual = apply_item_batch([("a", None, a), ("b", None, b_usual)], CFG)
    ragged = apply_item_batch([("a", None, a), ("b", None, b_ragged)], CFG)
    assert usual[0].vector is not None and ragged[0].vector is not None
    assert usual[0].vector.tobytes() == ragged[0].vector.tobytes()
    assert (usual[0].steps, ragged[1].steps) == (6, 2)
    # and a key's negatives scores do matter (the masked path is not a no-op)
    assert not np.array_equal(usual[1].vector, ragged[1].vector)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 3), min_size=1, max_size=24), st.integers(1, 4), st.integers(1, 5), st.integers(0, 2**31)
)
def test_item_steps_read_scores_by_row_or_by_start_alike(items: list[int], k: int, shift: int, seed: int) -> None:
    """Where every entry's k scores sit at k x its row, the item steps read the scores as rows of k, else
    by each entry's start: the same states, bit for bit (here: the same entries, their scores moved)."""
    rng = np.random.default_rng(seed)
    per_item: dict[str, list[Forward]] = {}
    for i, item in enumerate(items):
        u = rng.standard_normal(CFG.dim).astype(np.float32)
        per_item.setdefault(f"i{item}", []).append(
            Forward(f"i{item}", f"e{i}", EventType.CLICK, T0 + i, "u1", u, tuple(rng.standard_normal(k).tolist()))
        )
    vecs: list[np.ndarray] = []
    flat: list[float] = []
    work = [(iid, None, forward_entries(fws, vecs, flat)) for iid, fws in per_item.items()]
    U = _rows(vecs, CFG.dim)
    by_row = apply_item_entries(work, CFG, U, np.array(flat, dtype=np.float64))
    # the same scores after ``shift`` others: each start moves, and S no longer reads as rows of k
    moved = [(iid, None, [(e[0], e[1], e[2], e[3] + shift, e[4], e[5]) for e in es]) for iid, _, es in work]
    by_start = apply_item_entries(moved, CFG, U, np.array([9.0] * shift + flat, dtype=np.float64))
    assert [serde.encode_item(s) for s in by_row] == [serde.encode_item(s) for s in by_start]
    forwards = apply_item_batch([(iid, None, fws) for iid, fws in per_item.items()], CFG)
    assert [serde.encode_item(s) for s in by_row] == [serde.encode_item(s) for s in forwards]


def test_serde_round_trips() -> None:
    items = ItemReplica(CFG)
    state, out = apply_user_events(None, "u1", [ev(1), ev(2, EventType.VIEW, "x")], CFG, items)
    assert serde.encode_user(serde.decode_user(serde.encode_user(state))) == serde.encode_user(state)
    item = apply_item_forwards(None, "i1", out.forwards[:1], CFG)
    assert serde.encode_item(serde.decode_item(serde.encode_item(item))) == serde.encode_item(item)
    src, (seq,), (f,), _ = serde.decode_forward_pack(serde.encode_forward_pack(3, [(77, out.forwards[0], 0)]))
    fw = out.forwards[0]  # PACK3 carries no user id, nor a click's event id: the item stage reads neither
    assert (src, seq, f.item_id, f.type, f.ts_us) == (3, 77, fw.item_id, fw.type, fw.ts_us)
    assert (f.event_id, f.user_id) == ("", None)
    assert fw.event_id == "e1" and f.neg_scores == fw.neg_scores
    assert f.user_vector is not None and np.array_equal(f.user_vector, out.forwards[0].user_vector)


@settings(max_examples=40, deadline=None)
@given(st.permutations(list(range(12))), st.lists(st.integers(0, 11), max_size=4))
def test_features_are_independent_of_arrival_order_and_duplicates(perm: list[int], dups: list[int]) -> None:
    kinds = [EventType.VIEW, EventType.CLICK, EventType.PURCHASE, EventType.IMPRESSION]
    base = [
        Event(f"e{i}", kinds[i % 4], T0 + (i * 7919 % 13) * 60_000_000, user_id="u1",
              item_id=None if kinds[i % 4] is EventType.IMPRESSION else f"i{i % 5}",
              items=(f"i{i % 3}", "i9") if kinds[i % 4] is EventType.IMPRESSION else (),
              context=Context(session_id=f"s{i % 2}"))
        for i in range(12)
    ]  # fmt: skip
    items = ItemReplica(CFG)
    ref, _ = apply_user_events(None, "u1", sorted(base, key=lambda e: (e.ts_us, e.event_id)), CFG, items)
    shuffled = [base[i] for i in perm] + [base[i] for i in dups]
    got, _ = apply_user_events(None, "u1", shuffled, CFG, items)
    assert serde.user_digest(got) == serde.user_digest(ref)


def test_a_repeated_or_stale_item_upsert_changes_nothing() -> None:
    vec = tuple(float(x) for x in range(CFG.dim))
    up1 = Forward("i1", "u-1", EventType.ITEM_UPSERT, T0 + 1, eligible=True, category="old")
    up2 = Forward("i1", "u-2", EventType.ITEM_UPSERT, T0 + 2, eligible=False, category="new", bootstrap=vec)
    once = apply_item_forwards(None, "i1", [up1, up2], CFG)
    again = apply_item_forwards(once, "i1", [up2, up1], CFG)  # a redelivery and a stale upsert
    assert serde.item_digest(again) == serde.item_digest(once)
    assert once.counts[TYPE_INDEX[EventType.ITEM_UPSERT]] == 2 and once.version == 2
    assert once.vector is not None and again.vector is not None
    assert np.array_equal(again.vector, once.vector)
    stale_vector = Forward("i1", "u-0", EventType.ITEM_UPSERT, T0, bootstrap=tuple(0.0 for _ in range(CFG.dim)))
    assert np.array_equal(apply_item_forwards(once, "i1", [stale_vector], CFG).vector, once.vector)  # type: ignore[arg-type]


# -- batched application equals one event at a time ------------------------------------------
# The core applies a key's events of one batch together (features accumulated, ``seen`` and the
# time buckets pruned once); the live worker and replay cut batches differently, so any split
# of the same arrival sequence into batches must give the same state.

_KINDS = [EventType.VIEW, EventType.CLICK, EventType.PURCHASE, EventType.IMPRESSION]


@st.composite
def _user_streams(draw: st.DrawFn) -> list[Event]:
    n = draw(st.integers(1, 25))
    # times spread over ~3 lateness windows so that late events, pruning and re-sent ids all occur
    times = draw(st.lists(st.integers(0, 3 * H), min_size=n, max_size=n))
    out = []
    for i, t in enumerate(times):
        kind = _KINDS[i % 4]
        eid = f"e{draw(st.integers(0, n))}"  # colliding ids: duplicates, and ids re-sent later
        out.append(
            Event(eid, kind, T0 + t, user_id="u1", item_id=None if kind is EventType.IMPRESSION else f"i{i % 4}",
                  items=("i1", "i2") if kind is EventType.IMPRESSION else (), context=Context(session_id=f"s{i}"))
        )  # fmt: skip
    return out


def _cut(xs: list[object], cuts: list[int]) -> list[list[object]]:
    bounds = sorted({c % (len(xs) + 1) for c in cuts} | {0, len(xs)})
    return [xs[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@settings(max_examples=150, deadline=None)
@given(_user_streams(), st.lists(st.integers(0, 100), max_size=6))
def test_user_features_of_any_batch_split_equal_one_event_at_a_time(events: list[Event], cuts: list[int]) -> None:
    items = ItemReplica(CFG)
    one, dropped_one = None, []
    for e in events:
        one, out = apply_user_events(one, "u1", [e], CFG, items)
        dropped_one += [("dup", d.event_id) for d in out.duplicates] + [("late", d.event_id) for d in out.late]
    split, dropped_split = None, []
    for part in _cut(events, cuts):
        split, out = apply_user_events(split, "u1", part, CFG, items)  # type: ignore[arg-type]
        dropped_split += [("dup", d.event_id) for d in out.duplicates] + [("late", d.event_id) for d in out.late]
    assert one is not None and split is not None
    assert serde.user_digest(split) == serde.user_digest(one)
    assert sorted(dropped_split) == sorted(dropped_one)  # each call lists duplicates, then late events


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(_KINDS), st.integers(0, 80 * H)), min_size=1, max_size=30),
    st.permutations(list(range(30))),
    st.lists(st.integers(0, 100), max_size=6),
)
def test_item_features_of_any_order_and_batch_split_are_equal(
    specs: list[tuple[EventType, int]], perm: list[int], cuts: list[int]
) -> None:
    fws = [Forward("i1", f"e{i}", kind, T0 + t, "u1") for i, (kind, t) in enumerate(specs)]
    one = None
    for f in fws:
        one = apply_item_forwards(one, "i1", [f], CFG)
    shuffled = [fws[i] for i in perm if i < len(fws)]
    split = None
    for part in _cut(shuffled, cuts):  # type: ignore[arg-type]
        split = apply_item_forwards(split, "i1", part, CFG)  # type: ignore[arg-type]
    assert one is not None and split is not None
    assert serde.item_digest(split) == serde.item_digest(one)
    top = max(one.b60)
    assert min(one.b60) >= top - 48
    # the kept hourly buckets hold exactly the events in the window
    expected: dict[int, int] = {}
    for f in fws:
        idx = f.ts_us // B60_US
        if idx >= top - 48:
            expected[idx] = expected.get(idx, 0) + 1
    assert {k: sum(v) - v[1] for k, v in one.b60.items()} == {
        k: n for k, n in expected.items()
    }  # impressions + positives, a click counted once


def test_hash64_is_the_salted_8_byte_blake2b_of_the_text() -> None:
    for seed in (0, 1, 7, 0, 2**40):  # a seed again: the cached hasher is copied, never updated itself
        for text in ("", "u1", "iitem-42", "u1"):
            want = hashlib.blake2b(text.encode(), digest_size=8, salt=seed.to_bytes(8, "little")).digest()
            assert hash64(text, seed) == int.from_bytes(want, "little")
    assert hash64("u1", 0) != hash64("u1", 1)


def test_hash64s_equals_hash64_of_each_text() -> None:
    texts = [f"u{i}" for i in range(300)] + ["", "iitem-42", "u1"]  # some hashes at or above 2**63
    for seed in (0, 3, 2**40):
        assert _hash64s(texts, seed).tolist() == [hash64(t, seed) for t in texts]
    assert _hash64s([], 0).tolist() == []


def _damped_step_general(
    contrib: np.ndarray, lr: np.ndarray, sizes: np.ndarray, current: np.ndarray, reg: np.float32
) -> np.ndarray:
    """``_damped_step``'s general path (chunk sums, divisions and sqrt scaling), written out for any sizes."""
    div = sizes.astype(np.float64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    mean_contrib = np.add.reduceat(contrib, starts, axis=0) / div[:, None]
    mean_lr = np.add.reduceat(lr, starts) / div
    scale = np.sqrt(div).astype(np.float32).astype(np.float64)[:, None]
    return (scale * (mean_contrib - (mean_lr * reg)[:, None] * current)).astype(np.float32)  # type: ignore[no-any-return]


def test_damped_step_of_single_events_equals_the_general_path_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    reg = np.float32(0.002)
    for m in (1, 7, 300):
        contrib = rng.standard_normal((m, 16)).astype(np.float32)
        lr = rng.choice(np.array([0.025, 0.05, 0.075, 0.1], dtype=np.float32), m)
        current = rng.standard_normal((m, 16)).astype(np.float32)
        sizes = np.ones(m, dtype=np.int_)
        fast = _damped_step(contrib, lr, sizes, current, reg)
        assert fast.dtype == np.float32
        assert fast.tobytes() == _damped_step_general(contrib, lr, sizes, current, reg).tobytes()
    # chunks of several events (the general path) against the written-out one
    sizes = np.array([3, 2, 1, 1])
    contrib = rng.standard_normal((7, 16)).astype(np.float32)
    lr = np.full(7, 0.05, dtype=np.float32)
    current = rng.standard_normal((4, 16)).astype(np.float32)
    want = _damped_step_general(contrib, lr, sizes, current, reg)
    assert _damped_step(contrib, lr, sizes, current, reg).tobytes() == want.tobytes()


def test_forwards_carry_the_vector_before_each_step() -> None:
    """Each positive's forward snapshots its user's vector before that event's step, in every round.

    u1 takes one step per round (3 positives, max_rounds 4), u2 one chunk of 3 per round (12 positives),
    u3 one step; the snapshots of a user's later rounds are its vector after the earlier ones.
    """
    cfg = CoreConfig(dim=8)
    items = ItemReplica(cfg)
    items.put("i1", np.ones(8, dtype=np.float32))
    per_user = {
        "u1": [ev(i, EventType.VIEW, "i1", i) for i in range(3)],
        "u2": [ev(10 + i, EventType.CLICK, "i2", i) for i in range(12)],
        "u3": [ev(30, EventType.PURCHASE, "i1", 0)],
    }
    prior = {uid: apply_user_events(None, uid, [ev(99, t=-1)], cfg, items)[0] for uid in per_user}
    before = {uid: s.vector.copy() for uid, s in prior.items()}  # type: ignore[union-attr]
    untouched = {uid: s.copy() for uid, s in prior.items()}  # the batch updates ``prior`` in place
    results = apply_user_batch([(uid, prior[uid], evs) for uid, evs in per_user.items()], cfg, items, in_place=True)
    for (uid, evs), (state, out) in zip(per_user.items(), results, strict=True):
        assert state is prior[uid] and out.forward_src == list(range(len(evs)))
        snaps = [fw.user_vector for fw in out.forwards]
        assert all(s is not None and s.dtype == np.float32 for s in snaps)
        assert np.array_equal(snaps[0], before[uid])  # type: ignore[arg-type]
        # the same user again, one event at a time from the same start: its vector before each step
        if uid != "u2":  # (u2's chunks are damped mini-batch steps, not one step per event)
            replay = untouched[uid]
            for e, snap in zip(evs, snaps, strict=True):
                assert np.array_equal(snap, replay.vector)  # type: ignore[arg-type]
                replay, _ = apply_user_events(replay, uid, [e], cfg, items)
            assert state.vector is not None and np.array_equal(state.vector, replay.vector)  # type: ignore[arg-type]
        else:  # a chunk's events share the snapshot of the round's start
            assert all(np.array_equal(snaps[i], snaps[i - i % 3]) for i in range(12))
            assert not np.array_equal(snaps[0], snaps[3])
        assert state.vector is not None and state.vector.flags.owndata  # its own array, not a view of the batch's


def test_a_vector_of_another_dtype_is_converted_for_the_batch() -> None:
    cfg = CoreConfig(dim=8)
    items = ItemReplica(cfg)
    state, _ = apply_user_events(None, "u1", [ev(1)], CFG, items)
    assert state.vector is not None
    as32 = state.copy()
    as64 = state.copy()
    as64.vector = state.vector.astype(np.float64)
    a, out_a = apply_user_events(as32, "u1", [ev(2), ev(3)], cfg, items)
    b, out_b = apply_user_events(as64, "u1", [ev(2), ev(3)], cfg, items)
    assert a.vector is not None and b.vector is not None and np.array_equal(a.vector, b.vector)
    for fa, fb in zip(out_a.forwards, out_b.forwards, strict=True):
        assert fb.user_vector is not None and fb.user_vector.dtype == np.float32
        assert np.array_equal(fa.user_vector, fb.user_vector)  # type: ignore[arg-type]
    assert _rows([np.ones(3), np.zeros(3)], 3).dtype == np.float32


def test_outcome_without_drops_has_empty_sequences() -> None:
    items = ItemReplica(CFG)
    state, out = apply_user_events(None, "u1", [ev(1), ev(2, EventType.IMPRESSION)], CFG, items)
    assert len(out.duplicates) == len(out.late) == len(out.late_src) == 0
    _, out = apply_user_events(state, "u1", [ev(1), ev(3)], CFG, items)
    assert [d.event_id for d in out.duplicates] == ["e1"] and len(out.late) == 0


@settings(max_examples=100, deadline=None)
@given(st.permutations(list(range(12))), st.lists(st.integers(0, 12), max_size=4))
def test_recent_is_the_newest_entries_of_all_batches(perm: list[int], cuts: list[int]) -> None:
    cfg = CoreConfig(dim=8, recent_n=5)
    items = ItemReplica(cfg)
    # distinct ids, times within the lateness window (nothing dropped); equal times for some pairs
    events = [ev(i, EventType.VIEW, f"i{i}", (i // 2) * 1000) for i in perm]
    state = None
    for part in _cut(events, cuts):  # type: ignore[arg-type]
        state, out = apply_user_events(state, "u1", part, cfg, items)  # type: ignore[arg-type]
        assert not out.duplicates and not out.late
    assert state is not None
    want = sorted([(e.ts_us, e.event_id, e.item_id, "view") for e in events], reverse=True)[:5]
    assert state.recent == want
    in_order = None
    for e in sorted(events, key=lambda e: (e.ts_us, e.event_id)):  # live, in event-time order: the prepend path
        in_order, _ = apply_user_events(in_order, "u1", [e], cfg, items)
    assert in_order is not None and in_order.recent == want


@pytest.mark.parametrize(
    ("src", "want_subs"),
    [
        ([0, 1, 2], [(0, 0), (1, 0), (2, 0)]),  # one forward per event
        ([0, 0, 2], [(0, 0), (0, 1), (2, 0)]),  # a slate of two, a dropped event: as many forwards as events
        ([0, 0, 1, 1, 1], [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]),
        ([1, 2], [(1, 0), (2, 0)]),
        ([], []),
    ],
)
def test_forward_seqs_number_each_records_forwards(src: list[int], want_subs: list[tuple[int, int]]) -> None:
    out = Outcome()
    out.forward_src = src
    positions = [10, 11, 15]
    assert forward_seqs(out, positions) == [positions[i] * FORWARD_SLOTS + sub for i, sub in want_subs]


@pytest.mark.parametrize("field", ["dim", "negatives", "recent_n", "max_rounds", "trend_half_life_us"])
def test_core_config_rejects_a_zero_that_breaks_the_maths(field: str) -> None:
    # negatives=0 used to divide the user step's gradient by zero: NaN vectors, no error
    with pytest.raises(ValueError, match=field):
        CoreConfig(**{field: 0})
    with pytest.raises(ValueError, match="ctr_prior_impressions"):
        CoreConfig(ctr_prior_impressions=0.0)


@pytest.mark.parametrize(("a", "b"), [(-1.0, 20.0), (21.0, 20.0)])
def test_core_config_rejects_a_ctr_prior_outside_0_1(a: float, b: float) -> None:
    # a prior CTR a / b below 0 or above 1 would make every CTR estimate of a cold item one too
    with pytest.raises(ValueError, match="ctr_prior_clicks"):
        CoreConfig(ctr_prior_clicks=a, ctr_prior_impressions=b)


def test_clicks_without_logged_impressions_count_as_their_own_impressions() -> None:
    # 5 clicks, 2 impressions logged in the hour (the others' surfaces log none): 5 impressions at least
    forwards = [fw(k, EventType.IMPRESSION, 10 * H + k) for k in (1, 2)]
    forwards += [fw(k, EventType.CLICK, 10 * H + k) for k in range(3, 8)]
    state = apply_item_forwards(None, "i1", forwards, CFG)
    f = item_features(state, T0 + 10 * H + H // 2, CFG)
    assert f["clicks"] == 5 and f["impressions"] == 2
    assert f["ctr_1h"] == pytest.approx((5 + 1) / (5 + 20)) and f["ctr_24h"] == f["ctr_1h"]
    # (the ratio of the raw counts, (5 + 1) / (2 + 20), is what the formula gave before)


@given(
    clicks=st.integers(0, 10**6),
    impressions=st.integers(0, 10**6),
    a=st.floats(0.0, 50.0),
    extra=st.floats(0.0, 1000.0),
)
def test_ctr_is_a_rate_for_any_counts(clicks: int, impressions: int, a: float, extra: float) -> None:
    cfg = CoreConfig(ctr_prior_clicks=a, ctr_prior_impressions=max(a + extra, 1e-3))
    rate = ctr(clicks, impressions, cfg)
    assert 0.0 <= rate <= 1.0
    if impressions >= clicks:  # the logged impressions cover the clicks: the plain Beta-prior estimate
        assert rate == (clicks + cfg.ctr_prior_clicks) / (impressions + cfg.ctr_prior_impressions)


def test_the_state_classes_keep_the_dataclass_api() -> None:
    # extension types in the compiled build (Cython builds the dataclass), plain dataclasses otherwise: the
    # same construction, defaults, fields, repr, copies and comparison in both
    names = ["counts", "recent", "session", "seen", "max_ts", "vector", "steps", "version", "offsets"]
    assert [f.name for f in dataclasses.fields(UserState)] == list(UserState.__dataclass_fields__) == names
    vec = np.arange(3, dtype=np.float32)
    args = ([1, 0, 0, 0, 0, 0], [(5, "e1", "i1", "view")], (5, "e1", "s", None, "web"), {"e1": 5}, 5, vec, 2, 1,
            {"events": 7})  # fmt: skip
    user = UserState(*args)
    assert [getattr(user, n) for n in names] == list(args)  # by position, in the fields' order
    assert user == UserState(**dict(zip(names, args, strict=True)))  # by keyword; one vector object: equal
    assert UserState() == UserState(counts=[0] * 6) and UserState().counts is not UserState().counts
    assert UserState().vector is None and UserState().max_ts == 0 and UserState().offsets == {}
    assert repr(UserState(max_ts=3)) == (
        "UserState(counts=[0, 0, 0, 0, 0, 0], recent=[], session=None, seen={}, max_ts=3, vector=None, steps=0, "
        "version=0, offsets={})"
    )
    twin = user.copy()
    assert twin.vector is not vec and serde.encode_user(twin) == serde.encode_user(user)
    with pytest.raises(ValueError, match="ambiguous"):  # two vector objects: compared as arrays, as a dataclass does
        _ = twin == user
    other = dataclasses.replace(user, vector=None, max_ts=9)
    assert other.max_ts == 9 and other.seen is user.seen and other != user and user != "user"
    assert dataclasses.asdict(other)["offsets"] == {"events": 7}
    with pytest.raises(TypeError):
        hash(user)  # mutable: unhashable, as an eq=True dataclass
    for again in (pickle.loads(pickle.dumps(user)), copy.deepcopy(user)):
        assert type(again) is UserState and serde.encode_user(again) == serde.encode_user(user)
    item = ItemState(b60={3: [1, 0, 1]}, max_ts=4, eligible=False, category="c", upsert_key=(4, "u1"))
    assert [f.name for f in dataclasses.fields(ItemState)] == [
        "counts", "b5", "b60", "max_ts", "eligible", "category", "vector", "steps", "version", "offsets", "upsert_key",
    ]  # fmt: skip
    assert item == item.copy() and item != ItemState() and ItemState().eligible is True
    assert ItemState([0] * 6, {}, {}, 1, True, None, None, 0, 0, {}, (1, "u")).upsert_key == (1, "u")
    assert repr(ItemState()).startswith("ItemState(counts=[0, 0, 0, 0, 0, 0], b5={}, b60={}, max_ts=0, eligible=True")


def test_a_state_reader_given_none_raises() -> None:
    # the compiled build types these arguments: a None must raise (as in the plain build), not be read as a state
    with pytest.raises(AttributeError):
        user_features(None)  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        item_features(None, 0, CFG)  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        serde.encode_user(None)  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        serde.encode_users([UserState(), None])  # type: ignore[list-item]
    with pytest.raises(AttributeError):
        serde.encode_items([None])  # type: ignore[list-item]


_STEP_TYPES = [EventType.CLICK, EventType.VIEW, EventType.IMPRESSION]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.lists(st.sampled_from(_STEP_TYPES), max_size=9), max_size=7),
    st.integers(1, 4),
    st.booleans(),
)
def test_each_user_of_a_batch_steps_as_if_alone(types: list[list[EventType]], max_rounds: int, known: bool) -> None:
    """Users with any number of positives (ordered by count for the rounds, ties in batch order), new
    ones (odd) among ones with a vector, get the state and forwards (vector snapshots, negatives'
    scores) of their events applied without the others."""
    cfg = CoreConfig(dim=8, max_rounds=max_rounds, negatives=3)
    items = ItemReplica(cfg)
    if known:  # else no item to sample negatives from: one zero negative a step
        for n in range(5):
            items.put(f"i{n}", np.full(8, 0.1 * n, dtype=np.float32))
    batch = []
    for u, ts in enumerate(types):
        evs = [
            Event(f"e{u}.{i}", t, T0 + i, user_id=f"u{u}", item_id=f"i{i % 6}",
                  items=("i1", "i2") if t is EventType.IMPRESSION else ())
            for i, t in enumerate(ts)
        ]  # fmt: skip
        first = Event(f"p{u}", EventType.CLICK, T0 - 1, user_id=f"u{u}", item_id="i3")
        prior = None if u % 2 else apply_user_events(None, f"u{u}", [first], cfg, items)[0]
        batch.append((f"u{u}", prior, evs))
    results = apply_user_batch(batch, cfg, items)
    for (uid, prior, evs), (state, out) in zip(batch, results, strict=True):
        alone, alone_out = apply_user_events(prior, uid, evs, cfg, items)
        assert serde.encode_user(state) == serde.encode_user(alone)
        assert out.forward_src == alone_out.forward_src
        assert len(out.forwards) == len(alone_out.forwards)
        for f, g in zip(out.forwards, alone_out.forwards, strict=True):
            assert f[:5] == g[:5] and f.neg_scores == g.neg_scores and type(f.neg_scores) is tuple
            assert (f.user_vector is None) == (g.user_vector is None)
            if f.user_vector is not None:
                assert f.user_vector.tobytes() == g.user_vector.tobytes()  # type: ignore[union-attr]
            assert len(f.neg_scores) == (0 if f.user_vector is None else 3 if known else 1)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 40), st.sampled_from(["f4", "f4", "f8", "list", "strided"])), max_size=30),
    st.integers(0, 1100),
)
def test_replica_put_many_equals_put_one_by_one(puts: list[tuple[int, str]], preload: int) -> None:
    """``ItemReplica.put_many`` (the item stage's batch put) leaves the replica as ``put`` of each in order:
    new and known ids, the matrix grown past 1024 rows, an id given twice (the last wins), vectors not float32."""
    rng = np.random.default_rng(len(puts) + preload)
    ids = [f"i{n}" for n, _ in puts]
    vectors: list[Any] = []
    for _, kind in puts:
        v = rng.standard_normal(CFG.dim).astype(np.float32)
        if kind == "strided":
            v = np.repeat(v, 2)[::2]  # (the same values, a view without a contiguous buffer)
        vectors.append(v.astype(np.float64) if kind == "f8" else v.tolist() if kind == "list" else v)
    one, many = ItemReplica(CFG), ItemReplica(CFG)
    for r in (one, many):
        for n in range(preload):
            r.put(f"p{n}", np.full(CFG.dim, n, dtype=np.float32))
    for item_id, v in zip(ids, vectors, strict=True):
        one.put(item_id, v)
    many.put_many(ids, vectors)
    assert len(many) == len(one)
    keys = [*ids, *(f"p{n}" for n in range(preload))]
    assert all(np.array_equal(many.get(k), one.get(k)) for k in keys)  # type: ignore[arg-type]
    assert np.array_equal(many.get_many(keys), one.get_many(keys))


@pytest.mark.parametrize("cls", [UserState, ItemState])
def test_a_blank_state_is_a_default_state(cls: type[Any]) -> None:
    """``_blank_user``/``_blank_item`` (the cores' new states, without the dataclass ``__init__``) equal
    ``UserState()``/``ItemState()``, field by field and type by type, and share no container with another blank."""
    blank = _blank_user if cls is UserState else _blank_item
    encode = serde.encode_user if cls is UserState else serde.encode_item
    a, b, want = blank(), blank(), cls()
    assert type(a) is cls and a == want and repr(a) == repr(want)
    for f in dataclasses.fields(cls):
        got, exp = getattr(a, f.name), getattr(want, f.name)
        assert got == exp and type(got) is type(exp), f.name
        if isinstance(got, list | dict):
            assert got is not getattr(b, f.name), f.name
    assert pickle.loads(pickle.dumps(a)) == want and encode(a) == encode(want)


def test_a_first_round_of_single_steps_reads_the_batch_matrix_itself() -> None:
    """The first round's user rows are U itself when every user has one step in it, and a copy of U's rows
    otherwise (a user with more positives than rounds takes a chunk of them): the same states and forwards."""
    cfg = CoreConfig(dim=8, max_rounds=2, negatives=3)
    items = ItemReplica(cfg)
    for n in range(5):
        items.put(f"i{n}", np.full(8, 0.1 * n + 0.05, dtype=np.float32))
    singles = []
    for u in range(4):
        first = Event(f"p{u}", EventType.CLICK, T0 - 1, user_id=f"u{u}", item_id="i3")
        prior = None if u == 3 else apply_user_events(None, f"u{u}", [first], cfg, items)[0]
        singles.append((f"u{u}", prior, [Event(f"e{u}", EventType.VIEW, T0 + u, user_id=f"u{u}", item_id=f"i{u}")]))
    clicks = [Event(f"e9.{i}", EventType.CLICK, T0 + i, user_id="u9", item_id=f"i{i % 5}") for i in range(5)]
    long = ("u9", None, clicks)
    fast = apply_user_batch(singles, cfg, items)  # each user one step: the first round is all of U's rows in order
    general = apply_user_batch([long, *singles], cfg, items)[1:]  # u9's chunk of 3 steps: U's rows gathered
    for (a, out_a), (b, out_b) in zip(fast, general, strict=True):
        assert serde.encode_user(a) == serde.encode_user(b)
        assert a.vector is not None and a.vector.flags.owndata
        [fa], [fb] = out_a.forwards, out_b.forwards
        assert fa.user_vector is not None and fb.user_vector is not None
        assert fa.user_vector.tobytes() == fb.user_vector.tobytes() and fa.neg_scores == fb.neg_scores
    # the snapshots are the vectors before the batch, not rows of U (which the round then updated in place)
    for (_, prior, _), (state, out) in zip(singles, fast, strict=True):
        snap = out.forwards[0].user_vector
        assert snap is not None and state.vector is not None and not np.array_equal(snap, state.vector)
        if prior is not None:
            assert prior.vector is not None and snap.tobytes() == prior.vector.tobytes()
