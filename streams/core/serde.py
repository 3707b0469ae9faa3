"""Byte formats of states and forwards (pure; shared by stores, changelogs and replay).

A state value is ``FORMAT(1 byte) | dim(uint16 LE) | dim x float32 LE | orjson body``.
The raw float32 block makes vectors cheap to read (serving copies them straight
into its index) and lets an offline-trained table be bootstrapped by writing the
same format. ``FORMAT`` is bumped whenever the body changes; readers reject
formats they do not know.

``feature_digest`` is the canonical encoding of the deterministic part of a
state: what replay parity checksums compare (vectors and offsets excluded).
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import orjson

from streams.core.state import Forward, ItemState, UserState, Vec
from streams.errors import StoreError
from streams.events import EventType

__all__ = [
    "item_summary",
    "encode_user",
    "decode_user",
    "encode_item",
    "decode_item",
    "encode_forward",
    "decode_forward",
    "vector_of",
    "user_digest",
    "item_digest",
]

FORMAT = 1
_HEAD = struct.Struct("<BH")
_TYPES = {t.value: t for t in EventType}


def _pack(vector: Vec | None, body: Any) -> bytes:
    if vector is None:
        return _HEAD.pack(FORMAT, 0) + orjson.dumps(body)
    return _HEAD.pack(FORMAT, len(vector)) + vector.astype("<f4", copy=False).tobytes() + orjson.dumps(body)


def _unpack(data: bytes) -> tuple[Vec | None, Any]:
    if len(data) < _HEAD.size:
        raise StoreError("state value too short")
    fmt, dim = _HEAD.unpack_from(data)
    if fmt != FORMAT:
        raise StoreError(f"unknown state format {fmt}; this build reads format {FORMAT}")
    end = _HEAD.size + 4 * dim
    vector = np.frombuffer(data, dtype="<f4", count=dim, offset=_HEAD.size).copy() if dim else None
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
    vector = np.frombuffer(data, dtype="<f4", count=dim, offset=_HEAD.size) if dim else None
    body: list[Any] = orjson.loads(data[end:])
    return vector, body


def vector_of(data: bytes) -> Vec | None:
    """Just the vector of an encoded state, without parsing the body."""
    fmt, dim = _HEAD.unpack_from(data)
    if fmt != FORMAT:
        raise StoreError(f"unknown state format {fmt}")
    return np.frombuffer(data, dtype="<f4", count=dim, offset=_HEAD.size) if dim else None


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
    return [[k, *v] for k, v in sorted(buckets.items())]


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


def encode_forward(f: Forward, src_partition: int, src_offset: int) -> bytes:
    """Encode a forward with its source position (used by the item stage to drop re-sends)."""
    body = [
        f.item_id, f.event_id, f.type.value, f.ts_us, f.user_id, f.neg_scores, f.eligible, f.category,
        f.bootstrap, src_partition, src_offset,
    ]  # fmt: skip
    return _pack(f.user_vector, body)


def decode_forward(data: bytes) -> tuple[Forward, int, int]:
    """Decode a forward -> (forward, source partition, source offset)."""
    vector, b = _unpack(data)
    fw = Forward(
        item_id=b[0],
        event_id=b[1],
        type=_TYPES[b[2]],
        ts_us=b[3],
        user_id=b[4],
        user_vector=vector,
        neg_scores=tuple(b[5]),
        eligible=b[6],
        category=b[7],
        bootstrap=tuple(b[8]) if b[8] is not None else None,
    )
    return fw, b[9], b[10]


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
