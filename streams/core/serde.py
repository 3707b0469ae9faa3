"""Byte formats of states and forwards (pure; shared by stores, changelogs and replay).

A state value is ``FORMAT(1 byte) | dim(uint16 LE) | dim x float32 LE | orjson body``.
The raw float32 block makes vectors cheap to read (serving copies them straight
into its index) and lets an offline-trained table be bootstrapped by writing the
same format. ``FORMAT`` is bumped whenever the body changes; readers reject
formats they do not know.

A forward pack (topic ``events.by-item``) holds all of one user-stage batch's forwards bound for one
item partition, grouped by source record (the shared event fields once, then each item with its
forward sub-index), user vectors as one float32 block and negatives' scores as one float64 block;
see :func:`encode_forward_pack`.

``feature_digest`` is the canonical encoding of the deterministic part of a
state: what replay parity checksums compare (vectors and offsets excluded).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

from streams.core.state import FORWARD_SLOTS, TYPE_VALUE, Forward, ItemState, UserState, Vec
from streams.errors import StoreError
from streams.events import EventType

__all__ = [
    "item_summary",
    "encode_user",
    "decode_user",
    "encode_item",
    "decode_item",
    "encode_forward_pack",
    "decode_forward_pack",
    "vector_of",
    "user_digest",
    "item_digest",
]

FORMAT = 1
_HEAD = struct.Struct("<BH")
_TYPES = {t.value: t for t in EventType}
#: the first byte of a forward pack (never a state FORMAT, so the two cannot be confused)
PACK = 0x46
_PACK_HEAD = struct.Struct("<BHII")
_new = tuple.__new__
_SLOT_BITS = FORWARD_SLOTS.bit_length() - 1  # seq >> _SLOT_BITS is the source position
#: dtype objects, passed positionally: numpy parses a dtype string and keyword arguments on every call
_F4 = np.dtype("<f4")
_F8 = np.dtype("<f8")
_frombuffer = np.frombuffer
_dumps = orjson.dumps  # a module global: no attribute lookup on orjson per state
if 1 << _SLOT_BITS != FORWARD_SLOTS:
    raise ImportError("FORWARD_SLOTS must be a power of two for the forward pack")


def _floats(xs: Any) -> Any:
    """A sequence of floats as something orjson writes exactly (a float32 row becomes Python floats)."""
    if isinstance(xs, tuple | list):
        return xs
    if isinstance(xs, np.ndarray):
        return xs.tolist()
    return [float(x) for x in xs]


def _pack(vector: Vec | None, body: Any) -> bytes:
    if vector is None:
        return _HEAD.pack(FORMAT, 0) + _dumps(body)
    if vector.dtype != _F4:  # the core's vectors are float32 already: no conversion, no copy
        vector = vector.astype(_F4)
    return _HEAD.pack(FORMAT, len(vector)) + vector.tobytes() + _dumps(body)


def _unpack(data: bytes) -> tuple[Vec | None, Any]:
    if len(data) < _HEAD.size:
        raise StoreError("state value too short")
    fmt, dim = _HEAD.unpack_from(data)
    if fmt != FORMAT:
        raise StoreError(f"unknown state format {fmt}; this build reads format {FORMAT}")
    end = _HEAD.size + 4 * dim
    vector = _frombuffer(data, _F4, dim, _HEAD.size).copy() if dim else None
    return vector, orjson.loads(data[end:])


def item_summary(data: bytes) -> tuple[Vec | None, list[Any]]:
    """An encoded item state's vector (a read-only view) and raw body list, without building an ItemState.

    Body layout (see :func:`encode_item`): ``[counts, b5_rows, b60_rows, max_ts, eligible, category,
    steps, version, offsets, upsert_key]`` with bucket rows ``[index, impressions, clicks, positives]``.
    For readers that need a few fields of many items fast (the serving catalog).
    """
    fmt, dim = _HEAD.unpack_from(data)
    if fmt != FORMAT:
        raise StoreError(f"unknown state format {fmt}; this build reads format {FORMAT}")
    end = _HEAD.size + 4 * dim
    vector = _frombuffer(data, _F4, dim, _HEAD.size) if dim else None
    body: list[Any] = orjson.loads(data[end:])
    return vector, body


def vector_of(data: bytes) -> Vec | None:
    """Just the vector of an encoded state, without parsing the body."""
    fmt, dim = _HEAD.unpack_from(data)
    if fmt != FORMAT:
        raise StoreError(f"unknown state format {fmt}")
    return _frombuffer(data, _F4, dim, _HEAD.size) if dim else None


def encode_user(s: UserState) -> bytes:
    """Encode a user state."""
    return _pack(s.vector, [s.counts, s.recent, s.session, s.seen, s.max_ts, s.steps, s.version, s.offsets])


def decode_user(data: bytes) -> UserState:
    """Decode a user state."""
    vector, b = _unpack(data)
    return UserState(
        counts=b[0],
        recent=[tuple(r) for r in b[1]],
        session=tuple(b[2]) if b[2] is not None else None,
        seen=b[3],
        max_ts=b[4],
        vector=vector,
        steps=b[5],
        version=b[6],
        offsets=b[7],
    )


def _buckets_out(buckets: dict[int, list[int]]) -> list[list[int]]:
    return [[k, *buckets[k]] for k in sorted(buckets)]  # sorting the keys: no (key, value) tuple per bucket


def _buckets_in(rows: list[list[int]]) -> dict[int, list[int]]:
    return {r[0]: r[1:] for r in rows}


def encode_item(s: ItemState) -> bytes:
    """Encode an item state."""
    body = [
        s.counts, _buckets_out(s.b5), _buckets_out(s.b60), s.max_ts, s.eligible, s.category,
        s.steps, s.version, s.offsets, s.upsert_key,
    ]  # fmt: skip
    return _pack(s.vector, body)


def decode_item(data: bytes) -> ItemState:
    """Decode an item state."""
    vector, b = _unpack(data)
    return ItemState(
        counts=b[0],
        b5=_buckets_in(b[1]),
        b60=_buckets_in(b[2]),
        max_ts=b[3],
        eligible=b[4],
        category=b[5],
        vector=vector,
        steps=b[6],
        version=b[7],
        offsets=b[8],
        upsert_key=tuple(b[9]) if b[9] is not None else None,
    )


def encode_forward_pack(src: int, forwards: Sequence[tuple[int, Forward, int]]) -> bytes:
    """Encode ``(seq, forward, source record ts ms)`` triples, seqs strictly increasing, as one record.

    ``src`` is the source partition id the item stage keeps a high-water mark for, and ``seq`` a
    forward's number there (``position * FORWARD_SLOTS + sub``, :func:`streams.core.state.forward_seqs`).
    Layout: ``PACK | dim uint16 | vectors uint32 | scores uint32 | vectors x dim float32 | scores x
    float64 | orjson body``. The body is ``[src, groups]``; consecutive forwards of one source record
    share a group ``[position, event_id, type, ts_us, user_id, record ts ms, entries]``, and an entry
    is ``[sub, item_id]`` (no vector, no negatives), ``[sub, item_id, k]`` (the next vector row is its
    user vector, the next ``k`` scores its negatives' scores) or ``[sub, item_id, k, has_vector,
    eligible, category, bootstrap]``. Scores travel as float64: exact for any Python or float32 value.
    """
    groups: list[list[Any]] = []
    vectors: list[Vec] = []
    scores_flat: list[float] = []
    add_scores = scores_flat.extend
    dim = -1
    entries: list[Any] = []
    last_pos = -1
    head: tuple[Any, ...] = ()
    prev = -1
    shift = _SLOT_BITS
    mask = FORWARD_SLOTS - 1
    values = TYPE_VALUE
    for seq, f, ts_ms in forwards:
        if seq <= prev:
            raise ValueError(f"forward seqs must increase ({seq} after {prev})")
        prev = seq
        item_id, event_id, etype, ts_us, user_id, uv, scores, eligible, category, bootstrap = f
        pos = seq >> shift
        if pos != last_pos or (event_id, etype, ts_us, user_id, ts_ms) != head:
            last_pos = pos
            head = (event_id, etype, ts_us, user_id, ts_ms)
            entries = []
            groups.append([pos, event_id, values[etype], ts_us, user_id, ts_ms, entries])
        k = len(scores)
        if k:
            add_scores(scores)
        if uv is not None:
            if len(uv) != dim:
                if dim >= 0:
                    raise ValueError(f"user vectors of one pack differ in length ({len(uv)} vs {dim})")
                dim = len(uv)
            vectors.append(uv)
        if eligible is True and category is None and bootstrap is None:
            if uv is not None:
                entries.append([seq & mask, item_id, k])
                continue
            if not k:
                entries.append([seq & mask, item_id])
                continue
        entries.append(
            [seq & mask, item_id, k, uv is not None, eligible, category,
             None if bootstrap is None else _floats(bootstrap)]
        )  # fmt: skip
    head_bytes = _PACK_HEAD.pack(PACK, max(dim, 0), len(vectors), len(scores_flat))
    block = np.concatenate(vectors).astype(_F4, copy=False).tobytes() if vectors else b""
    score_bytes = np.array(scores_flat, _F8).tobytes() if scores_flat else b""
    return head_bytes + block + score_bytes + orjson.dumps([src, groups])


def decode_forward_pack(data: bytes) -> tuple[int, list[int], list[Forward], list[int]]:
    """Decode a forward pack -> (source partition id, seqs, forwards, source record ts ms), in pack order."""
    if len(data) < _PACK_HEAD.size:
        raise StoreError("forward pack too short")
    fmt, dim, rows, n_scores = _PACK_HEAD.unpack_from(data)
    if fmt != PACK:
        raise StoreError(f"not a forward pack (first byte {fmt})")
    at = _PACK_HEAD.size + 4 * dim * rows
    vecs: list[Vec] = (
        list(_frombuffer(data, _F4, dim * rows, _PACK_HEAD.size).reshape(rows, dim).copy()) if rows else []
    )
    # a tuple: its slices are each forward's neg_scores (no list per forward)
    flat: tuple[float, ...] = tuple(_frombuffer(data, _F8, n_scores, at).tolist()) if n_scores else ()
    src, groups = orjson.loads(memoryview(data)[at + 8 * n_scores :])
    seqs: list[int] = []
    forwards: list[Forward] = []
    stamps: list[int] = []
    types = _TYPES
    shift = _SLOT_BITS
    row = 0
    si = 0
    for pos, event_id, type_value, ts_us, user_id, ts_ms, entries in groups:
        etype = types[type_value]
        base = pos << shift
        for e in entries:
            n = len(e)
            fw: tuple[Any, ...]
            if n == 2:
                fw = (e[1], event_id, etype, ts_us, user_id, None, (), True, None, None)
            elif n == 3:
                k = e[2]
                fw = (e[1], event_id, etype, ts_us, user_id, vecs[row], flat[si : si + k], True, None, None)
                row += 1
                si += k
            else:
                k = e[2]
                vec = None
                if e[3]:
                    vec = vecs[row]
                    row += 1
                fw = (e[1], event_id, etype, ts_us, user_id, vec, flat[si : si + k], e[4], e[5],
                      None if e[6] is None else tuple(e[6]))  # fmt: skip
                si += k
            seqs.append(base + e[0])
            forwards.append(_new(Forward, fw))
        stamps.extend([ts_ms] * len(entries))
    if row != rows or si != n_scores:
        raise StoreError(f"forward pack holds {rows} vectors and {n_scores} scores, its entries use {row} and {si}")
    return src, seqs, forwards, stamps


def user_digest(s: UserState) -> bytes:
    """Canonical bytes of the deterministic part of a user state."""
    return orjson.dumps([s.counts, s.recent, s.session, sorted(s.seen.items()), s.max_ts, s.steps, s.version])


def item_digest(s: ItemState) -> bytes:
    """Canonical bytes of the deterministic part of an item state."""
    return orjson.dumps(
        [
            s.counts,
            _buckets_out(s.b5),
            _buckets_out(s.b60),
            s.max_ts,
            s.eligible,
            s.category,
            s.steps,
            s.version,
            s.upsert_key,
        ]  # fmt: skip
    )
