"""Byte formats of states and forwards (pure; shared by stores, changelogs and replay).

A state value is ``FORMAT(1 byte) | dim(uint16 LE) | dim x float32 LE | body``.
The raw float32 block makes vectors cheap to read (serving copies them straight
into its index) and lets an offline-trained table be bootstrapped by writing the
same format. ``FORMAT`` is bumped whenever the body changes; readers reject
formats they do not know. The body is the state's field list (:func:`encode_user`,
:func:`encode_item`) as MessagePack (``FORMAT`` 2, written since 2026-12-02; tuples
become arrays); ``FORMAT_JSON`` (1, the format before) is the same list as orjson
JSON and is still read: stores and changelogs written before an upgrade hold it.
MessagePack writes an integer as binary (event times are int64 microseconds, which
orjson spent ~350-400 instructions on each): a user state costs ~9.5k instructions
to encode instead of ~13.5k, and ~20% fewer bytes.

A forward pack (topic ``events.by-item``) holds all of one user-stage batch's forwards bound for one
item partition, grouped by source record (the shared event fields once, then each item with its
forward sub-index, each item's id once), user vectors as one float32 block and negatives' scores as
one float64 block, the entries' integers as one int64 block; see :func:`encode_forward_pack`. The item
stage decodes it with :func:`decode_forward_entries`.

``feature_digest`` is the canonical encoding of the deterministic part of a
state: what replay parity checksums compare (vectors and offsets excluded).
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np
import orjson

from streams.core.state import (
    FORWARD_SLOTS,
    Forward,
    ItemEntry,
    ItemState,
    UserState,
    Vec,
    forward_entries,
)
from streams.errors import StoreError
from streams.events import EventType

__all__ = [
    "item_summary",
    "encode_user",
    "encode_users",
    "decode_user",
    "encode_item",
    "encode_items",
    "decode_item",
    "encode_forward_pack",
    "decode_forward_pack",
    "decode_forward_entries",
    "entry_arrays",
    "WIRE_TYPES",
    "vector_of",
    "user_digest",
    "item_digest",
]

#: the state format written: MessagePack body
FORMAT = 2
#: the state format before (orjson body), still read
FORMAT_JSON = 1
_HEAD = struct.Struct("<BH")
_HEAD_SIZE = _HEAD.size
_TYPES = {t.value: t for t in EventType}
_UPSERT = EventType.ITEM_UPSERT
#: the first byte of a forward pack (never a state FORMAT, so the two cannot be confused): PACK4 is
#: written; PACK3 (the same entries, their integers in the orjson body), PACK2 (type names, every
#: entry's item id) and PACK (nested lists per group and entry), the formats before, are still read
PACK = 0x46
PACK2 = 0x47
PACK3 = 0x48
PACK4 = 0x49
_PACK_HEAD = struct.Struct("<BHII")
_PACK23_HEAD = struct.Struct("<BHIII")
#: PACK4: PACK3's head and the number of int64s in the int block
_PACK4_HEAD = struct.Struct("<BHIIII")
#: at most a forward's integers in a pack: its code, a group's 4 fields, its item's number
_MAX_INTS = 6
_LITTLE = sys.byteorder == "little"  # the int block is little-endian int64, a native view here
#: PACK3's numbers of the event types. Append only: a number, once written, keeps its type.
WIRE_TYPES = (
    EventType.VIEW,
    EventType.CLICK,
    EventType.ADD_TO_CART,
    EventType.PURCHASE,
    EventType.IMPRESSION,
    EventType.ITEM_UPSERT,
)
_WIRE_TYPES = WIRE_TYPES
_TYPE_NUMBER = {t: i for i, t in enumerate(WIRE_TYPES)}
if set(WIRE_TYPES) != set(EventType):
    raise ImportError("every EventType needs a forward pack number: append it to serde.WIRE_TYPES")
_ndarray = np.ndarray
_new = tuple.__new__
_SLOT_BITS = FORWARD_SLOTS.bit_length() - 1  # seq >> _SLOT_BITS is the source position
#: dtype objects, passed positionally: numpy parses a dtype string and keyword arguments on every call
_F4 = np.dtype("<f4")
_F8 = np.dtype("<f8")
_frombuffer = np.frombuffer
#: whether this module runs compiled (its file is then the extension, not the .py): see ``_value_into``
_COMPILED = not __file__.endswith(".py")
_dumps = orjson.dumps  # a module global: no attribute lookup on orjson per state
#: MessagePack of a state body: an encoder and decoder object bound once (msgspec's module-level
#: encode/decode build one per call)
_body_into = msgspec.msgpack.Encoder().encode_into
_body_in = msgspec.msgpack.Decoder().decode
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
    # The body is written into a reused buffer: msgspec grows a fresh bytes object several times per
    # state otherwise (~1k instructions). The spare buffer is taken out and put back (dict pop and set
    # are atomic: threads never share one; a list's pop and append would reallocate it each time); a
    # thread that finds it taken uses a new one, and an encoding error just drops it.
    spare = _spare
    buf = spare.pop(0, None)
    if buf is None:
        buf = bytearray()
    out = _state_value(vector, body, buf)
    if len(buf) <= _BUFFER_KEEP:
        spare[0] = buf
    return out


def _state_value(vector: Vec | None, body: Any, buf: bytearray) -> bytes:
    """A state value (header, ``vector``'s float32 block, ``body`` as MessagePack), ``buf`` its scratch buffer."""
    value = _value_into(vector, body, buf) if _COMPILED else None
    if value is None:
        _body_into(body, buf, 0)
        value = _value(vector, buf)
    return value


def _value(vector: Vec | None, body: bytearray) -> bytes:
    """A state value: the header and ``vector``'s float32 block, then the encoded ``body``."""
    if vector is None:
        return b"".join((_HEAD0, body))
    dim = len(vector)
    heads = _HEADS  # (a typed local, compiled: a C dict lookup, not a method call)
    head = heads.get(dim)
    if head is None:
        head = _HEAD.pack(FORMAT, dim)
        if dim < 4096:  # a dimension is one of a few: a bounded memo
            heads[dim] = head
    dtype = vector.dtype
    if dtype is not _F4 and dtype != _F4:  # the core's vectors are float32 already: no conversion, no copy
        vector = vector.astype(_F4)
    try:  # the vector's own buffer joined in: no bytes object of it first
        return b"".join((head, vector, body))  # type: ignore[arg-type]  # an ndarray is a buffer
    except (BufferError, TypeError):  # a strided view: no contiguous buffer
        return b"".join((head, vector.tobytes(), body))


def _value_into(vector: Vec | None, body: Any, buf: bytearray) -> bytes | None:
    """:func:`_state_value` in the compiled build: the same bytes, or None where ``_value`` must write them.

    The header and the vector's float32 block go into ``buf`` first, msgspec writes the body after them
    (``encode_into`` at an offset), and the value is read back from the buffer as one bytes object: no
    join of three buffers (numpy's buffer export alone cost ~375 instructions), no header memo, no tuple
    (~600 instructions a user state less). None for a vector that ``_value`` converts first (not float32)
    or cannot write (a dimension past uint16, more than one axis).
    """
    if vector is None:
        dim = 0
        data = b""
    else:
        if type(vector) is not _ndarray or vector.dtype is not _F4:
            return None
        dim = len(vector)
        data = vector.tobytes()  # (what _value joins in: the C-order float32s, of a strided view too)
        if dim >= 0x10000 or len(data) != 4 * dim:
            return None
    n = len(data)
    at = _HEAD_SIZE  # (compiled: a local, not a global that every byte store might have changed)
    end = at + n
    if len(buf) < end:
        buf.extend(bytes(end - len(buf)))
    p: Any = buf  # (compiled: the bytearray's C buffer, ``end`` bytes long; plain Python: the bytearray)
    d = data
    p[0] = FORMAT
    p[1] = dim & 0xFF  # the dimension, uint16 little-endian (_HEAD)
    p[2] = dim >> 8
    for k in range(n):  # (compiled: a C loop of byte copies)
        p[at + k] = d[k]
    _body_into(body, buf, end)  # (resizes buf to end + the body's length)
    p = buf
    return p[: len(buf)] if _COMPILED else bytes(p)  # (compiled, a bytes object of the C buffer's bytes)


_HEAD0 = _HEAD.pack(FORMAT, 0)
#: dim -> the state header of a vector of that dimension
_HEADS: dict[int, bytes] = {}
#: the idle buffer of :func:`_pack` (key 0), when not in use; one that grew past _BUFFER_KEEP bytes
#: (a huge state) is not kept
_spare: dict[int, bytearray] = {}
_BUFFER_KEEP = 1 << 16


def _split(data: bytes) -> tuple[int, Any]:
    """A state value's dimension and decoded body (either format)."""
    if len(data) < _HEAD.size:
        raise StoreError("state value too short")
    fmt, dim = _HEAD.unpack_from(data)
    end = _HEAD.size + 4 * dim
    if fmt == FORMAT:
        return dim, _body_in(data[end:])  # a bytes slice: cheaper than a memoryview of one state
    if fmt == FORMAT_JSON:
        return dim, orjson.loads(data[end:])
    raise StoreError(f"unknown state format {fmt}; this build reads formats {FORMAT_JSON} and {FORMAT}")


def _unpack(data: bytes) -> tuple[Vec | None, Any]:
    dim, body = _split(data)
    return (_frombuffer(data, _F4, dim, _HEAD.size).copy() if dim else None), body


def item_summary(data: bytes) -> tuple[Vec | None, list[Any]]:
    """An encoded item state's vector (a read-only view) and raw body list, without building an ItemState.

    Body layout (see :func:`encode_item`): ``[counts, b5_rows, b60_rows, max_ts, eligible, category,
    steps, version, offsets, upsert_key]`` with bucket rows ``[index, impressions, clicks, positives]``.
    For readers that need a few fields of many items fast (the serving catalog). Reads both formats.
    """
    dim, body = _split(data)
    return (_frombuffer(data, _F4, dim, _HEAD.size) if dim else None), body


def vector_of(data: bytes) -> Vec | None:
    """Just the vector of an encoded state (either format), without parsing the body."""
    fmt, dim = _HEAD.unpack_from(data)
    if fmt != FORMAT and fmt != FORMAT_JSON:
        raise StoreError(f"unknown state format {fmt}")
    return _frombuffer(data, _F4, dim, _HEAD.size) if dim else None


def encode_user(s: UserState) -> bytes:
    """Encode a user state."""
    return _pack(s.vector, [s.counts, s.recent, s.session, s.seen, s.max_ts, s.steps, s.version, s.offsets])


def encode_users(states: list[UserState]) -> list[bytes]:
    """Encode a batch of user states: ``[encode_user(s) for s in states]``, the same bytes.

    One Python call a batch, and the spare buffer (see ``_pack``) taken out and put back once.
    """
    out: list[bytes] = []
    spare = _spare
    buf = spare.pop(0, None)
    if buf is None:
        buf = bytearray()
    body: list[Any] = [None] * 8  # one list a batch, its items set per state (no list made and freed a state)
    for s in states:
        body[0] = s.counts
        body[1] = s.recent
        body[2] = s.session
        body[3] = s.seen
        body[4] = s.max_ts
        body[5] = s.steps
        body[6] = s.version
        body[7] = s.offsets
        out.append(_state_value(s.vector, body, buf))
    if len(buf) <= _BUFFER_KEEP:
        spare[0] = buf
    return out


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
    """The rows ``[index, impressions, clicks, positives]`` of ``buckets``, by index.

    Sorting the keys: no (key, value) tuple per bucket; a row of a 3-count bucket built with its
    four items (compiled, a fixed-size list, not a list extended by the counts: a third of the cost
    of an item state's encoding went to these rows).
    """
    out: list[list[int]] = []
    for k in sorted(buckets):
        v = buckets[k]
        if len(v) == 3:
            out.append([k, v[0], v[1], v[2]])
        else:
            out.append([k, *v])
    return out


def _buckets_in(rows: list[list[int]]) -> dict[int, list[int]]:
    return {r[0]: r[1:] for r in rows}


def encode_item(s: ItemState) -> bytes:
    """Encode an item state."""
    body = [
        s.counts, _buckets_out(s.b5), _buckets_out(s.b60), s.max_ts, s.eligible, s.category,
        s.steps, s.version, s.offsets, s.upsert_key,
    ]  # fmt: skip
    return _pack(s.vector, body)


def encode_items(states: list[ItemState]) -> list[bytes]:
    """Encode a batch of item states: ``[encode_item(s) for s in states]``, the same bytes (as ``encode_users``)."""
    out: list[bytes] = []
    spare = _spare
    buf = spare.pop(0, None)
    if buf is None:
        buf = bytearray()
    body: list[Any] = [None] * 10  # one list a batch (as encode_users)
    for s in states:
        body[0] = s.counts
        body[1] = _buckets_out(s.b5)
        body[2] = _buckets_out(s.b60)
        body[3] = s.max_ts
        body[4] = s.eligible
        body[5] = s.category
        body[6] = s.steps
        body[7] = s.version
        body[8] = s.offsets
        body[9] = s.upsert_key
        out.append(_state_value(s.vector, body, buf))
    if len(buf) <= _BUFFER_KEEP:
        spare[0] = buf
    return out


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
    Layout (format ``PACK4``): ``PACK4 | dim uint16 | vectors uint32 | scores uint32 | entries uint32 |
    ints uint32 | vectors x dim float32 | scores x float64 | ints x int64 | orjson body``, little-endian.
    The int block ``ints`` and the body ``[src, strs, extras]`` are flat sequences read in step, one entry
    (forward) after another:

    * ``ints``: the entry's code ``sub + FORWARD_SLOTS * (new_group + 2 * has_vector + 4 * extended +
      8 * new_item + 16 * k)``; then, when it starts a group, the group's position, event time (us) and
      record ts (ms), each as the difference from the previous group's (small numbers: cheap to write
      and read), and its type's number (:data:`WIRE_TYPES`); then, when its item is not new in the pack,
      the item's number (the items in order of first appearance);
    * ``strs``: when the entry starts a group of item upserts, the group's event id; then, when its item
      is new in the pack, the item id;
    * ``extras``: for an extended entry (not eligible, or a category or bootstrap vector: upserts), its
      eligible, category and bootstrap.

    Only what the item stage reads travels: no user id, and an event id only for an upsert (the item
    keeps it); :func:`decode_forward_pack` gives a ``PACK4`` (``PACK3``) forward's user id as None and a
    non-upsert's event id as ``""``. ``PACK3`` is the same but for the integers, which it writes as the
    body's second list (``[src, ints, strs, extras]``): as a binary block they cost no JSON and no
    Python int to write or read (the compiled decoder reads them as C integers where they lie).
    Consecutive forwards of one source record share a group (the event fields once), and an item's id
    is written once a pack (a pack's forwards are mostly about a few popular items: the item stage then
    parses and looks up each id once). With ``has_vector`` the next vector row is the entry's user
    vector; the next ``k`` scores are its negatives' scores. Scores travel as float64: exact for any
    Python or float32 value.
    """
    # the int block, written in place (a C array store each, compiled), with room for _MAX_INTS a forward
    buf = bytearray(8 * _MAX_INTS * len(forwards))
    ints = memoryview(buf).cast("q")
    ni = 0
    strs: list[Any] = []
    extras: list[Any] = []
    vectors: list[Vec] = []
    scores_flat: list[float] = []
    items: dict[str, int] = {}  # item id -> its number in this pack
    dim = -1
    prev = -1
    n = 0
    # the current group's position and fields, which the next group's are written relative to
    pos = last_pos = -1
    g_event: Any = None
    g_type: Any = None
    g_number: Any = None
    g_ts_us = g_ts_ms = 0
    shift = _SLOT_BITS
    slots = FORWARD_SLOTS
    mask = slots - 1
    numbers = _TYPE_NUMBER
    upsert = _UPSERT
    native = True  # every user vector a native float32 ndarray: the block is their bytes joined
    for seq, f, ts_ms in forwards:
        if seq <= prev:
            raise ValueError(f"forward seqs must increase ({seq} after {prev})")
        prev = seq
        n += 1
        # f[:] is f's fields as an exact tuple, which compiled code unpacks by C array reads (a Forward,
        # a tuple subclass, it unpacks through an iterator: ~100 instructions a forward more)
        item_id, event_id, etype, ts_us, _user_id, uv, scores, eligible, category, bootstrap = f[:]
        pos = seq >> shift
        k = len(scores)
        flags = 16 * k
        if uv is not None:
            flags += 2
        extended = not (eligible is True and category is None and bootstrap is None)
        if extended:
            flags += 4
        number = items.get(item_id)
        if number is None:
            items[item_id] = len(items)
            flags += 8
        is_upsert = etype is upsert
        new_group = (
            pos != last_pos or etype is not g_type or ts_us != g_ts_us or ts_ms != g_ts_ms
            or (is_upsert and event_id != g_event)
        )  # fmt: skip
        if new_group:
            ints[ni] = (flags + 1) * slots + (seq & mask)
            ints[ni + 1] = pos - max(last_pos, 0)
            ints[ni + 2] = ts_us - g_ts_us
            ints[ni + 3] = ts_ms - g_ts_ms
            if etype is not g_type:  # (the type's number: a dict lookup only when the type changes)
                g_number = numbers[etype]
            ints[ni + 4] = g_number
            ni += 5
            if is_upsert:
                strs.append(event_id)
            last_pos = pos
            g_event, g_type, g_ts_us, g_ts_ms = event_id, etype, ts_us, ts_ms
        else:
            ints[ni] = flags * slots + (seq & mask)
            ni += 1
        if number is None:
            strs.append(item_id)
        else:
            ints[ni] = number
            ni += 1
        if k:
            scores_flat.extend(scores)
        if uv is not None:
            if len(uv) != dim:
                if dim >= 0:
                    raise ValueError(f"user vectors of one pack differ in length ({len(uv)} vs {dim})")
                dim = len(uv)
            if native and (type(uv) is not _ndarray or uv.dtype is not _F4):
                native = False
            vectors.append(uv)
        if extended:
            extras.append(eligible)
            extras.append(category)
            extras.append(None if bootstrap is None else _floats(bootstrap))
    head_bytes = _PACK4_HEAD.pack(PACK4, max(dim, 0), len(vectors), len(scores_flat), n, ni)
    block = b""
    if vectors:
        if native:
            try:  # the rows' bytes joined: no intermediate array (3x cheaper than np.concatenate)
                block = b"".join(vectors)  # type: ignore[arg-type]  # an ndarray is a buffer
            except (BufferError, TypeError):  # a strided view: no contiguous buffer
                native = False
        if not native:
            block = np.concatenate(vectors).astype(_F4, copy=False).tobytes()
    score_bytes = _pack_f8(len(scores_flat), scores_flat) if scores_flat else b""
    int_block = memoryview(buf)[: 8 * ni] if _LITTLE else _swapped64(memoryview(buf)[: 8 * ni])
    return b"".join((head_bytes, block, score_bytes, int_block, _dumps([src, strs, extras])))


def _swapped64(data: Any) -> bytes:
    """int64s in the other byte order: the int block on a big-endian machine (the wire's is little-endian)."""
    a = array("q", bytes(data))
    a.byteswap()
    return a.tobytes()


def _int64s(data: Any) -> memoryview:
    """A pack's int block as native int64s: a view of ``data`` on a little-endian machine."""
    return memoryview(data if _LITTLE else _swapped64(data)).cast("q")


def _int64s_of(ints: Any) -> memoryview:
    """``PACK3``'s and ``PACK2``'s integers (the body's list) as native int64s, the way ``PACK4``'s are read."""
    if type(ints) is not list:
        raise StoreError("forward pack body: its integers are not a list")
    try:
        return memoryview(array("q", ints))
    except (OverflowError, TypeError):
        raise StoreError("forward pack body: an integer out of int64, or not an integer") from None


def _pack_f8(n: int, xs: list[float]) -> bytes:
    """``n`` floats as float64 LE (struct: cheaper than a numpy array built from the list)."""
    return struct.pack(f"<{n}d", *xs)


def _pack_blocks(
    data: bytes, head: struct.Struct, fmt: int
) -> tuple[tuple[int, ...], list[Vec], tuple[float, ...], int]:
    """A forward pack's header fields, user vectors, negatives' scores and where what follows them begins.

    The header starts ``first byte, dim, vectors, scores``; the blocks follow it (then, but in ``PACK4``,
    the orjson body). The scores are a tuple: its slices are each forward's ``neg_scores`` (no list per
    forward).
    """
    if len(data) < head.size:
        raise StoreError("forward pack too short")
    fields: tuple[int, ...] = head.unpack_from(data)
    if fields[0] != fmt:
        raise StoreError(f"not a forward pack (first byte {fields[0]})")
    dim, rows, n_scores = fields[1], fields[2], fields[3]
    at = head.size + 4 * dim * rows
    vecs, flat = _blocks(data, dim, rows, n_scores, head.size, at)
    return fields, vecs, flat, at + 8 * n_scores


def _blocks(
    data: bytes, dim: int, rows: int, n_scores: int, vec_at: int, score_at: int
) -> tuple[list[Vec], tuple[float, ...]]:
    """A pack's user vectors (``rows`` float32 rows of ``dim`` at ``vec_at``) and negatives' scores (a tuple)."""
    vecs: list[Vec] = list(_frombuffer(data, _F4, dim * rows, vec_at).reshape(rows, dim).copy()) if rows else []
    flat: tuple[float, ...] = tuple(_frombuffer(data, _F8, n_scores, score_at).tolist()) if n_scores else ()
    return vecs, flat


def decode_forward_pack(data: bytes) -> tuple[int, list[int], list[Forward], list[int]]:
    """Decode a forward pack -> (source partition id, seqs, forwards, source record ts ms), in pack order.

    Reads every format: ``PACK4`` (:func:`encode_forward_pack`) and the older ``PACK3``, ``PACK2`` and
    ``PACK`` (:func:`_decode_pack1`; records written before an upgrade may still be in flight). The item
    stage reads packs with :func:`decode_forward_entries`. ``PACK4`` and ``PACK3`` carry only what the
    item stage reads: their forwards come back without user id (None) and, but for item upserts, without
    event id (``""``).
    """
    if len(data) < 1:
        raise StoreError("forward pack too short")
    if data[0] == PACK:
        return _decode_pack1(data)
    v3, head, vecs, flat, src, ints, strs, extras = _pack234(data)
    seqs: list[int] = []
    forwards: list[Forward] = []
    stamps: list[int] = []
    items: list[str] = []
    types = _TYPES
    wire = _WIRE_TYPES
    upsert = _UPSERT
    shift = _SLOT_BITS
    mask = FORWARD_SLOTS - 1
    row = si = ii = xi = si_f = 0
    base = pos = ts_us = ts_ms = 0
    event_id: Any = None
    etype: Any = None
    user_id: Any = None
    n_ints = len(ints)
    try:
        while ii < n_ints:
            code = ints[ii]
            ii += 1
            flags = code >> shift
            if flags & 1:
                pos += ints[ii]
                ts_us += ints[ii + 1]
                ts_ms += ints[ii + 2]
                if v3:
                    j = ints[ii + 3]  # (a C index, compiled)
                    etype = wire[j]
                    ii += 4
                    event_id = ""  # (PACK3 carries an upsert's event id only, and no user id)
                    if etype is upsert:
                        event_id = strs[si]
                        si += 1
                else:
                    event_id = strs[si]
                    etype = types[strs[si + 1]]
                    user_id = strs[si + 2]
                    ii += 3
                    si += 3
                base = pos << shift
            if not v3 or flags & 8:
                item_id = strs[si]
                si += 1
                items.append(item_id)
            else:
                j = ints[ii]
                ii += 1
                if j < 0 or j >= len(items):  # (not a negative index from the end)
                    raise IndexError(j)
                item_id = items[j]
            k = flags >> 4 if v3 else flags >> 3
            vec = None
            if flags & 2:
                vec = vecs[row]
                row += 1
            neg = flat[si_f : si_f + k] if k else ()
            si_f += k
            if flags & 4:
                bootstrap = extras[xi + 2]
                fw = (item_id, event_id, etype, ts_us, user_id, vec, neg, extras[xi], extras[xi + 1],
                      None if bootstrap is None else tuple(bootstrap))  # fmt: skip
                xi += 3
            else:
                fw = (item_id, event_id, etype, ts_us, user_id, vec, neg, True, None, None)
            seqs.append(base + (code & mask))
            forwards.append(_new(Forward, fw))
            stamps.append(ts_ms)
    except (IndexError, KeyError) as exc:
        raise StoreError(f"forward pack ends inside an entry or refers past its items ({exc!r})") from None
    _check_used(v3, head, len(forwards), row, si_f, si, len(strs), xi, len(extras))
    return src, seqs, forwards, stamps


def _pack_parts(data: bytes) -> tuple[bool, tuple[int, ...], int, int, int, Any, memoryview, list[Any], list[Any]]:
    """A ``PACK4``, ``PACK3`` or ``PACK2`` record's layout, checked -> (whether its entries number their
    items (not ``PACK2``), head (``PACK3``'s fields: first byte, dim, vectors, scores, entries or strings),
    where the vector block, the score block and what follows them begin, src, ints, strs, extras).

    Both pack decoders start here; neither reads the blocks (one copies them out, the other joins them).
    """
    if len(data) < 1:
        raise StoreError("forward pack too short")
    fmt = data[0]
    head = _PACK4_HEAD if fmt == PACK4 else _PACK23_HEAD
    if len(data) < head.size:
        raise StoreError("forward pack too short")
    n_ints = 0
    if fmt == PACK4:
        fmt, dim, rows, n_scores, count, n_ints = head.unpack_from(data)
    else:
        fmt, dim, rows, n_scores, count = head.unpack_from(data)
    v3 = fmt == PACK4 or fmt == PACK3  # (entries that number their items)
    if not v3 and fmt != PACK2:
        raise StoreError(f"not a forward pack (first byte {fmt})")
    at = head.size + 4 * dim * rows
    end = at + 8 * n_scores
    body_at = end + 8 * n_ints
    if len(data) < body_at:
        raise StoreError("forward pack too short")
    view = memoryview(data)
    if fmt == PACK4:
        ints = _int64s(view[end:body_at])
        src, strs, extras = orjson.loads(view[body_at:])
    else:
        src, listed, strs, extras = orjson.loads(view[end:])
        ints = _int64s_of(listed)
    if not v3 and len(strs) != count:
        raise StoreError(f"forward pack holds {len(strs)} strings, its head says {count}")
    return v3, (fmt, dim, rows, n_scores, count), head.size, at, end, src, ints, strs, extras


def _pack234(
    data: bytes,
) -> tuple[bool, tuple[int, ...], list[Vec], tuple[float, ...], Any, memoryview, list[Any], list[Any]]:
    """A ``PACK4``, ``PACK3`` or ``PACK2`` record's parts -> (whether its entries number their items (not
    ``PACK2``), head (``PACK3``'s fields), vectors, scores, src, ints, strs, extras)."""
    v3, head, vec_at, at, _end, src, ints, strs, extras = _pack_parts(data)
    vecs, flat = _blocks(data, head[1], head[2], head[3], vec_at, at)
    return v3, head, vecs, flat, src, ints, strs, extras


def _check_used(
    v3: bool, head: tuple[int, ...], n: int, rows: int, scores: int, strs: int, n_strs: int, extras: int, n_extras: int
) -> None:
    """Raise unless a pack's entries used all of its vectors, scores, strings and extras (and, ``PACK3``, were all)."""
    if v3 and n != head[4]:
        raise StoreError(f"forward pack holds {n} entries, its head says {head[4]}")
    if rows != head[2] or scores != head[3] or strs != n_strs or extras != n_extras:
        raise StoreError(
            f"forward pack holds {head[2]} vectors and {head[3]} scores, its entries use {rows} and {scores}"
        )


def decode_forward_entries(
    data: bytes, row_base: int = 0, score_base: int = 0
) -> tuple[int, memoryview, list[str], list[int], list[ItemEntry], list[int], int, Any, Any]:
    """Decode a forward pack for the item stage -> (source partition id, seqs, items, item numbers,
    entries, source record ts ms, dim, user vector block, score block), in pack order.

    ``seqs`` are int64s in a memoryview (``bisect`` and indexing read them, ``tolist()`` makes a list): the
    item stage only bisects them and reads the last, and a Python int an entry cost ~170 instructions.

    ``items`` are the pack's distinct item ids in order of first appearance, and entry ``i``'s item is
    ``items[item_numbers[i]]``: the item stage looks each item up once a pack, not once an entry.

    The entries (:data:`streams.core.state.ItemEntry`) stand for the forwards
    :func:`decode_forward_pack` returns; their rows count from ``row_base`` and their score indexes
    from ``score_base``: where this pack's blocks (float32 rows of ``dim``, float64 scores) begin
    once a batch's blocks are joined (:func:`entry_arrays`). No :class:`Forward`, no array or tuple
    per forward (that took a quarter off the item stage's decode), and since ``PACK3`` one string per
    item, which every entry of the item shares (its hash computed once). ``PACK4``'s integers are read
    where they lie (C integers, compiled), ``PACK3``'s and ``PACK2``'s from the body's list. Reads every
    format.
    """
    if len(data) < 1:
        raise StoreError("forward pack too short")
    fmt = data[0]
    if fmt == PACK:
        return _pack1_entries(data, row_base, score_base)
    v3, head, vec_at, at, end, src, ints, strs, extras = _pack_parts(data)
    dim = head[1]
    n_strs = len(strs)
    items: list[str] = []  # the pack's items, in order of first appearance
    item_of: list[int] = []  # each entry's item: its number in items
    numbers: dict[str, int] = {}  # PACK2: item id -> its number
    entries: list[ItemEntry] = []
    stamps: list[int] = []
    types = _TYPES
    wire = _WIRE_TYPES
    upsert = _UPSERT
    shift = _SLOT_BITS
    mask = FORWARD_SLOTS - 1
    row = si = ii = xi = si_f = 0
    base = pos = ts_us = ts_ms = 0
    # the current group's fields, as the objects every entry of it shares
    event_id: Any = None
    etype: Any = None
    us: Any = 0
    ms: Any = 0
    n_ints = len(ints)
    # the seqs as int64s, stored where they lie (a C store each, compiled: no Python int an entry, which the
    # item stage would only bisect); every entry has at least its code, so n_ints entries at most
    seq_view = memoryview(bytearray(8 * n_ints)).cast("q")
    sv = seq_view
    ne = 0
    try:
        while ii < n_ints:
            code = ints[ii]
            ii += 1
            flags = code >> shift
            if flags & 1:
                d = ints[ii]  # (a C integer each, compiled: no Python int arithmetic)
                pos += d
                d = ints[ii + 1]
                ts_us += d
                d = ints[ii + 2]
                ts_ms += d
                if v3:
                    j = ints[ii + 3]  # (a C index, compiled)
                    etype = wire[j]
                    ii += 4
                    if etype is upsert:  # (the only event id PACK3 carries: the item keeps it)
                        event_id = strs[si]
                        si += 1
                else:
                    event_id = strs[si]
                    etype = types[strs[si + 1]]
                    ii += 3
                    si += 3
                base = pos << shift
                us = ts_us
                ms = ts_ms
            if not v3:
                iid = strs[si]
                si += 1
                number = numbers.get(iid)
                if number is None:
                    number = numbers[iid] = len(items)
                    items.append(iid)
                item_of.append(number)
                k = flags >> 3
            else:
                if flags & 8:
                    items.append(strs[si])
                    si += 1
                    item_of.append(len(items) - 1)
                else:
                    j = ints[ii]
                    ii += 1
                    if j < 0 or j >= len(items):
                        raise IndexError(j)
                    item_of.append(j)
                k = flags >> 4
            entry: ItemEntry
            if flags & 2:
                r = row_base + row
                row += 1
                entry = (etype, us, r, score_base + si_f, k, None)
            else:
                entry = (etype, us, -1, 0, 0, None)  # (scores without a vector: never read)
            if flags & 4:
                if etype is upsert:
                    bootstrap = extras[xi + 2]
                    up = (event_id, extras[xi], extras[xi + 1], None if bootstrap is None else tuple(bootstrap))
                    entry = (etype, us, -1, 0, 0, up)
                xi += 3
            elif etype is upsert:
                entry = (etype, us, -1, 0, 0, (event_id, True, None, None))
            entries.append(entry)
            si_f += k
            sv[ne] = base + (code & mask)
            ne += 1
            stamps.append(ms)
    except (IndexError, KeyError) as exc:
        raise StoreError(f"forward pack ends inside an entry or refers past its items ({exc!r})") from None
    _check_used(v3, head, len(entries), row, si_f, si, n_strs, xi, len(extras))
    view = memoryview(data)
    return src, seq_view[:ne], items, item_of, entries, stamps, dim, view[vec_at:at], view[at:end]


def _pack1_entries(
    data: bytes, row_base: int, score_base: int
) -> tuple[int, memoryview, list[str], list[int], list[ItemEntry], list[int], int, Any, Any]:
    """:func:`decode_forward_entries` of a ``PACK`` record: its forwards, made entries."""
    src, seqs, forwards, stamps = _decode_pack1(data)
    vecs: list[Vec] = []
    flat: list[float] = []
    entries = forward_entries(forwards, vecs, flat, row_base, score_base)
    dim = len(vecs[0]) if vecs else 0
    block = b"".join(vecs)  # type: ignore[arg-type]  # rows of one float32 matrix: buffers
    numbers: dict[str, int] = {}
    item_of = [numbers.setdefault(f.item_id, len(numbers)) for f in forwards]
    return src, _int64s_of(seqs), list(numbers), item_of, entries, stamps, dim, block, _pack_f8(len(flat), flat)


def entry_arrays(dim: int, vec_blocks: list[Any], score_blocks: list[Any]) -> tuple[Any, Any]:
    """A batch's user vector matrix (None without rows) and score array, from its packs' blocks in order."""
    U = _frombuffer(b"".join(vec_blocks), _F4).reshape(-1, dim) if dim else None
    return U, _frombuffer(b"".join(score_blocks), _F8)


def _decode_pack1(data: bytes) -> tuple[int, list[int], list[Forward], list[int]]:
    """Decode a forward pack of the older ``PACK`` format (nested lists per group and entry)."""
    head, vecs, flat, end = _pack_blocks(data, _PACK_HEAD, PACK)
    rows, n_scores = head[2], head[3]
    src, groups = orjson.loads(memoryview(data)[end:])
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
