"""Byte formats: states (round trip, the older JSON body) and the forward pack of ``events.by-item``
(round trip, grouping, rejects, the older format)."""

from __future__ import annotations

import struct
from typing import Any

import msgspec
import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.core import serde
from streams.core.state import FORWARD_SLOTS, Forward, ItemState, UserState
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
        ts_us, ts_ms = draw(st.integers(-(2**60), 2**60)), draw(st.integers(0, 2**41))
        subs = sorted(draw(st.sets(st.integers(0, FORWARD_SLOTS - 1), min_size=1, max_size=6)))
        for sub in subs:
            fw = draw(_forward(f"e{n}", etype, ts_us, user))
            out.append((position * FORWARD_SLOTS + sub, fw, ts_ms))
    return out


def _carried(fw: Forward) -> Forward:
    """What ``PACK4`` (and ``PACK3``) carries of a forward: no user id, and an event id only for an item upsert."""
    return fw._replace(user_id=None, event_id=fw.event_id if fw.type is EventType.ITEM_UPSERT else "")


def _same(a: Forward, b: Forward) -> bool:
    va, vb = a.user_vector, b.user_vector
    vectors = (va is None and vb is None) or (va is not None and vb is not None and np.array_equal(va, vb))
    return vectors and a._replace(user_vector=None) == b._replace(user_vector=None)


@settings(max_examples=200, deadline=None)
@given(_pack(), st.integers(0, 2**20))
def test_forward_pack_round_trips(forwards: list[tuple[int, Forward, int]], src: int) -> None:
    data = serde.encode_forward_pack(src, forwards)
    assert data[0] == serde.PACK4
    got_src, seqs, fws, stamps = serde.decode_forward_pack(data)
    assert got_src == src
    assert seqs == [s for s, _, _ in forwards]
    assert stamps == [t for _, _, t in forwards]
    assert len(fws) == len(forwards)
    assert all(_same(_carried(a), b) for (_, a, _), b in zip(forwards, fws, strict=True))


@settings(max_examples=200, deadline=None)
@given(_pack(), st.integers(0, 2**20))
def test_the_pack3_format_still_decodes(forwards: list[tuple[int, Forward, int]], src: int) -> None:
    """Records written before an upgrade (format ``PACK3``: the integers in the body) decode as ``PACK4``'s."""
    data = serde.encode_forward_pack(src, forwards)
    old = _as_pack3(data)
    assert old[0] == serde.PACK3
    assert _same_packs(serde.decode_forward_pack(old), serde.decode_forward_pack(data))
    got, want = serde.decode_forward_entries(old, 3, 5), serde.decode_forward_entries(data, 3, 5)
    assert got[:7] == want[:7] and [bytes(b) for b in got[7:]] == [bytes(b) for b in want[7:]]


def _same_packs(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return a[::3] == b[::3] and a[1] == b[1] and all(_same(x, y) for x, y in zip(a[2], b[2], strict=True))


def _pack4_ints(data: bytes) -> list[int]:
    """A ``PACK4`` record's int block, read by hand: little-endian int64s after the vectors and scores."""
    fmt, dim, rows, n_scores, _, n_ints = struct.unpack_from("<BHIIII", data)
    assert fmt == serde.PACK4
    return list(struct.unpack_from(f"<{n_ints}q", data, 19 + 4 * dim * rows + 8 * n_scores))


def _as_pack3(data: bytes) -> bytes:
    """The ``PACK3`` record of a ``PACK4`` one: the same head (less the int count), blocks and entries, the
    integers as the body's second list."""
    fmt, dim, rows, n_scores, count, n_ints = struct.unpack_from("<BHIIII", data)
    at = 19 + 4 * dim * rows + 8 * n_scores
    src, strs, extras = orjson.loads(data[at + 8 * n_ints :])
    head = struct.pack("<BHIII", serde.PACK3, dim, rows, n_scores, count)
    return head + data[19:at] + orjson.dumps([src, _pack4_ints(data), strs, extras])


def _golden_forwards(vec: np.ndarray | None) -> list[tuple[int, Forward, int]]:
    """The forwards of the checked-in PACK2 and PACK3 bytes below (the first one's user vector: ``vec``)."""
    s = FORWARD_SLOTS
    return [
        (7 * s, Forward("i1", "e1", EventType.VIEW, 1790000000000001, "u1", vec, (0.25, -1.5)), 1790000000123),
        (9 * s, Forward("i2", "e2", EventType.IMPRESSION, 1790000000000002, "u2"), 1790000000124),
        (9 * s + 3, Forward("i1", "e2", EventType.IMPRESSION, 1790000000000002, "u2"), 1790000000124),
        (12 * s, Forward("i4", "e3", EventType.ITEM_UPSERT, 1790000000000000, None, None, (), False, "shoes",
                         (1.0, 2.0, 0.5)), 1790000000125),
    ]  # fmt: skip


def test_a_pack_written_by_the_pack3_encoder_decodes() -> None:
    # bytes written by the PACK3 encoder (before PACK4): a view with a user vector and two scores, a slate of
    # two impressions (one of an item seen before), an upsert with a bootstrap vector
    old = (
        b"H\x03\x00\x01\x00\x00\x00\x02\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00?\x00\x00\xa0\xbf\x00\x00@@"
        b"\x00\x00\x00\x00\x00\x00\xd0?\x00\x00\x00\x00\x00\x00\xf8\xbf"
        b"[5,[44032,7,1790000000000001,1790000000123,0,9216,2,1,1,4,3,0,13312,3,-2,1,5],"
        b'["i1","i2","e3","i4"],[false,"shoes",[1.0,2.0,0.5]]]'
    )
    vec = np.array([0.5, -1.25, 3.0], dtype=np.float32)
    want = _golden_forwards(vec)
    src, seqs, fws, stamps = serde.decode_forward_pack(old)
    assert (src, seqs, stamps) == (5, [q for q, _, _ in want], [t for _, _, t in want])
    assert all(_same(_carried(fw), got) for (_, fw, _), got in zip(want, fws, strict=True))
    # PACK4: the same head (and the int count), blocks and entries; the integers as little-endian int64s
    new = serde.encode_forward_pack(5, want)
    ints = [44032, 7, 1790000000000001, 1790000000123, 0, 9216, 2, 1, 1, 4, 3, 0, 13312, 3, -2, 1, 5]
    assert new == (
        struct.pack("<BHIIII", serde.PACK4, 3, 1, 2, 4, 17) + old[15:43] + struct.pack("<17q", *ints)
        + b'[5,["i1","i2","e3","i4"],[false,"shoes",[1.0,2.0,0.5]]]'
    )  # fmt: skip
    assert _as_pack3(new) == old


def test_the_int_block_is_little_endian_whatever_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a big-endian machine the int block is byteswapped both ways (emulated: the flag flipped here)."""
    fw = Forward("i1", "e1", EventType.CLICK, 1790000000000001, "u1", np.ones(DIM, dtype=np.float32), (0.5,))
    forwards = [(k * FORWARD_SLOTS + 3, fw._replace(item_id=f"i{k % 2}"), 1790000000123 + k) for k in range(3)]
    data = serde.encode_forward_pack(7, forwards)
    want, want_entries = serde.decode_forward_pack(data), serde.decode_forward_entries(data)[:7]
    monkeypatch.setattr(serde, "_LITTLE", not serde._LITTLE)
    swapped = serde.encode_forward_pack(7, forwards)
    ints = _pack4_ints(data)
    assert swapped == data.replace(struct.pack(f"<{len(ints)}q", *ints), struct.pack(f">{len(ints)}q", *ints))
    assert _same_packs(serde.decode_forward_pack(swapped), want)
    assert serde.decode_forward_entries(swapped)[:7] == want_entries


def test_a_slate_is_one_group_with_the_shared_fields_once() -> None:
    slate = [Forward(f"item-{k}", "imp-7", EventType.IMPRESSION, 123, "user-9") for k in range(20)]
    forwards = [(55 * FORWARD_SLOTS + k, fw, 99) for k, fw in enumerate(slate) if k % 3 != 1]
    data = serde.encode_forward_pack(3, forwards)
    assert b"imp-7" not in data and b"user-9" not in data  # the item stage reads neither
    assert data.endswith(b",[" + b",".join(b'"item-%d"' % k for k in range(20) if k % 3 != 1) + b"],[]]")
    _, seqs, fws, _ = serde.decode_forward_pack(data)
    assert [s % FORWARD_SLOTS for s in seqs] == [k for k in range(20) if k % 3 != 1]
    assert fws == [Forward(f"item-{k}", "", EventType.IMPRESSION, 123) for k in range(20) if k % 3 != 1]
    # one group: the first entry's code has the new-group flag, the others do not
    ints = _pack4_ints(data)
    assert ints[0] // FORWARD_SLOTS & 1 and not any(c // FORWARD_SLOTS & 1 for c in ints[5:])


def test_an_upsert_keeps_its_event_id_and_each_upsert_starts_a_group() -> None:
    ups = [Forward("i1", f"up-{k}", EventType.ITEM_UPSERT, 7, None, None, (), k == 0, "c", None) for k in range(2)]
    view = Forward("i2", "v-1", EventType.VIEW, 7, "u1")
    forwards = [(9 * FORWARD_SLOTS, ups[0], 1), (9 * FORWARD_SLOTS + 1, ups[1], 1), (9 * FORWARD_SLOTS + 2, view, 1)]
    data = serde.encode_forward_pack(0, forwards)
    _, _, fws, _ = serde.decode_forward_pack(data)
    assert fws == [ups[0], ups[1], Forward("i2", "", EventType.VIEW, 7)]
    _, _, _, _, entries, _, _, _, _ = serde.decode_forward_entries(data)
    assert [e[5] for e in entries] == [("up-0", True, "c", None), ("up-1", False, "c", None), None]


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


@settings(max_examples=200, deadline=None)
@given(_pack(), st.integers(0, 2**20))
def test_the_older_pack_format_still_decodes(forwards: list[tuple[int, Forward, int]], src: int) -> None:
    """Records written before an upgrade (format ``PACK``) may be in flight: they decode as before."""
    got_src, seqs, fws, stamps = serde.decode_forward_pack(_encode_pack1(src, forwards))
    assert got_src == src
    assert seqs == [s for s, _, _ in forwards]
    assert stamps == [t for _, _, t in forwards]
    assert len(fws) == len(forwards)
    assert all(_same(a, b) for (_, a, _), b in zip(forwards, fws, strict=True))


def test_a_pack_written_by_the_older_encoder_decodes() -> None:
    # bytes written by the PACK encoder (before PACK2): two float32 user-vector values, float64 scores
    old = (
        b"F\x03\x00\x01\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00?\x00\x00\xa0\xbf\x00\x00@@"
        b"\x00\x00\x00\x00\x00\x00\xd0?\x00\x00\x00\x00\x00\x00\xf8\xbf"
        b'[5,[[7,"e1","view",1790000000000001,"u1",1790000000123,[[0,"i1",2]]],'
        b'[9,"e2","impression",1790000000000002,"u2",1790000000124,[[0,"i2"],[3,"i3"]]],'
        b'[12,"e3","item_upsert",1790000000000000,null,1790000000125,[[0,"i4",0,false,false,"shoes",[1.0,2.0,0.5]]]]]]'
    )
    src, seqs, fws, stamps = serde.decode_forward_pack(old)
    s = FORWARD_SLOTS
    assert (src, seqs, stamps) == (5, [7 * s, 9 * s, 9 * s + 3, 12 * s], [1790000000123, 1790000000124] + [
        1790000000124, 1790000000125])  # fmt: skip
    vec = fws[0].user_vector
    assert vec is not None and vec.dtype == np.float32 and vec.tolist() == [0.5, -1.25, 3.0]
    assert fws[0]._replace(user_vector=None) == Forward("i1", "e1", EventType.VIEW, 1790000000000001, "u1", None,
                                                        (0.25, -1.5))  # fmt: skip
    assert fws[1:] == [
        Forward("i2", "e2", EventType.IMPRESSION, 1790000000000002, "u2"),
        Forward("i3", "e2", EventType.IMPRESSION, 1790000000000002, "u2"),
        Forward("i4", "e3", EventType.ITEM_UPSERT, 1790000000000000, None, None, (), False, "shoes", (1.0, 2.0, 0.5)),
    ]
    # the same forwards in PACK4: smaller, and equal after decoding
    new = serde.encode_forward_pack(src, list(zip(seqs, fws, stamps, strict=True)))
    assert new[0] == serde.PACK4 and len(new) < len(old)
    _, seqs2, fws2, stamps2 = serde.decode_forward_pack(new)
    assert (seqs2, stamps2) == (seqs, stamps) and all(_same(_carried(a), b) for a, b in zip(fws, fws2, strict=True))


def test_user_vectors_of_another_dtype_or_layout_are_converted() -> None:
    """The vector block joins native float32 rows' bytes; other vectors go through numpy's conversion."""
    mat = np.arange(4 * DIM, dtype=np.float32).reshape(DIM, 4)
    cases = [
        np.arange(DIM, dtype=np.float64) / 3,  # float64: converted to float32
        np.arange(DIM, dtype=np.int32),  # integers: converted, not their bytes reinterpreted
        mat[:, 1],  # a strided view (no contiguous buffer)
        np.arange(DIM, dtype=">f4"),  # big-endian float32
    ]
    for vec in cases:
        plain = np.arange(DIM, dtype=np.float32)
        forwards = [(s * FORWARD_SLOTS, Forward(f"i{s}", f"e{s}", EventType.CLICK, s, "u", v, (0.5,)), 0)
                    for s, v in enumerate([plain, vec])]  # fmt: skip
        _, _, fws, _ = serde.decode_forward_pack(serde.encode_forward_pack(0, forwards))
        got = [fw.user_vector for fw in fws]
        assert all(g is not None and g.dtype == np.float32 for g in got)
        assert got[0].tolist() == plain.tolist()  # type: ignore[union-attr]
        assert got[1].tolist() == vec.astype(np.float32).tolist()  # type: ignore[union-attr]


def test_forward_packs_reject_a_body_that_does_not_match_its_head() -> None:
    fw = Forward("i1", "e1", EventType.CLICK, 5, "u1", np.zeros(DIM, dtype=np.float32), (1.0, 2.0))
    # PACK2's head counts the strings (4: event id, type, user, item), PACK3's the entries (1)
    for encode, counts, what in ((_encode_pack2, (3, 5), "strings"), (serde.encode_forward_pack, (0, 2), "entries")):
        data = encode(0, [(FORWARD_SLOTS, fw, 0)])
        for count in counts:
            bad = data[:11] + struct.pack("<I", count) + data[15:]
            for decode in (serde.decode_forward_pack, serde.decode_forward_entries):
                with pytest.raises(StoreError, match=what):
                    decode(bad)


def test_a_pack3_entry_cannot_refer_past_the_items_before_it() -> None:
    forwards = [(k * FORWARD_SLOTS, Forward("i1", f"e{k}", EventType.CLICK, 5, "u1"), 0) for k in range(2)]
    data = serde.encode_forward_pack(0, forwards)
    assert data.count(b'"i1"') == 1 and _pack4_ints(data)[-1] == 0  # the 2nd: item 0
    data3 = _as_pack3(data)
    assert data3.endswith(b',0],["i1"],[]]')
    bad3 = data3[: -len(b',0],["i1"],[]]')] + b',1],["i1"],[]]'
    at = data.index(b'[0,["i1"]')  # the body follows the int block, whose last int64 is the item number
    for n in (1, -1):
        bad4 = data[: at - 8] + struct.pack("<q", n) + data[at:]
        for bad in (bad3, bad4):
            for decode in (serde.decode_forward_pack, serde.decode_forward_entries):
                with pytest.raises(StoreError, match="past its items"):
                    decode(bad)


def test_a_pack_writes_each_item_id_once_and_the_type_as_a_number() -> None:
    fws = [Forward(f"item-{k % 3}", f"e{k}", EventType.VIEW, 5 + k, "u1") for k in range(9)]
    forwards = [(k * FORWARD_SLOTS, fw, 7) for k, fw in enumerate(fws)]
    data = serde.encode_forward_pack(0, forwards)
    assert [data.count(f'"item-{j}"'.encode()) for j in range(3)] == [1, 1, 1] and b"view" not in data
    _, _, fws, _ = serde.decode_forward_pack(data)
    assert fws == [_carried(fw) for _, fw, _ in forwards]
    _, _, items, item_of, entries, _, _, _, _ = serde.decode_forward_entries(data)
    assert items == ["item-0", "item-1", "item-2"] and item_of == [0, 1, 2] * 3  # one string per item
    assert entries == [(EventType.VIEW, 5 + k, -1, 0, 0, None) for k in range(9)]


def test_wire_type_numbers_never_change() -> None:
    """PACK3 writes a type as its number: append new types, never reorder (packs in flight keep their numbers)."""
    assert [t.value for t in serde.WIRE_TYPES] == ["view", "click", "add_to_cart", "purchase", "impression",
                                                   "item_upsert"]  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(_pack(), st.integers(0, 2**20))
def test_the_pack2_format_still_decodes(forwards: list[tuple[int, Forward, int]], src: int) -> None:
    """Records written before an upgrade (format ``PACK2``) may be in flight: they decode as before."""
    data = _encode_pack2(src, forwards)
    assert data[0] == serde.PACK2
    got_src, seqs, fws, stamps = serde.decode_forward_pack(data)
    assert got_src == src
    assert seqs == [s for s, _, _ in forwards]
    assert stamps == [t for _, _, t in forwards]
    assert len(fws) == len(forwards)
    assert all(_same(a, b) for (_, a, _), b in zip(forwards, fws, strict=True))


def test_a_pack_written_by_the_pack2_encoder_decodes() -> None:
    # bytes written by the PACK2 encoder (before PACK3): a view with a user vector and two scores, a slate of
    # two impressions (one of an item seen before), an upsert with a bootstrap vector
    old = (
        b"G\x03\x00\x01\x00\x00\x00\x02\x00\x00\x00\r\x00\x00\x00\x00\x00\x00?\x00\x00\xa0\xbf\x00\x00@@"
        b"\x00\x00\x00\x00\x00\x00\xd0?\x00\x00\x00\x00\x00\x00\xf8\xbf"
        b"[5,[19456,7,1790000000000001,1790000000123,1024,2,1,1,3,5120,3,-2,1],"
        b'["e1","view","u1","i1","e2","impression","u2","i2","i1","e3","item_upsert",null,"i4"],'
        b'[false,"shoes",[1.0,2.0,0.5]]]'
    )
    s = FORWARD_SLOTS
    want = _golden_forwards(None)
    src, seqs, fws, stamps = serde.decode_forward_pack(old)
    assert (src, seqs, stamps) == (5, [q for q, _, _ in want], [t for _, _, t in want])
    vec = fws[0].user_vector
    assert vec is not None and vec.dtype == np.float32 and vec.tolist() == [0.5, -1.25, 3.0]
    assert [fws[0]._replace(user_vector=None), *fws[1:]] == [fw for _, fw, _ in want]
    assert old == _encode_pack2(5, [(q, fw._replace(user_vector=vec) if q == 7 * s else fw, t) for q, fw, t in want])


def _encode_pack2(src: int, forwards: list[tuple[int, Forward, int]]) -> bytes:
    """The ``PACK2`` encoder as it was before ``PACK3`` (type names, every entry's item id): a reference."""
    ints: list[Any] = []
    strs: list[Any] = []
    extras: list[Any] = []
    vectors: list[Any] = []
    scores_flat: list[float] = []
    dim = -1
    prev = -1
    # the current group's position and fields, which the next group's are written relative to
    pos = last_pos = -1
    g_event: Any = None
    g_type: Any = None
    g_user: Any = None
    g_ts_us = g_ts_ms = 0
    shift = FORWARD_SLOTS.bit_length() - 1
    slots = FORWARD_SLOTS
    mask = slots - 1
    values = {t: t.value for t in EventType}
    native = True  # every user vector a native float32 ndarray: the block is their bytes joined
    for seq, f, ts_ms in forwards:
        if seq <= prev:
            raise ValueError(f"forward seqs must increase ({seq} after {prev})")
        prev = seq
        item_id, event_id, etype, ts_us, user_id, uv, scores, eligible, category, bootstrap = f
        pos = seq >> shift
        k = len(scores)
        flags = 8 * k
        if uv is not None:
            flags += 2
        extended = not (eligible is True and category is None and bootstrap is None)
        if extended:
            flags += 4
        new_group = (
            pos != last_pos or event_id != g_event or etype is not g_type or ts_us != g_ts_us
            or user_id != g_user or ts_ms != g_ts_ms
        )  # fmt: skip
        if new_group:
            ints.append((flags + 1) * slots + (seq & mask))
            ints.append(pos - max(last_pos, 0))
            ints.append(ts_us - g_ts_us)
            ints.append(ts_ms - g_ts_ms)
            strs.append(event_id)
            strs.append(values[etype])
            strs.append(user_id)
            last_pos = pos
            g_event, g_type, g_ts_us, g_user, g_ts_ms = event_id, etype, ts_us, user_id, ts_ms
        else:
            ints.append(flags * slots + (seq & mask))
        strs.append(item_id)
        if k:
            scores_flat.extend(scores)
        if uv is not None:
            if len(uv) != dim:
                if dim >= 0:
                    raise ValueError(f"user vectors of one pack differ in length ({len(uv)} vs {dim})")
                dim = len(uv)
            if native and (type(uv) is not np.ndarray or uv.dtype != np.float32):
                native = False
            vectors.append(uv)
        if extended:
            extras.append(eligible)
            extras.append(category)
            extras.append(None if bootstrap is None else [float(x) for x in bootstrap])
    head_bytes = struct.pack("<BHIII", serde.PACK2, max(dim, 0), len(vectors), len(scores_flat), len(strs))
    block = b""
    if vectors:
        if native:
            try:  # the rows' bytes joined: no intermediate array (3x cheaper than np.concatenate)
                block = b"".join(vectors)  # type: ignore[arg-type]  # an ndarray is a buffer
            except (BufferError, TypeError):  # a strided view: no contiguous buffer
                native = False
        if not native:
            block = np.concatenate(vectors).astype("<f4").tobytes()
    score_bytes = struct.pack(f"<{len(scores_flat)}d", *scores_flat) if scores_flat else b""
    return b"".join((head_bytes, block, score_bytes, orjson.dumps([src, ints, strs, extras])))


def _encode_pack1(src: int, forwards: list[tuple[int, Forward, int]]) -> bytes:
    """The ``PACK`` encoder as it was before ``PACK2`` (nested lists per group and entry): a reference."""
    groups: list[list[Any]] = []
    vectors: list[Any] = []
    scores_flat: list[float] = []
    dim = -1
    entries: list[Any] = []
    last_pos = -1
    head: tuple[Any, ...] = ()
    for seq, f, ts_ms in forwards:
        item_id, event_id, etype, ts_us, user_id, uv, scores, eligible, category, bootstrap = f
        pos = seq // FORWARD_SLOTS
        if pos != last_pos or (event_id, etype, ts_us, user_id, ts_ms) != head:
            last_pos = pos
            head = (event_id, etype, ts_us, user_id, ts_ms)
            entries = []
            groups.append([pos, event_id, etype.value, ts_us, user_id, ts_ms, entries])
        k = len(scores)
        scores_flat.extend(scores)
        if uv is not None:
            dim = len(uv)
            vectors.append(uv)
        sub = seq % FORWARD_SLOTS
        if eligible is True and category is None and bootstrap is None:
            if uv is not None:
                entries.append([sub, item_id, k])
                continue
            if not k:
                entries.append([sub, item_id])
                continue
        entries.append([sub, item_id, k, uv is not None, eligible, category,
                        None if bootstrap is None else [float(x) for x in bootstrap]])  # fmt: skip
    head_bytes = struct.pack("<BHII", serde.PACK, max(dim, 0), len(vectors), len(scores_flat))
    block = np.concatenate(vectors).astype("<f4").tobytes() if vectors else b""
    return head_bytes + block + np.array(scores_flat, "<f8").tobytes() + orjson.dumps([src, groups])


def test_state_values_are_head_vector_bytes_and_body() -> None:
    """The state format (what stores, changelogs, serving and replay read), whatever the vector's layout."""
    mat = np.arange(4 * DIM, dtype=np.float32).reshape(DIM, 4) / 7
    vectors = [None, np.arange(DIM, dtype=np.float32) / 3, np.arange(DIM, dtype=np.float64) / 3, mat[:, 2],
               np.arange(DIM, dtype=">f4"), np.zeros(0, dtype=np.float32)]  # fmt: skip
    for vec in vectors:
        user = UserState(recent=[(5, "e1", "i1", "view")], session=(5, "e1", "s", None, "web"), seen={"e1": 5},
                         max_ts=5, vector=vec, steps=1, version=1, offsets={"events": 3})  # fmt: skip
        item = ItemState(b5={3: [1, 0, 1]}, vector=vec, category="c", upsert_key=(4, "u1"))
        vec_bytes = b"" if vec is None else vec.astype("<f4").tobytes()
        head = struct.pack("<BH", serde.FORMAT, 0 if vec is None else len(vec))
        assert serde.FORMAT == 2
        assert serde.encode_user(user) == head + vec_bytes + msgspec.msgpack.encode(_user_body(user))
        item_body = [item.counts, [[3, 1, 0, 1]], [], item.max_ts, item.eligible, item.category, item.steps,
                     item.version, item.offsets, item.upsert_key]  # fmt: skip
        assert serde.encode_item(item) == head + vec_bytes + msgspec.msgpack.encode(item_body)
        back = serde.decode_user(serde.encode_user(user)).vector
        if vec is None or not len(vec):
            assert back is None
        else:
            assert back is not None and back.tolist() == vec.astype(np.float32).tolist()


def _what_the_item_stage_reads(fw: Forward) -> tuple[Any, ...]:
    """A forward as the item stage applies it: an upsert's fields, else the user vector and, with it, the scores."""
    if fw.type is EventType.ITEM_UPSERT:
        return (fw.type, fw.ts_us, None, (), (fw.event_id, fw.eligible, fw.category, fw.bootstrap))
    vec = fw.user_vector
    if vec is None:
        return (fw.type, fw.ts_us, None, (), None)
    return (fw.type, fw.ts_us, vec.tolist(), tuple(fw.neg_scores), None)


def _entry_view(entry: Any, U: Any, S: Any) -> tuple[Any, ...]:
    etype, ts_us, row, first, k, upsert = entry
    if etype is EventType.ITEM_UPSERT:
        return (etype, ts_us, None, (), upsert)
    if row < 0:
        return (etype, ts_us, None, (), None)
    return (etype, ts_us, U[row].tolist(), tuple(S[first : first + k].tolist()), None)


@settings(max_examples=300, deadline=None)
@given(_pack(), st.integers(0, 2**20), st.integers(0, 50), st.integers(0, 50), st.sampled_from([1, 2, 3]))
def test_forward_pack_entries_stand_for_its_forwards(
    forwards: list[tuple[int, Forward, int]], src: int, row_base: int, score_base: int, fmt: int
) -> None:
    """``decode_forward_entries`` (the item stage's decode) reads what ``decode_forward_pack`` does, every format."""
    encode = {1: _encode_pack1, 2: _encode_pack2, 3: serde.encode_forward_pack}[fmt]
    data = encode(src, forwards)
    got = serde.decode_forward_entries(data, row_base, score_base)
    got_src, seqs, items, item_of, entries, stamps, dim, vec_block, score_block = got
    assert (got_src, seqs.tolist(), stamps) == (src, [s for s, _, _ in forwards], [t for _, _, t in forwards])
    assert [items[j] for j in item_of] == [fw.item_id for _, fw, _ in forwards]
    assert items == list(dict.fromkeys(fw.item_id for _, fw, _ in forwards))  # each once, in order
    # the blocks as they sit in a batch's arrays: after row_base rows and score_base scores of other packs
    U, S = serde.entry_arrays(dim or DIM, [bytes(4 * (dim or DIM) * row_base), vec_block],
                              [bytes(8 * score_base), score_block])  # fmt: skip
    assert [_entry_view(e, U, S) for e in entries] == [_what_the_item_stage_reads(fw) for _, fw, _ in forwards]
    assert all(type(e) is tuple for e in entries)


def test_forward_pack_entries_reject_what_the_forward_decode_rejects() -> None:
    fw = Forward("i1", "e1", EventType.CLICK, 5, "u1", np.zeros(DIM, dtype=np.float32), (1.0, 2.0))
    data = serde.encode_forward_pack(0, [(FORWARD_SLOTS, fw, 0)])
    with pytest.raises(StoreError, match="too short"):
        serde.decode_forward_entries(data[:40])
    with pytest.raises(StoreError, match="not a forward pack"):
        serde.decode_forward_entries(_an_item_state())
    with pytest.raises(StoreError, match="too short"):
        serde.decode_forward_entries(b"")


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.integers(-(2**40), 2**40), st.lists(st.integers(0, 2**31), min_size=0, max_size=5)))
def test_bucket_rows_are_each_index_then_its_counts_by_index(buckets: dict[int, list[int]]) -> None:
    assert serde._buckets_out(buckets) == [[k, *buckets[k]] for k in sorted(buckets)]


# -- states: round trips and the older format (FORMAT_JSON) ------------------------------------------

#: every integer both body formats hold (orjson and MessagePack: int64 and uint64)
_ints = st.integers(-(2**63), 2**64 - 1)
_ids = st.text(max_size=12)  # any unicode (hypothesis leaves out lone surrogates, which UTF-8 cannot hold)
_opt_ids = st.none() | _ids
_vectors = st.none() | st.lists(_floats, min_size=1, max_size=9).map(lambda xs: np.array(xs, dtype=np.float32))


@st.composite
def _user(draw: Any) -> UserState:
    session = draw(st.none() | st.tuples(_ints, _ids, _opt_ids, _opt_ids, _opt_ids))
    return UserState(
        counts=draw(st.lists(_ints, max_size=7)),
        recent=draw(st.lists(st.tuples(_ints, _ids, _ids, _ids), max_size=6)),
        session=session,
        seen=draw(st.dictionaries(_ids, _ints, max_size=6)),
        max_ts=draw(_ints),
        vector=draw(_vectors),
        steps=draw(_ints),
        version=draw(_ints),
        offsets=draw(st.dictionaries(_ids, _ints, max_size=3)),
    )


_buckets = st.dictionaries(_ints, st.lists(_ints, min_size=3, max_size=3), max_size=4)


@st.composite
def _item(draw: Any) -> ItemState:
    return ItemState(
        counts=draw(st.lists(_ints, max_size=7)),
        b5=draw(_buckets),
        b60=draw(_buckets),
        max_ts=draw(_ints),
        eligible=draw(st.booleans()),
        category=draw(_opt_ids),
        vector=draw(_vectors),
        steps=draw(_ints),
        version=draw(_ints),
        offsets=draw(st.dictionaries(_ids, _ints, max_size=3)),
        upsert_key=draw(st.none() | st.tuples(_ints, _ids)),
    )


def _fields(s: UserState | ItemState) -> tuple[Any, ...]:
    """A state's fields with the vector as its float32 bytes (ndarrays do not compare with ==);
    dicts as item lists, so that their order counts too, except an item's buckets, which both formats
    write sorted by index."""
    out: list[Any] = []
    for name in type(s).__dataclass_fields__:
        v = getattr(s, name)
        if name == "vector":
            v = None if v is None else (v.dtype.str, v.tobytes())
        elif name in ("b5", "b60"):
            v = sorted(v.items())
        elif isinstance(v, dict):
            v = list(v.items())
        out.append((name, v))
    return tuple(out)


def _user_body(s: UserState) -> list[Any]:
    return [s.counts, s.recent, s.session, s.seen, s.max_ts, s.steps, s.version, s.offsets]


def _item_body(s: ItemState) -> list[Any]:
    rows = [[[k, *b[k]] for k in sorted(b)] for b in (s.b5, s.b60)]
    return [s.counts, rows[0], rows[1], s.max_ts, s.eligible, s.category, s.steps, s.version, s.offsets,
            s.upsert_key]  # fmt: skip


def _encode_json_state(vector: Any, body: list[Any]) -> bytes:
    """The encoder of format 1 (FORMAT_JSON, before 2026-12-02), kept here to write its values."""
    if vector is None:
        return struct.pack("<BH", 1, 0) + orjson.dumps(body)
    return struct.pack("<BH", 1, len(vector)) + vector.astype("<f4").tobytes() + orjson.dumps(body)


@settings(max_examples=300, deadline=None)
@given(_user())
def test_user_states_round_trip(user: UserState) -> None:
    data = serde.encode_user(user)
    assert data[0] == serde.FORMAT
    assert _fields(serde.decode_user(data)) == _fields(user)
    # what the format 1 encoder wrote for the same state decodes to the same state
    assert _fields(serde.decode_user(_encode_json_state(user.vector, _user_body(user)))) == _fields(user)


@settings(max_examples=300, deadline=None)
@given(_item())
def test_item_states_round_trip(item: ItemState) -> None:
    data = serde.encode_item(item)
    assert data[0] == serde.FORMAT
    assert _fields(serde.decode_item(data)) == _fields(item)
    old = _encode_json_state(item.vector, _item_body(item))
    assert _fields(serde.decode_item(old)) == _fields(item)
    for value in (data, old):  # the serving catalog's and the replica's readers, on either format
        vector, body = serde.item_summary(value)
        assert body == orjson.loads(orjson.dumps(_item_body(item)))  # tuples read back as lists
        for got in (vector, serde.vector_of(value)):
            assert (got is None and item.vector is None) or got.tobytes() == item.vector.tobytes()  # type: ignore[union-attr]


#: values written by the format 1 encoder (main at b8d8e62), checked in: a user with a vector, a
#: non-ASCII item id and a None in its session; a user without a vector and with a uint64 version; an
#: item with buckets, a category and an upsert key
_JSON_USER = (
    b'\x01\x03\x00\x00\x00\x80?\x00\x00 \xc0\x00\x00\x00?[[2,1,0,0,0,0],[[1790000000000002,"e2","i\xc3\xa9","click"],'
    b'[1790000000000001,"e1","i1","view"]],[1790000000000002,"e2","s1",null,"web"],'
    b'{"e1":1790000000000001,"e2":1790000000000002},1790000000000002,1,2,{"events":41}]'
)
_JSON_USER_BARE = b"\x01\x00\x00[[0,0,0,0,0,0],[],null,{},-5,0,18446744073709551615,{}]"
_JSON_ITEM = (
    b"\x01\x02\x00\x00\x00\x80>\x00\x00\x80@[[3,1,0,0,2,0],[[5966666,2,1,1]],[[497222,2,1,1]],1790000000000002,"
    b'false,"shoes",1,3,{"events.by-item":7},[1790000000000000,"up1"]]'
)


def test_states_written_by_the_format_1_encoder_decode() -> None:
    """Stores, changelogs and snapshots written before the upgrade hold format 1: read as before."""
    user = serde.decode_user(_JSON_USER)
    expected = UserState(
        counts=[2, 1, 0, 0, 0, 0],
        recent=[(1790000000000002, "e2", "i\u00e9", "click"), (1790000000000001, "e1", "i1", "view")],
        session=(1790000000000002, "e2", "s1", None, "web"),
        seen={"e1": 1790000000000001, "e2": 1790000000000002},
        max_ts=1790000000000002,
        vector=np.array([1.0, -2.5, 0.5], dtype=np.float32),
        steps=1,
        version=2,
        offsets={"events": 41},
    )
    assert _fields(user) == _fields(expected)
    bare = UserState(counts=[0] * 6, max_ts=-5, version=2**64 - 1)
    assert _fields(serde.decode_user(_JSON_USER_BARE)) == _fields(bare)
    item = ItemState(
        counts=[3, 1, 0, 0, 2, 0], b5={5966666: [2, 1, 1]}, b60={497222: [2, 1, 1]}, max_ts=1790000000000002,
        eligible=False, category="shoes", vector=np.array([0.25, 4.0], dtype=np.float32), steps=1, version=3,
        offsets={"events.by-item": 7}, upsert_key=(1790000000000000, "up1"),
    )  # fmt: skip
    assert _fields(serde.decode_item(_JSON_ITEM)) == _fields(item)
    vector, body = serde.item_summary(_JSON_ITEM)
    assert vector is not None and vector.tolist() == [0.25, 4.0]
    assert body[3:6] == [1790000000000002, False, "shoes"]
    assert serde.vector_of(_JSON_USER).tolist() == [1.0, -2.5, 0.5]  # type: ignore[union-attr]
    assert serde.vector_of(_JSON_USER_BARE) is None
    # re-encoding writes the current format, to the same state
    again = serde.encode_user(user)
    assert again[0] == serde.FORMAT and _fields(serde.decode_user(again)) == _fields(expected)


def test_unknown_state_formats_are_rejected() -> None:
    value = serde.encode_user(UserState(vector=np.ones(2, dtype=np.float32)))
    for fmt in (0, 3, serde.PACK2):
        bad = bytes([fmt]) + value[1:]
        for read in (serde.decode_user, serde.decode_item, serde.item_summary, serde.vector_of):
            with pytest.raises(StoreError, match="unknown state format"):
                read(bad)
    with pytest.raises(StoreError, match="too short"):
        serde.decode_user(b"\x02\x00")


def test_a_failed_encoding_leaves_the_next_one_intact() -> None:
    """An int no body format holds raises; the encoder's reused buffers do not carry anything over."""
    good = UserState(recent=[(5, "e1", "i1", "view")], seen={"e1": 5}, max_ts=5, offsets={"events": 3})
    expected = serde.encode_user(good)
    with pytest.raises(OverflowError):
        serde.encode_user(UserState(max_ts=2**64, seen={"x" * 5000: 1}))
    assert serde.encode_user(good) == expected
    big = UserState(seen={str(i): i for i in range(10_000)})  # a body larger than a kept buffer
    assert _fields(serde.decode_user(serde.encode_user(big))) == _fields(big)
    assert serde.encode_user(good) == expected


def _odd_vector(v: Any, how: int) -> Any:
    """``v`` as float64 (converted on encode) or as a strided float32 view (no contiguous buffer), by ``how``."""
    if v is None or how == 0:
        return v
    if how == 1:
        return v.astype(np.float64)
    doubled = np.repeat(v, 2)
    return doubled[::2]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_user(), st.integers(0, 2)), max_size=8))
def test_a_batch_of_user_states_encodes_to_each_ones_bytes(drawn: list[tuple[UserState, int]]) -> None:
    users = [u for u, _ in drawn]
    for u, how in drawn:
        u.vector = _odd_vector(u.vector, how)
    # a big state in between: the batch's buffer shrinks back to each body after it
    users = [*users, UserState(seen={str(i): i for i in range(3000)}), *users]
    assert serde.encode_users(users) == [serde.encode_user(u) for u in users]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_item(), st.integers(0, 2)), max_size=8))
def test_a_batch_of_item_states_encodes_to_each_ones_bytes(drawn: list[tuple[ItemState, int]]) -> None:
    items = [i for i, _ in drawn]
    for i, how in drawn:
        i.vector = _odd_vector(i.vector, how)
    items = [*items, ItemState(b5={k: [k, 1, 2] for k in range(3000)}), *items]
    assert serde.encode_items(items) == [serde.encode_item(i) for i in items]


def test_a_failed_batch_encoding_leaves_the_next_one_intact() -> None:
    good = [UserState(recent=[(5, "e1", "i1", "view")], seen={"e1": 5}, max_ts=5, offsets={"events": 3}), UserState()]
    expected = [serde.encode_user(u) for u in good]
    with pytest.raises(OverflowError):
        serde.encode_users([good[0], UserState(max_ts=2**64, seen={"x" * 5000: 1})])
    assert serde.encode_users(good) == expected
    with pytest.raises(OverflowError):
        serde.encode_items([ItemState(max_ts=-(2**64))])
    assert serde.encode_users(good) == expected and serde.encode_users([]) == []


def _state_bytes(vector: Any, body: list[Any]) -> bytes:
    """The state format written out by hand: header, the vector's little-endian float32s, msgspec's body."""
    vec = b"" if vector is None else vector.astype("<f4").tobytes()
    return struct.pack("<BH", serde.FORMAT, 0 if vector is None else len(vector)) + vec + msgspec.msgpack.encode(body)


@settings(max_examples=300, deadline=None)
@given(_user(), _item(), st.integers(0, 2), st.binary(max_size=600))
def test_state_values_written_in_place_are_msgspecs_bytes(
    user: UserState, item: ItemState, how: int, junk: bytes
) -> None:
    """``_value_into`` (the compiled build's writer: header and vector into the scratch buffer, msgspec's body after
    them) gives the format's bytes whatever the buffer held before, or None where ``_value`` must write them: a
    vector that is not float32. Run in both builds (plain Python calls it here only)."""
    cases: list[tuple[Any, list[Any], Any]] = [
        (user, _user_body(user), serde.encode_user),
        (item, _item_body(item), serde.encode_item),
    ]
    for state, body, encode in cases:
        state.vector = _odd_vector(state.vector, how)
        expected = _state_bytes(state.vector, body)
        assert encode(state) == expected
        buf = bytearray(junk)  # a buffer left longer, or shorter, by the state before
        value = serde._value_into(state.vector, body, buf)
        if how == 1 and state.vector is not None:  # float64: converted by _value
            assert value is None
        else:  # a strided float32 view is written too (its C-order floats)
            assert type(value) is bytes and value == expected
    assert serde.encode_users([user]) == [serde.encode_user(user)]
    assert serde.encode_items([item]) == [serde.encode_item(item)]


def test_vectors_written_in_place_or_left_to_value() -> None:
    """The vectors ``_value_into`` leaves to ``_value`` (another dtype or byte order, more than one axis, a
    dimension past the header's uint16) encode as before; a float32 row of 65535 is written in place."""
    body = _user_body(UserState(seen={"é": 5}))
    mat = np.arange(6, dtype=np.float32).reshape(2, 3)
    for vec in (np.ones(3, dtype=np.float64), np.ones(3, dtype=">f4"), mat, np.ones(1 << 16, dtype=np.float32)):
        assert serde._value_into(vec, body, bytearray()) is None
    # a 2-row matrix: the header says 2 and the whole buffer follows, as _value joins it (not a valid state)
    assert serde._pack(mat, body) == struct.pack("<BH", serde.FORMAT, 2) + mat.tobytes() + msgspec.msgpack.encode(body)
    with pytest.raises(struct.error):
        serde._pack(np.ones(1 << 16, dtype=np.float32), body)
    wide = np.arange(65535, dtype=np.float32)
    assert serde._value_into(wide, body, bytearray(b"x")) == _state_bytes(wide, body)
    assert serde._value_into(None, body, bytearray(100)) == _state_bytes(None, body)
