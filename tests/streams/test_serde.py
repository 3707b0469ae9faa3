"""Byte formats: the forward pack of ``events.by-item`` (round trip, grouping, rejects)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.core import serde
from streams.core.state import FORWARD_SLOTS, Forward
from streams.errors import StoreError
from streams.events import EventType

DIM = 6
_floats = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@st.composite
def _forward(draw: Any, event_id: str, etype: EventType, ts_us: int, user_id: str | None) -> Forward:
    kind = draw(st.sampled_from(["plain", "positive", "full"]))
    item = draw(st.text(min_size=1, max_size=8))
    if kind == "plain":
        return Forward(item, event_id, etype, ts_us, user_id)
    vec = np.array(draw(st.lists(_floats, min_size=DIM, max_size=DIM)), dtype=np.float32)
    scores = tuple(draw(st.lists(st.floats(-1e3, 1e3, allow_nan=False), max_size=4)))
    if kind == "positive":
        return Forward(item, event_id, etype, ts_us, user_id, vec, scores)
    bootstrap = draw(st.none() | st.tuples(*[_floats] * 3))
    return Forward(item, event_id, etype, ts_us, user_id, draw(st.none() | st.just(vec)), scores,
                   draw(st.booleans()), draw(st.none() | st.text(max_size=5)), bootstrap)  # fmt: skip


@st.composite
def _pack(draw: Any) -> list[tuple[int, Forward, int]]:
    """Forwards of a few source records (increasing positions), each with increasing sub-indexes."""
    out: list[tuple[int, Forward, int]] = []
    position = draw(st.integers(0, 10**9))
    for n in range(draw(st.integers(0, 5))):
        position += draw(st.integers(1, 50))
        etype = draw(st.sampled_from(list(EventType)))
        user = draw(st.none() | st.sampled_from(["u1", "u2"]))
        ts_us, ts_ms = draw(st.integers(0, 2**60)), draw(st.integers(0, 2**41))
        subs = sorted(draw(st.sets(st.integers(0, FORWARD_SLOTS - 1), min_size=1, max_size=6)))
        for sub in subs:
            fw = draw(_forward(f"e{n}", etype, ts_us, user))
            out.append((position * FORWARD_SLOTS + sub, fw, ts_ms))
    return out


def _same(a: Forward, b: Forward) -> bool:
    va, vb = a.user_vector, b.user_vector
    vectors = (va is None and vb is None) or (va is not None and vb is not None and np.array_equal(va, vb))
    return vectors and a._replace(user_vector=None) == b._replace(user_vector=None)


@settings(max_examples=200, deadline=None)
@given(_pack(), st.integers(0, 2**20))
def test_forward_pack_round_trips(forwards: list[tuple[int, Forward, int]], src: int) -> None:
    got_src, seqs, fws, stamps = serde.decode_forward_pack(serde.encode_forward_pack(src, forwards))
    assert got_src == src
    assert seqs == [s for s, _, _ in forwards]
    assert stamps == [t for _, _, t in forwards]
    assert len(fws) == len(forwards)
    assert all(_same(a, b) for (_, a, _), b in zip(forwards, fws, strict=True))


def test_a_slate_is_one_group_with_the_shared_fields_once() -> None:
    slate = [Forward(f"item-{k}", "imp-7", EventType.IMPRESSION, 123, "user-9") for k in range(20)]
    forwards = [(55 * FORWARD_SLOTS + k, fw, 99) for k, fw in enumerate(slate) if k % 3 != 1]
    data = serde.encode_forward_pack(3, forwards)
    assert data.count(b"imp-7") == 1 and data.count(b"user-9") == 1
    _, seqs, fws, _ = serde.decode_forward_pack(data)
    assert [s % FORWARD_SLOTS for s in seqs] == [k for k in range(20) if k % 3 != 1]
    assert fws == [fw for _, fw, _ in forwards]


def test_negative_scores_may_be_a_float32_row() -> None:
    row = np.array([0.1, -2.5, 3e-8], dtype=np.float32)
    vec = np.arange(DIM, dtype=np.float32)
    fw = Forward("i1", "e1", EventType.CLICK, 5, "u1", vec, row)  # type: ignore[arg-type]
    _, _, (got,), _ = serde.decode_forward_pack(serde.encode_forward_pack(0, [(FORWARD_SLOTS, fw, 0)]))
    assert got.neg_scores == tuple(row.tolist())  # exact: float32 values survive as Python floats


def test_forward_pack_rejects_bad_input() -> None:
    a = Forward("i1", "e1", EventType.VIEW, 5, "u1")
    with pytest.raises(ValueError, match="must increase"):
        serde.encode_forward_pack(0, [(10, a, 0), (10, a, 0)])
    b = a._replace(user_vector=np.zeros(3, dtype=np.float32), neg_scores=(1.0,))
    with pytest.raises(ValueError, match="differ in length"):
        serde.encode_forward_pack(0, [(1, b, 0), (2, b._replace(user_vector=np.zeros(4, dtype=np.float32)), 0)])
    with pytest.raises(StoreError, match="not a forward pack"):
        serde.decode_forward_pack(serde.encode_item(serde.decode_item(_an_item_state())))
    with pytest.raises(StoreError, match="too short"):
        serde.decode_forward_pack(b"F")


def _an_item_state() -> bytes:
    from streams.core.state import ItemState

    return serde.encode_item(ItemState())
