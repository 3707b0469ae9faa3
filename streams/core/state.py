"""User and item state, and the pure functions that apply events to them.

Nothing in this module touches Kafka, RocksDB or the wall clock: the live worker
(:mod:`streams.worker`) and the offline replayer (:mod:`replay`) call the same
functions, which is what lets replay prove the live state right.

Design rules (see docs/ARCHITECTURE.md, "Determinism"):

* Every *feature* is order-independent within the allowed lateness: counters,
  event-time buckets pruned by the key's max event time, top-N recent items by
  ``(event_time, event_id)`` and an argmax session context. Live (arrival order)
  and replay (event-time order) therefore give byte-identical feature state.
* Duplicate events (same ``event_id`` for the same user within the lateness
  window) are dropped, so a redelivered event changes nothing.
* Events older than ``max_event_time - lateness`` for their user are *late*: they
  are not applied and the worker sends them to the DLQ with reason ``late_event``.
* Embeddings are online BPR steps; their inputs from the other stage (replica
  item vectors, user snapshots) are snapshots, and a key with more than
  ``max_rounds`` events in one batch takes damped mini-batch steps, so vectors
  are reproducible only within a tolerance, not bit for bit.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, TypeVar

import msgspec
import numpy as np
import numpy.typing as npt

from streams.events import POSITIVE_WEIGHTS, Context, Event, EventType

__all__ = [
    "CoreConfig",
    "UserState",
    "ItemState",
    "Forward",
    "ItemVectorSource",
    "Outcome",
    "FORWARD_SLOTS",
    "forward_seqs",
    "upsert_forward",
    "TYPE_INDEX",
    "TYPE_VALUE",
    "apply_user_events",
    "apply_user_batch",
    "apply_item_forwards",
    "apply_item_batch",
    "apply_item_entries",
    "ItemEntry",
    "forward_entries",
    "score_array",
    "init_vector",
    "init_matrix",
    "ctr",
    "item_features",
    "user_features",
    "hash64",
]

Vec = npt.NDArray[np.float32]
_T = TypeVar("_T")
_St = TypeVar("_St", "UserState", "ItemState")

TYPE_INDEX: dict[EventType, int] = {t: i for i, t in enumerate(EventType)}
N_TYPES = len(TYPE_INDEX)
TYPE_VALUE: dict[EventType, str] = {t: t.value for t in EventType}  # Enum.value is a slow descriptor
#: each type's ``(TYPE_INDEX, is positive (in POSITIVE_WEIGHTS), TYPE_VALUE)``: the user features read all
#: three per event, with one dict lookup
_TYPE_INFO: dict[EventType, tuple[int, bool, str]] = {
    t: (TYPE_INDEX[t], t in POSITIVE_WEIGHTS, TYPE_VALUE[t]) for t in EventType
}
_IMPR = TYPE_INDEX[EventType.IMPRESSION]
_CLICK = TYPE_INDEX[EventType.CLICK]
#: members as module globals: reading one off the Enum class costs ~850 instructions (EnumType's getattr hook)
_UPSERT_TYPE, _IMPRESSION_TYPE, _CLICK_TYPE = EventType.ITEM_UPSERT, EventType.IMPRESSION, EventType.CLICK
B5_US = 300 * 1_000_000  # 5-minute buckets
B60_US = 3_600 * 1_000_000  # hourly buckets
_B5_PER_B60 = B60_US // B5_US
KEEP_B5 = 24  # 2 hours of 5-minute buckets
KEEP_B60 = 48  # 2 days of hourly buckets


@dataclass(frozen=True, slots=True)
class CoreConfig:
    """Hyperparameters of the state logic. Live and replay must use equal configs."""

    dim: int = 64
    lr: float = 0.05
    reg: float = 0.002
    negatives: int = 4
    init_scale: float = 0.1
    recent_n: int = 50
    lateness_us: int = 3_600 * 1_000_000
    seed: int = 0
    ctr_prior_clicks: float = 1.0
    ctr_prior_impressions: float = 20.0
    trend_half_life_us: int = 3_600 * 1_000_000
    #: at most this many sequential embedding steps per key per batch; a key with more
    #: events in one batch takes damped mini-batch steps (see ``_damped_step``)
    max_rounds: int = 4

    def __post_init__(self) -> None:
        # what the embedding maths divides by or indexes with: a zero here gives NaN vectors, not an error
        for name in ("dim", "negatives", "recent_n", "max_rounds", "trend_half_life_us"):
            if getattr(self, name) < 1:
                raise ValueError(f"CoreConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.lateness_us < 0 or self.ctr_prior_impressions <= 0:
            raise ValueError("CoreConfig: lateness_us must be >= 0 and ctr_prior_impressions > 0")
        # the prior's mean a / b is a CTR: in [0, 1], so that every estimate (see ``ctr``) is one too
        if not 0 <= self.ctr_prior_clicks <= self.ctr_prior_impressions:
            raise ValueError(
                "CoreConfig: ctr_prior_clicks must be in [0, ctr_prior_impressions], got "
                f"{self.ctr_prior_clicks} and {self.ctr_prior_impressions}"
            )


def hash64(text: str, seed: int = 0) -> int:
    """A stable 64-bit hash of ``text`` (blake2b; Python's ``hash`` is salted per process)."""
    h = _hasher(seed).copy()  # a copy of the salted, empty hasher: 2x cheaper than a new one with keyword arguments
    h.update(text.encode())
    return int.from_bytes(h.digest(), "little")


def _hasher(seed: int) -> hashlib.blake2b:
    """The empty blake2b hasher (8-byte digest) salted with ``seed``, to copy."""
    base = _HASHERS.get(seed)
    if base is None:
        base = _HASHERS[seed] = _blake2b(digest_size=8, salt=seed.to_bytes(8, "little"))
    return base


def _hash64s(texts: list[str], seed: int) -> npt.NDArray[np.uint64]:
    """:func:`hash64` of each text as a uint64 array: the digests read as little-endian uint64s,
    without a Python int each (a uint64 array from ints above 2**63 takes numpy's slow path)."""
    base = _hasher(seed)
    digests: list[bytes] = []
    for text in texts:
        h = base.copy()
        h.update(text.encode())
        digests.append(h.digest())
    return np.frombuffer(b"".join(digests), dtype=_U64LE)


#: seed -> an empty blake2b hasher (8-byte digest) salted with the seed
_HASHERS: dict[int, hashlib.blake2b] = {}
#: builds a NamedTuple from a full tuple of its fields, skipping its generated ``__new__`` (2x faster)
_new = tuple.__new__
_blake2b = hashlib.blake2b
_crc32 = zlib.crc32
_chain = itertools.chain.from_iterable
_copy = np.ndarray.copy
_U64LE = np.dtype("<u8")
_pack = struct.pack
_arange = np.arange
_INTP = np.dtype(np.intp)
_LATENESS_MAX = (1 << 63) - 1
_I64_MIN = -_LATENESS_MAX - 1
#: a Struct's fields as a tuple, in one C call (the cost of ~2 reads by name): the core reads Event's
#: first eight and Context's first three by position (checked below)
_fields = msgspec.structs.astuple
_EVENT_HEAD = ("event_id", "type", "ts_us", "user_id", "item_id", "schema_version", "context", "items")
_CONTEXT_HEAD = ("surface", "session_id", "device")
if (
    Event.__struct_fields__[: len(_EVENT_HEAD)] != _EVENT_HEAD
    or Context.__struct_fields__[: len(_CONTEXT_HEAD)] != _CONTEXT_HEAD
):
    raise TypeError("streams.core.state reads Event's and Context's fields by position; their order changed")


_INIT_TABLES: dict[tuple[int, int], npt.NDArray[np.float32]] = {}


def _init_table(dim: int, seed: int) -> npt.NDArray[np.float32]:
    table = _INIT_TABLES.get((dim, seed))
    if table is None:
        rng = np.random.default_rng(seed)
        table = rng.standard_normal((4096, dim)).astype(np.float32) / np.float32(math.sqrt(2 * dim))
        _INIT_TABLES[(dim, seed)] = table
    return table


def init_vector(key: str, cfg: CoreConfig, kind: str) -> Vec:
    """Deterministic initial vector for ``key``: the sum of two rows of a seeded table."""
    table = _init_table(cfg.dim, cfg.seed)
    h = hash64(kind + key, cfg.seed)
    v: Vec = table[h & 4095] + table[(h >> 12) & 4095]
    return (v * np.float32(cfg.init_scale * math.sqrt(cfg.dim))).astype(np.float32)


class ItemVectorSource(Protocol):
    """Read access to item vectors for the user stage (a replica live, the store in replay)."""

    def get(self, item_id: str) -> Vec | None:
        """The current vector of ``item_id``, or None when unknown."""

    def get_many(self, item_ids: Sequence[str]) -> npt.NDArray[np.float32]:
        """An (n, dim) matrix of the items' vectors; unknown items get :func:`init_vector`."""

    def sample_many(self, hashes: npt.NDArray[np.uint64], k: int) -> npt.NDArray[np.float32] | None:
        """(n, k, dim) pseudo-random item vectors chosen by 64-bit ``hashes`` (None when empty)."""


# The state classes are extension types in the compiled build: state.pxd declares their fields (in this
# order) as C struct members, which the compiled core, serde and worker read without the attribute lookup
# and member descriptor of a slotted class (~130 instructions a read). Cython builds the dataclass itself
# (``__init__`` with the defaults, repr, ``dataclasses.fields``) but rejects ``slots=True``, so the plain
# build's instances have a ``__dict__``. ``__eq__`` is written out: Cython's compares field by field with
# ``!=``, which a vector answers with an array; the dataclass's compares a tuple of the fields (so one
# vector object compares equal to itself).
@dataclass
class UserState:
    """Everything the system knows about one user."""

    counts: list[int] = field(default_factory=lambda: [0] * N_TYPES)
    #: (ts_us, event_id, item_id, type), newest first, at most ``recent_n``.
    recent: list[tuple[int, str, str, str]] = field(default_factory=list)
    #: (ts_us, event_id, session_id, surface, device) of the newest event, or None.
    session: tuple[int, str, str | None, str | None, str | None] | None = None
    #: event ids applied within the lateness window, for de-duplication.
    seen: dict[str, int] = field(default_factory=dict)
    max_ts: int = 0
    vector: Vec | None = None
    steps: int = 0
    #: number of events applied; the changelog version.
    version: int = 0
    #: provenance: input topic -> last applied offset. Not part of the checksum.
    offsets: dict[str, int] = field(default_factory=dict)

    def copy(self) -> UserState:
        """A deep-enough copy: callers may mutate the copy freely."""
        return UserState(
            list(self.counts),
            list(self.recent),
            self.session,
            dict(self.seen),
            self.max_ts,
            None if self.vector is None else self.vector.copy(),
            self.steps,
            self.version,
            dict(self.offsets),
        )

    def __eq__(self, other: object) -> bool:
        """The dataclass comparison (see above): the fields as one tuple."""
        if not isinstance(other, UserState) or other.__class__ is not self.__class__:
            return NotImplemented
        return _user_fields(self) == _user_fields(other)


@dataclass  # an extension type in the compiled build, as UserState
class ItemState:
    """Everything the system knows about one item."""

    counts: list[int] = field(default_factory=lambda: [0] * N_TYPES)
    #: 5-minute bucket index -> [impressions, clicks, positives]
    b5: dict[int, list[int]] = field(default_factory=dict)
    #: hourly bucket index -> [impressions, clicks, positives]
    b60: dict[int, list[int]] = field(default_factory=dict)
    max_ts: int = 0
    eligible: bool = True
    category: str | None = None
    vector: Vec | None = None
    steps: int = 0
    version: int = 0
    offsets: dict[str, int] = field(default_factory=dict)
    #: (ts_us, event_id) of the upsert that set ``eligible``/``category`` (newest wins)
    upsert_key: tuple[int, str] | None = None

    def copy(self) -> ItemState:
        """A deep-enough copy: callers may mutate the copy freely."""
        return ItemState(
            list(self.counts),
            {k: list(v) for k, v in self.b5.items()},
            {k: list(v) for k, v in self.b60.items()},
            self.max_ts,
            self.eligible,
            self.category,
            None if self.vector is None else self.vector.copy(),
            self.steps,
            self.version,
            dict(self.offsets),
            self.upsert_key,
        )

    def __eq__(self, other: object) -> bool:
        """The dataclass comparison (see above UserState): the fields as one tuple."""
        if not isinstance(other, ItemState) or other.__class__ is not self.__class__:
            return NotImplemented
        return _item_fields(self) == _item_fields(other)


def _user_fields(s: UserState) -> tuple[Any, ...]:
    return (s.counts, s.recent, s.session, s.seen, s.max_ts, s.vector, s.steps, s.version, s.offsets)


def _item_fields(s: ItemState) -> tuple[Any, ...]:
    return (
        s.counts, s.b5, s.b60, s.max_ts, s.eligible, s.category, s.vector, s.steps, s.version, s.offsets,
        s.upsert_key,
    )  # fmt: skip


class Forward(NamedTuple):
    """What the user stage sends to the item stage (topic ``events.by-item``), keyed by item.

    A NamedTuple: the user stage builds one per event and slate item, and a NamedTuple is
    ~4x cheaper to build than a frozen dataclass.
    """

    item_id: str
    event_id: str
    type: EventType
    ts_us: int
    user_id: str | None = None
    #: the user's vector *before* this event's step (None for non-positive events)
    user_vector: Vec | None = None
    #: scores of the sampled negatives under ``user_vector``
    neg_scores: tuple[float, ...] = ()
    eligible: bool = True
    category: str | None = None
    bootstrap: tuple[float, ...] | None = None


#: One forward as the item stage's core reads it: ``(type, event time us, user vector row, first score,
#: number of scores, upsert)``. An exact tuple, not a :class:`Forward`: the worker builds one per
#: forward it decodes (a tuple costs a fraction of a NamedTuple, and the compiled core reads its
#: fields as C array slots), and the user vectors and negatives' scores stay in one matrix and one
#: float64 array for the whole batch (``U``, ``S`` of :func:`apply_item_entries`) instead of an array
#: and a tuple per forward. The row is -1 without a user vector (then the scores are not read);
#: ``upsert`` is ``(event id, eligible, category, bootstrap)`` for an item upsert, else None.
ItemEntry = tuple[EventType, int, int, int, int, "tuple[str, bool, str | None, tuple[float, ...] | None] | None"]


class Outcome:
    """What one batch of user events produced, besides the new states.

    ``duplicates``, ``late`` and ``late_src`` are read-only sequences: the core leaves them as one
    shared empty tuple when there are none (most users, most batches) instead of three new lists.
    """

    __slots__ = ("forwards", "duplicates", "late", "forward_src", "late_src")

    def __init__(self) -> None:  # a plain class: built once per user per batch, 4x cheaper than a dataclass
        self.forwards: list[Forward] = []
        self.duplicates: Sequence[Event] = []
        self.late: Sequence[Event] = []
        #: for each forward, the index (in the user's input events) of the event it came from
        self.forward_src: list[int] = []
        #: for each late event, its index in the user's input events
        self.late_src: Sequence[int] = []


#: the ``duplicates`` / ``late`` / ``late_src`` of an Outcome that has none
_NONE: tuple[()] = ()


def _blank_outcome() -> Outcome:
    """An Outcome without the five new lists of ``Outcome()``.

    Its ``duplicates``, ``late`` and ``late_src`` are :data:`_NONE` until the first one; the caller
    sets ``forwards`` and ``forward_src`` before it hands the Outcome out.
    """
    out: Outcome = Outcome.__new__(Outcome)
    out.duplicates = out.late = out.late_src = _NONE
    return out


def _blank_user() -> UserState:
    """``UserState()`` without the dataclass ``__init__``: the same fields, new containers.

    Compiled, Cython's ``__init__`` imports ``dataclasses`` for each ``default_factory`` field (to compare
    the argument with its sentinel), whatever the arguments: 0.74 µs against 0.22 µs for this (timed on the
    2-core box, 2026-12-02).
    """
    s: UserState = UserState.__new__(UserState)
    s.counts = [0] * N_TYPES
    s.recent = []
    s.session = None
    s.seen = {}
    s.max_ts = 0
    s.vector = None
    s.steps = 0
    s.version = 0
    s.offsets = {}
    return s


def _blank_item() -> ItemState:
    """``ItemState()`` without the dataclass ``__init__``: the same fields, new containers.

    Compiled, Cython's ``__init__`` imports ``dataclasses`` for each ``default_factory`` field (to compare
    the argument with its sentinel), whatever the arguments: 0.68 µs against 0.14 µs for this (timed as
    ``_blank_user``).
    """
    s: ItemState = ItemState.__new__(ItemState)
    s.counts = [0] * N_TYPES
    s.b5 = {}
    s.b60 = {}
    s.max_ts = 0
    s.eligible = True
    s.category = None
    s.vector = None
    s.steps = 0
    s.version = 0
    s.offsets = {}
    s.upsert_key = None
    return s


def upsert_forward(ev: Event) -> Forward:
    """The item stage's input for an ``item_upsert`` event (it skips the user stage)."""
    assert ev.item_id is not None  # guaranteed by the codec for item_upsert
    return Forward(ev.item_id, ev.event_id, ev.type, ev.ts_us, None, None, (), ev.eligible, ev.category, ev.vector)


#: forwards per source record: a forward's sequence number is ``position * FORWARD_SLOTS + i`` (slates <= 1000)
FORWARD_SLOTS = 1024


def forward_seqs(out: Outcome, positions: Sequence[int]) -> list[int]:
    """The sequence number of each forward of ``out``, in the numbering the item stage dedups by.

    ``positions[i]`` is the source position (input offset live, replay position offline) of the
    user's i-th input event; the forwards of one record get ``position * FORWARD_SLOTS + 0, 1, ...``.
    """
    src = out.forward_src
    if len(src) == len(positions):  # one forward per event when src is 0, 1, 2, ... (no set to build)
        for i in range(len(src)):
            if src[i] != i:
                break
        else:
            return [p * FORWARD_SLOTS for p in positions]
    seqs: list[int] = []
    prev, sub = -1, 0
    for i in src:
        if i == prev:
            sub += 1
        else:
            prev, sub = i, 0
        seqs.append(positions[i] * FORWARD_SLOTS + sub)
    return seqs


def _sigmoid(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    return np.float32(1.0) / (np.float32(1.0) + np.exp(-np.clip(x, -30, 30)))


#: a positive event's embedding step: the event's fields as ``astuple`` gives them (``_EVENT_HEAD``'s order:
#: event_id, type, ts_us, user_id, item_id, ...), the tuple the features pass reads the event through anyway
_Step = tuple[Any, ...]


def _apply_user_features(
    state: UserState, events: Sequence[Event], lateness: int, recent_n: int, out: Outcome
) -> tuple[list[Event], list[int], list[_Step]]:
    """Apply the order-independent features of one user's events.

    Returns the accepted events, their indexes in ``events`` and the steps of the positive ones
    among them (:data:`_Step`: their fields, read off each event once, by one ``astuple`` call).
    Equal to applying the events one at a time, where each event that advances the
    user's newest event time also prunes ``seen`` to the lateness horizon: here ``seen``
    is pruned once at the end, and an id that per-event pruning would already have
    dropped (its time is below the current horizon) is not treated as seen.
    """
    seen = state.seen
    # Event times (and ``seen``'s values, ``max_ts``) are int64 (datetimes, years 1-9999): the compiled
    # build compares them as C integers (``t``, ``max_ts``, ``horizon``, ``s_ts``) and keeps each event's
    # time object (``ts``) for what it stores. The horizon saturates at int64's minimum (see _horizon);
    # ``lateness`` is at most int64's maximum (see _apply_user_batch).
    max_ts = state.max_ts
    horizon = _horizon(max_ts, lateness)
    counts = state.counts
    type_info = _TYPE_INFO
    # indexes of the duplicates and late events (the rest is accepted), and those events: new lists
    # only when there are some (rare)
    dropped: list[int] | None = None
    dups: list[Event] | None = None
    late: list[Event] | None = None
    late_src: list[int] | None = None
    positives: list[_Step] = []
    new_recent: list[tuple[int, str, str, str]] = []
    session = state.session
    # the session's (event time, event id), compared without building tuples; int64's minimum is below
    # any event time (a datetime's), so the first event replaces it when there is no session
    if session is not None:
        s_ts, s_eid = session[0], session[1]
    else:
        s_ts, s_eid = _I64_MIN, ""
    # the time object and context of the event that sets the session (the context is read once, at the end)
    newest_ts = 0
    newest_ctx: Context | None = None
    old_max = max_ts
    max_obj = 0  # the time object of the newest event, when it advances ``max_ts``
    for i, ev in enumerate(events):
        f = _fields(ev)  # one C call: cheaper than reading the four fields below by name
        eid, etype, ts, iid = f[0], f[1], f[2], f[4]
        t = ts  # a C integer in the compiled build; ``ts`` stays the object the state stores
        prev = seen.get(eid)
        if prev is not None and prev >= horizon:
            if dups is None:
                dups = out.duplicates = []
            dups.append(ev)
            if dropped is None:
                dropped = []
            dropped.append(i)
            continue
        if t < horizon:
            if late is None or late_src is None:
                late = out.late = []
                late_src = out.late_src = []
            late.append(ev)
            late_src.append(i)
            if dropped is None:
                dropped = []
            dropped.append(i)
            continue
        seen[eid] = ts
        if t > max_ts:
            max_ts = t
            max_obj = ts  # the object, stored as ``max_ts`` below: no new int
            horizon = _horizon(t, lateness)
        info = type_info[etype]  # one lookup for the type's index, positiveness and name
        ti = info[0]
        counts[ti] += 1  # a C integer index in the compiled build
        if info[1]:
            positives.append(f)  # the fields tuple itself: no new tuple (the codec requires item_id here)
        if iid is not None:
            new_recent.append((ts, eid, iid, info[2]))
        if t > s_ts or (t == s_ts and eid > s_eid):
            s_ts, s_eid = t, eid
            newest_ts, newest_ctx = ts, f[6]
    if dropped:
        skip = set(dropped)
        accepted_at = [i for i in range(len(events)) if i not in skip]
        accepted = [events[i] for i in accepted_at]
    else:  # the usual case: all of them
        # compiled: a C loop (``list(range())`` is a generic call); one event (most users in a batch) gets a
        # list literal, without the loop's appends that grow the list
        accepted_at = [0] if len(events) == 1 else [i for i in range(len(events))]
        # the caller's list itself (the core only reads it): no copy
        accepted = events if type(events) is list else list(events)
    if not accepted:
        return accepted, accepted_at, positives
    if newest_ctx is not None:
        c = _fields(newest_ctx)
        state.session = (newest_ts, s_eid, c[1], c[0], c[2])  # (time, id, session_id, surface, device)
    state.version += len(accepted)
    if max_ts > old_max:
        state.max_ts = max_obj
    for t in seen.values():  # prune once, when some id fell below the horizon (a loop: cheaper than ``min``)
        if t < horizon:  # C integers in the compiled build
            state.seen = {k: v for k, v in seen.items() if v >= horizon}
            break
    if new_recent:
        # newest first by (event_time, event_id): the top recent_n of old and new entries, which
        # is what inserting them one at a time and truncating gives (keys are unique: see above).
        # Descending: equal entries (if any) are equal values, so sorting up and reversing gives the
        # same list as ``sort(reverse=True)``, without the keyword argument (costly when compiled).
        if len(new_recent) > 1:
            new_recent.sort()
            new_recent.reverse()
        # in place: ``state`` is the caller's copy (or given up, ``in_place``), like ``counts`` and ``seen``
        recent = state.recent
        # all newer than the kept ones (live, in order)? The entries' times first: two int comparisons, not
        # a tuple comparison (which tests the times for equality first); the tuples when the times do not decide
        if not recent or new_recent[-1][0] > recent[0][0] or new_recent[-1] > recent[0]:
            if len(new_recent) == 1:  # the usual case: ``insert`` is a direct C call, a slice assignment is not
                recent.insert(0, new_recent[0])
            else:
                recent[:0] = new_recent
        else:
            recent += new_recent
            recent.sort()
            recent.reverse()
        if len(recent) > recent_n:
            del recent[recent_n:]
    return accepted, accepted_at, positives


def _horizon(max_ts: int, lateness: int) -> int:
    """``max_ts - lateness``, or int64's minimum when that is lower (``lateness`` is in [0, 2**63)).

    Every event time is an int64, so it compares with the saturated horizon as with the exact one;
    the compiled build computes it in C without overflow.
    """
    return max_ts - lateness if max_ts >= _I64_MIN + lateness else _I64_MIN


def init_matrix(keys: Sequence[str], cfg: CoreConfig, kind: str) -> npt.NDArray[np.float32]:
    """``init_vector`` for many keys at once (same values)."""
    table = _init_table(cfg.dim, cfg.seed)
    hs = _hash64s([kind + k for k in keys], cfg.seed)
    rows = (
        table[(hs & np.uint64(4095)).astype(np.intp)] + table[((hs >> np.uint64(12)) & np.uint64(4095)).astype(np.intp)]
    )
    return (rows * np.float32(cfg.init_scale * math.sqrt(cfg.dim))).astype(np.float32)


def _joined(vectors: list[Vec], dim: int) -> npt.NDArray[np.float32] | None:
    """Float32 vectors of ``dim`` stacked into a new, writable matrix (its rows equal them bit for bit).

    It joins their bytes: 3x faster than ``np.concatenate``, itself 3-4x faster than ``np.stack``.
    None when the vectors are not all float32 of ``dim`` (their bytes do not add up).
    """
    buf = bytearray().join(vectors)  # type: ignore[arg-type]  # an ndarray is a buffer; numpy's stubs omit it
    if len(buf) != 4 * dim * len(vectors):
        return None
    return np.frombuffer(buf, dtype=np.float32).reshape(len(vectors), dim)


def _float32s(values: list[float]) -> npt.NDArray[np.float32]:
    """``np.fromiter(values, np.float32)`` of a list of floats, bit for bit, at a third of the cost.

    ``fromiter`` converts item by item through numpy's scalar machinery; here ``struct`` packs the
    doubles in one C loop and numpy casts them to float32 at once: the same double -> float rounding.
    """
    return np.frombuffer(_pack(f"{len(values)}d", *values), dtype=np.float64).astype(np.float32)


def _uint64s(values: list[int]) -> npt.NDArray[np.uint64]:
    """``np.fromiter(values, np.uint64)`` of ints in [0, 2**32) (CRC-32s), like :func:`_float32s`: packed as
    uint32 in one C loop and widened at once, at half the cost."""
    return np.frombuffer(_pack(f"{len(values)}I", *values), dtype=np.uint32).astype(np.uint64)


def _intps(values: list[int]) -> npt.NDArray[np.intp]:
    """``np.array(values, np.intp)`` of a list of ints (indexes), like :func:`_float32s`: struct packs them
    in one C loop (``n``: the C ``ssize_t``, numpy's intp) where numpy discovers each item's type."""
    return np.frombuffer(_pack(f"{len(values)}n", *values), dtype=_INTP)


def _rows(vectors: list[Vec], dim: int) -> npt.NDArray[np.float32]:
    """Stack equal-length vectors into a new, writable float32 matrix (see :func:`_joined`).

    Vectors of another item size (the core's are all float32) take ``np.concatenate``, which converts.
    """
    out = _joined(vectors, dim)
    if out is None:
        return np.concatenate(vectors).astype(np.float32, copy=False).reshape(len(vectors), dim)
    return out


def _rounds(
    per_key: list[list[_T]], max_rounds: int
) -> list[tuple[int, list[_T], npt.NDArray[np.int_], npt.NDArray[np.intp]]]:
    """The embedding rounds of one batch; ``per_key`` is sorted by decreasing length.

    Each key's items are cut into at most ``max_rounds`` chunks; round r is the number ``m`` of
    keys that still have a chunk, their r-th chunks flattened, the chunk sizes and each flattened
    item's key row (0..m-1). A list, not a generator: the compiled build types its indexes.
    """
    rounds: list[tuple[int, list[_T], npt.NDArray[np.int_], npt.NDArray[np.intp]]] = []
    if not per_key:
        return rounds
    lens = [len(xs) for xs in per_key]
    # the keys with more items than rounds (a prefix) take chunks; the others one item a round
    n_long = 0
    while n_long < len(lens) and lens[n_long] > max_rounds:
        n_long += 1
    bounds: list[list[int]] = []
    if n_long:  # (numpy calls: none for a batch without long keys, the usual one)
        long_lens = np.array(lens[:n_long])
        # chunk r of a long key of n items: items [n * r // max_rounds, n * (r + 1) // max_rounds)
        bounds = [(long_lens * r // max_rounds).tolist() for r in range(max_rounds + 1)]
    m = len(lens)
    for r in range(min(lens[0], max_rounds)):
        while lens[m - 1] <= r:  # keys with no item left in this round (a suffix)
            m -= 1
        if n_long:
            lo, hi = bounds[r], bounds[r + 1]
            flat = list(_chain([per_key[q][lo[q] : hi[q]] for q in range(n_long)]))
            flat += [per_key[q][r] for q in range(n_long, m)]
            sizes = np.ones(m, dtype=np.int_)
            sizes[:n_long] = np.subtract(hi, lo)
            rounds.append((m, flat, sizes, np.repeat(np.arange(m), sizes)))
        else:
            rounds.append((m, [per_key[q][r] for q in range(m)], np.ones(m, dtype=np.int_), np.arange(m)))
    return rounds


def _damped_step(
    contrib: npt.NDArray[np.float32],
    lr: npt.NDArray[np.float32],
    sizes: npt.NDArray[np.int_],
    current: npt.NDArray[np.float32],
    reg: np.float32,
) -> npt.NDArray[np.float32]:
    """One update per key from its chunk: mean gradient x sqrt(chunk size), minus L2 decay.

    For a chunk of one event this is exactly that event's SGD step. The arithmetic is float64 (what
    float32 / int64 promotes to); the sizes and the float32 scale become float64 once, not once per
    element of a broadcast.
    """
    if len(sizes) == len(contrib):
        # every chunk holds one event: the general path's division by its size and scaling by sqrt(1)
        # are exact (x / 1.0 == 1.0 * x == x), so they are left out; the same float64 arithmetic
        step: npt.NDArray[np.float32] = (contrib - (lr.astype(np.float64) * reg)[:, None] * current).astype(np.float32)
        return step
    div = sizes.astype(np.float64)
    # the chunks of more than one event are a prefix (see ``_rounds``); the rest are single rows,
    # which are their own sums: ``reduceat`` costs about as much per chunk as per summed row
    k = int(np.flatnonzero(sizes > 1)[-1]) + 1
    starts = np.concatenate([[0], np.cumsum(sizes[:k])])
    n = starts[k]
    mean_contrib = np.concatenate([np.add.reduceat(contrib[:n], starts[:k], axis=0), contrib[n:]]) / div[:, None]
    mean_lr = np.concatenate([np.add.reduceat(lr[:n], starts[:k]), lr[n:]]) / div
    scale = np.sqrt(div).astype(np.float32).astype(np.float64)[:, None]  # a float32 sqrt, promoted once
    out: npt.NDArray[np.float32] = (scale * (mean_contrib - (mean_lr * reg)[:, None] * current)).astype(np.float32)
    return out


def apply_user_batch(
    batch: Sequence[tuple[str, UserState | None, Sequence[Event]]],
    cfg: CoreConfig,
    items: ItemVectorSource,
    *,
    in_place: bool = False,
) -> list[tuple[UserState, Outcome]]:
    """Apply each user's events (in arrival order) to that user's state.

    The result equals applying the events one at a time per user; the embedding
    steps are computed in *rounds* (the r-th positive event of every user at once)
    so that numpy works on matrices instead of 64-float vectors. Item vectors are
    read from ``items`` as of the start of the batch. Input states are not mutated,
    unless ``in_place``: then they are updated and returned themselves, which saves a
    deep copy per key for callers that discard the old states (the worker decodes them
    fresh from bytes; replay replaces them).
    """
    return _apply_user_batch(batch, cfg, items, in_place)


def _store_vectors(news: list[_St], order: list[int], M: npt.NDArray[np.float32], n_steps: list[int]) -> None:
    """Row ``r`` of the rounds' matrix ``M`` becomes the vector of ``news[order[r]]``, which took ``n_steps`` steps.

    One copy per row, not views of ``M``: a long-lived (cached) state must not pin the batch matrix.
    """
    after = list(map(_copy, M))
    for row in range(len(order)):
        j = order[row]
        new = news[j]
        new.vector = after[row]
        new.steps += n_steps[j]


def _store_user_vectors(
    news: list[UserState], order: list[int], M: npt.NDArray[np.float32], n_steps: list[int]
) -> None:
    """:func:`_store_vectors` for user states: ``new`` is typed ``UserState`` in the compiled build, so its
    fields are C struct members (a generic attribute get or set costs ~130-150 instructions, three a user)."""
    after = list(map(_copy, M))
    for row in range(len(order)):
        j = order[row]
        new = news[j]
        new.vector = after[row]
        new.steps += n_steps[j]


def _apply_user_batch(
    batch: Sequence[tuple[str, UserState | None, Sequence[Event]]],
    cfg: CoreConfig,
    items: ItemVectorSource,
    in_place: bool,
) -> list[tuple[UserState, Outcome]]:
    # the body of apply_user_batch: a function without keyword-only arguments, which state.pxd can
    # declare (cpdef), so that the compiled build types its lists and indexes
    news: list[UserState] = []
    outs: list[Outcome] = []
    accepted: list[list[Event]] = []
    accepted_at: list[list[int]] = []
    positives: list[list[_Step]] = []  # per user
    n_pos: list[int] = []  # per user: len(positives[j])
    n_long = 0  # users with more than one positive
    # the config's fields read once a batch; a longer lateness excludes no int64 event time either
    lateness = min(cfg.lateness_us, _LATENESS_MAX)
    recent_n = cfg.recent_n
    uids: list[str] = []
    for uid, state, events in batch:
        uids.append(uid)
        new = _blank_user() if state is None else state if in_place else state.copy()
        out = _blank_outcome()
        acc, at, pos = _apply_user_features(new, events, lateness, recent_n, out)
        news.append(new)
        outs.append(out)
        accepted.append(acc)
        accepted_at.append(at)
        positives.append(pos)
        n_pos.append(len(pos))
        if len(pos) > 1:
            n_long += 1
    weights = POSITIVE_WEIGHTS
    # the users with positives by decreasing count, ties in batch order (a stable sort): those with more
    # than one (few) sorted, then those with one in batch order. A keyed sort of all cost ~350 a user.
    if n_long:
        order = sorted([j for j in range(len(n_pos)) if n_pos[j] > 1], key=n_pos.__getitem__, reverse=True)
        order += [j for j in range(len(n_pos)) if n_pos[j] == 1]
    else:
        order = [j for j in range(len(n_pos)) if n_pos[j]]
    # each user's positive events' forwards, in order: rounds take consecutive chunks of a user's
    # positives, so appending round by round keeps each list in the order of the user's positives
    pos_fw: list[list[Forward]] = [[] for _ in batch]
    if order:
        dim = cfg.dim
        # per row of U (the users in ``order``), in one pass: the user's vector before the batch, its id, its
        # positives and their forwards; the rows of users without a vector yet
        vecs: list[Vec | None] = []
        row_uid = []
        row_fw = []
        per_key = []
        fresh = []
        for row in range(len(order)):
            j = order[row]
            new = news[j]  # typed: its vector is a struct member, not a generic attribute read
            vec = new.vector
            if vec is None:
                fresh.append(row)
            vecs.append(vec)
            row_uid.append(uids[j])
            row_fw.append(pos_fw[j])
            per_key.append(positives[j])
        if fresh:
            init = init_matrix([row_uid[row] for row in fresh], cfg, "u")
            for k in range(len(fresh)):
                row = fresh[k]
                vec = init[k]
                new = news[order[row]]
                new.vector = vecs[row] = vec
        before: list[Vec] | None = vecs  # type: ignore[assignment]  # each row has its vector now
        U = _joined(before, dim)  # type: ignore[arg-type]
        if U is None:  # some vector is not float32 of ``dim``: converted, so U's rows are not those vectors
            U = _rows(before, dim)  # type: ignore[arg-type]
            before = None
        reg = np.float32(cfg.reg)
        lr_of = {t: cfg.lr * w for t, w in weights.items()}
        seed = cfg.seed & 0xFFFFFFFF  # the negatives of an event: picked by a seeded CRC-32 of its id
        for m, evs, sizes, rows in _rounds(per_key, cfg.max_rounds):
            # one pass over the round's steps: item ids, the CRC-32s of the event ids, learning rates
            iids = []
            crcs = []
            lrs = []
            for st in evs:  # an event's fields (see _Step)
                iids.append(st[4])
                eid = st[0]  # a str local in the compiled build: ``encode`` is a direct C call
                crcs.append(_crc32(eid.encode(), seed))
                lrs.append(lr_of[st[1]])
            V = items.get_many(iids)
            hs = _uint64s(crcs)
            negs = items.sample_many(hs, cfg.negatives)
            if negs is None:
                negs = np.zeros((len(evs), 1, dim), dtype=np.float32)
            # The round's rows of U (Ue), each step's row and each forward's snapshot of its user's vector (Ue's
            # row). In the first round, when every user has one step in it, the rows are all of U's in order: U
            # itself is read (before the round's update of U below: no copy), step e is row e, and the snapshots
            # are the vectors before the batch, bit for bit: those arrays themselves, not new views.
            ev_rows: list[int] | None = None
            if before is not None and len(evs) == len(U):
                Ue = U
                snaps = before
            else:
                Ue = U.take(rows, 0)  # ``U[rows]``, by a tighter copy loop
                ev_rows = rows.tolist()
                snaps = list(Ue) if before is None else [before[row] for row in ev_rows]
            before = None
            neg_scores = np.matmul(negs, Ue[:, :, None])[:, :, 0]
            pos = (Ue * V).sum(axis=1)
            g = _sigmoid(neg_scores - pos[:, None])  # sigma(-(x_ui - x_uj))
            # mean over the negatives of g_k * (v_i - v_k), without the (f, k, dim) temporary
            grad = (g.sum(axis=1)[:, None] * V - np.matmul(g[:, None, :], negs)[:, 0, :]) / np.float32(g.shape[1])
            lr = _float32s(lrs)
            # the scores as one tuple, each forward's a slice of it: no list per row to build and copy
            ns = tuple(neg_scores.ravel().tolist())
            n_neg = neg_scores.shape[1]
            for e in range(len(evs)):
                st = evs[e]
                row = e if ev_rows is None else ev_rows[e]
                at0 = n_neg * e
                row_fw[row].append(
                    _new(Forward, (st[4], st[0], st[1], st[2], row_uid[row], snaps[e], ns[at0 : at0 + n_neg], True,
                                   None, None))
                )  # fmt: skip
            U[:m] += _damped_step(lr[:, None] * grad, lr, sizes, U[:m], reg)
        _store_user_vectors(news, order, U, n_pos)
    results = []
    impression = _IMPRESSION_TYPE
    for j in range(len(batch)):
        out = outs[j]
        if len(pos_fw[j]) == len(accepted[j]):  # every accepted event is positive: one forward each
            out.forwards = pos_fw[j]
            out.forward_src = accepted_at[j]
            results.append((news[j], out))
            continue
        uid = uids[j]
        fwds = out.forwards = []
        src = out.forward_src = []
        positive = iter(pos_fw[j])
        at = accepted_at[j]
        acc = accepted[j]  # as long as ``at`` (a C loop over both; ``zip(strict=True)`` is a keyword call)
        for k in range(len(acc)):
            i = at[k]
            f = _fields(acc[k])
            etype = f[1]
            if etype is impression:
                eid, ts, slate = f[0], f[2], f[7]
                fwds.extend([_new(Forward, (item, eid, etype, ts, uid, None, (), True, None, None)) for item in slate])
                src.extend([i] * len(slate))
            elif etype in weights:  # the vector snapshot and negatives' scores of its BPR step
                fwds.append(next(positive))
                src.append(i)
            else:
                fwds.append(_new(Forward, (f[4], f[0], etype, f[2], uid, None, (), True, None, None)))
                src.append(i)
        results.append((news[j], out))
    return results


def apply_user_events(
    state: UserState | None,
    user_id: str,
    events: Sequence[Event],
    cfg: CoreConfig,
    items: ItemVectorSource,
) -> tuple[UserState, Outcome]:
    """Apply one user's ``events`` (arrival order); see :func:`apply_user_batch`."""
    return apply_user_batch([(user_id, state, events)], cfg, items)[0]


def _bump(buckets: dict[int, list[int]], idx: int, impressions: int, clicks: int, positives: int) -> None:
    """Add (impressions, clicks, positives) to bucket ``idx``."""
    counts = buckets.get(idx)
    if counts is None:
        buckets[idx] = [impressions, clicks, positives]
    else:
        counts[0] += impressions
        counts[1] += clicks
        counts[2] += positives


def _any_below(buckets: dict[int, list[int]], lo: int) -> bool:
    """``min(buckets) < lo``, without the builtin's call; a C loop in the compiled build."""
    for idx in buckets:  # noqa: SIM110 (any() over a generator is a closure, which cpdef functions cannot hold)
        if idx < lo:
            return True
    return False


def _apply_item_entries(
    new: ItemState, iid: str, entries: Sequence[ItemEntry], cfg: CoreConfig, U: Any, S: Any
) -> list[ItemEntry]:
    """Apply one item's entries (arrival order) to ``new``; returns the entries left to step.

    Features are order-independent and accumulated per bucket first; an upsert that is not
    newer than the current one (a redelivery, or an older one arriving late) changes nothing.
    Vector writes keep their order: embedding steps before a bootstrap are flushed first.
    ``U`` and ``S`` are the batch's user vectors and scores (see :data:`ItemEntry`).
    """
    upsert, impression, click = _UPSERT_TYPE, _IMPRESSION_TYPE, _CLICK_TYPE
    counts = new.counts
    type_index = TYPE_INDEX
    i_impr, i_click = _IMPR, _CLICK
    b5_us, b60_us, b5_per_b60 = B5_US, B60_US, _B5_PER_B60  # locals: C integers in the compiled build
    # The entries that count in the features (all but upserts) as runs of consecutive events in one
    # 5-minute bucket: (bucket index, impressions, clicks, positives). A batch's events mostly arrive in
    # time order, so the buckets take one update per run, not one per event.
    runs: list[tuple[int, int, int, int]] = []
    n_events = i5 = run5 = imp = clk = pos = 0
    n_impr = n_click = 0  # (C integers, compiled: added to the counts once, not a Python int per event)
    mine: list[ItemEntry] = []
    old_max = max_ts = new.max_ts
    for e in entries:
        etype = e[0]
        if etype is upsert:
            event_id, eligible, category, bootstrap = e[5]  # type: ignore[misc]  # an upsert's entry has them
            # newest (event time, event id) wins
            key = (e[1], event_id)
            if new.upsert_key is not None and key <= new.upsert_key:
                continue
            new.version += 1
            counts[type_index[etype]] += 1
            new.upsert_key = key
            new.eligible = eligible
            new.category = category
            if bootstrap is not None and len(bootstrap) == cfg.dim:
                if mine:
                    _item_steps([new], [mine], cfg, [iid], U, S)
                    mine = []
                new.vector = np.asarray(bootstrap, dtype=np.float32)
            continue
        ts = e[1]
        if ts > max_ts:
            max_ts = ts
        if e[2] >= 0:
            mine.append(e)
        i5 = ts // b5_us
        if i5 != run5 or not n_events:
            if n_events:
                runs.append((run5, imp, clk, pos))
            run5 = i5
            imp = clk = pos = 0
        n_events += 1
        # the type's count: impressions and clicks (most entries) without the dict lookup, counted here
        if etype is impression:
            imp += 1
            n_impr += 1
        elif etype is click:
            clk += 1
            pos += 1
            n_click += 1
        else:
            pos += 1
            ti = type_index[etype]
            counts[ti] += 1  # a C integer index in the compiled build
    if not n_events:
        return mine
    counts[i_impr] += n_impr
    counts[i_click] += n_click
    runs.append((run5, imp, clk, pos))
    new.version += n_events
    # The buckets hold the exact counts of the windows [top - keep, top] of the final newest
    # bucket index top, whatever the arrival order: when the newest event time moves, the buckets
    # that fell out of a window go, and an event older than its window counts in no bucket (in a
    # historical log most do: a replay batch spans days).
    lo5 = max_ts // b5_us - KEEP_B5
    lo60 = max_ts // b60_us - KEEP_B60
    b5, b60 = new.b5, new.b60
    if max_ts > old_max:
        # the old newest bucket is the old time's: when it is out too, all are (no scan)
        if old_max // b5_us < lo5:
            b5 = new.b5 = {}
        elif _any_below(b5, lo5):
            b5 = new.b5 = {k: v for k, v in b5.items() if k >= lo5}
        if old_max // b60_us < lo60:
            b60 = new.b60 = {}
        elif _any_below(b60, lo60):
            b60 = new.b60 = {k: v for k, v in b60.items() if k >= lo60}
    for i5, imp, clk, pos in runs:
        i60 = i5 // b5_per_b60  # = ts // B60_US (floor divisions compose), a cheaper division
        if i60 >= lo60:
            _bump(b60, i60, imp, clk, pos)
            if i5 >= lo5:
                _bump(b5, i5, imp, clk, pos)
    new.max_ts = max_ts
    return mine


def forward_entries(
    forwards: Iterable[Forward], vecs: list[Vec], flat: list[float], row_base: int = 0, score_base: int = 0
) -> list[ItemEntry]:
    """The item stage's entries of ``forwards``: their user vectors go to ``vecs``, their scores to ``flat``.

    The entries' rows and score indexes count from ``row_base`` and ``score_base`` (where ``vecs``
    and ``flat`` begin in the batch's matrix and score array). Only what the item stage reads is
    kept: a forward without a user vector needs no scores, an upsert neither.
    """
    out: list[ItemEntry] = []
    upsert = _UPSERT_TYPE
    for fw in forwards:
        etype = fw.type
        if etype is upsert:
            out.append((etype, fw.ts_us, -1, 0, 0, (fw.event_id, fw.eligible, fw.category, fw.bootstrap)))
            continue
        uv = fw.user_vector
        if uv is None:
            out.append((etype, fw.ts_us, -1, 0, 0, None))
            continue
        ns = fw.neg_scores
        out.append((etype, fw.ts_us, row_base + len(vecs), score_base + len(flat), len(ns), None))
        vecs.append(uv)
        flat.extend(ns)
    return out


def score_array(flat: list[float]) -> npt.NDArray[np.float64]:
    """Scores as a float64 array (struct packs the doubles in one C loop; exact for floats and float32s)."""
    return np.frombuffer(_pack(f"{len(flat)}d", *flat), dtype=np.float64)


def apply_item_batch(
    batch: Sequence[tuple[str, ItemState | None, Sequence[Forward]]], cfg: CoreConfig, *, in_place: bool = False
) -> list[ItemState]:
    """Apply each item's forwards (arrival order); embedding steps vectorized in rounds.

    Equal to applying the forwards one at a time per item. Input states are not mutated,
    unless ``in_place`` (see :func:`apply_user_batch`). The forwards become entries
    (:func:`forward_entries`) for :func:`apply_item_entries`, which the live worker calls on
    what it decodes from forward packs directly.
    """
    vecs: list[Vec] = []
    flat: list[float] = []
    work = [(iid, state, forward_entries(forwards, vecs, flat)) for iid, state, forwards in batch]
    U = _rows(vecs, cfg.dim) if vecs else None
    return _apply_item_entries_batch(work, cfg, U, score_array(flat), in_place)


def apply_item_entries(
    batch: Sequence[tuple[str, ItemState | None, Sequence[ItemEntry]]],
    cfg: CoreConfig,
    U: npt.NDArray[np.float32] | None,
    S: npt.NDArray[np.float64],
    *,
    in_place: bool = False,
) -> list[ItemState]:
    """Apply each item's entries (arrival order), whose rows index ``U`` and score indexes ``S``.

    :func:`apply_item_batch` on the forwards the entries stand for gives the same states.
    """
    return _apply_item_entries_batch(batch, cfg, U, S, in_place)


def _apply_item_entries_batch(
    batch: Sequence[tuple[str, ItemState | None, Sequence[ItemEntry]]], cfg: CoreConfig, U: Any, S: Any, in_place: bool
) -> list[ItemState]:
    # the body of apply_item_entries: a function without keyword-only arguments, which state.pxd can declare
    news: list[ItemState] = []
    steps: list[list[ItemEntry]] = []
    ids: list[str] = []
    for iid, state, entries in batch:
        new = _blank_item() if state is None else state if in_place else state.copy()
        steps.append(_apply_item_entries(new, iid, entries, cfg, U, S))
        news.append(new)
        ids.append(iid)
    _item_steps(news, steps, cfg, ids, U, S)
    return news


def _item_steps(
    news: list[ItemState],
    steps: list[list[ItemEntry]],
    cfg: CoreConfig,
    ids: list[str] | None = None,
    U: Any = None,
    S: Any = None,
) -> None:
    n_steps = list(map(len, steps))
    order = sorted([j for j, n in enumerate(n_steps) if n], key=n_steps.__getitem__, reverse=True)  # stable
    if not order:
        return
    fresh = [j for j in order if news[j].vector is None]
    if fresh:
        assert ids is not None
        init = init_matrix([ids[j] for j in fresh], cfg, "i")
        for row, j in enumerate(fresh):
            news[j].vector = init[row]
    dim = cfg.dim
    V = _rows([news[j].vector for j in order], dim)  # type: ignore[misc]
    reg = np.float32(cfg.reg)
    lr_of = {t: cfg.lr * POSITIVE_WEIGHTS.get(t, 0.0) for t in EventType}
    for m, es, sizes, rows in _rounds([steps[j] for j in order], cfg.max_rounds):
        # one pass over the round's entries: their user vector rows, first scores and learning rates,
        # and whether they all have the same number of negatives
        at = []
        lrs = []
        k = es[0][4]
        same_k = k > 0
        # whether each entry's scores are the k at k x its row: then S, read as rows of k, is indexed
        # like U (so it is in a batch whose vector-bearing entries all have k scores, the usual case)
        by_row = same_k and len(S) % k == 0
        for e in es:
            at.append(e[2])
            if e[4] != k:
                same_k = False
            else:
                r = e[2]  # (C integers, compiled)
                s0 = e[3]
                if s0 != k * r:
                    by_row = False
            lrs.append(lr_of[e[0]])
        # the rows and scores, bit for bit, as new arrays: ``take`` copies rows in a tight loop (half the
        # cost of ``U[at]``); the rows as an intp array built by struct (numpy's conversion of a list
        # discovers each item's type)
        ats = _intps(at)
        Ur = U.take(ats, 0)
        Ve = V.take(rows, 0)  # (a row gather as U.take: the same rows, at a fraction of fancy indexing)
        pos = np.einsum("fd,fd->f", Ur, Ve)
        if same_k:  # the usual case: the same k > 0 negatives each
            if by_row:
                NS = S.reshape(-1, k).take(ats, 0).astype(np.float32)
            else:
                NS = S.take(_intps([e[3] for e in es])[:, None] + _arange(k)).astype(np.float32)
            g = _sigmoid(NS - pos[:, None]).sum(axis=1) / np.float32(k)
        else:
            k = 1
            for e in es:
                if e[4] > k:
                    k = e[4]
            NS = np.zeros((len(es), k), dtype=np.float32)
            mask = np.zeros((len(es), k), dtype=np.float32)
            for i in range(len(es)):
                e = es[i]
                n = e[4]
                if n:
                    s0 = e[3]
                    NS[i, :n] = S[s0 : s0 + n]
                    mask[i, :n] = 1.0
                else:
                    mask[i, 0] = 1.0
            g = (_sigmoid(NS - pos[:, None]) * mask).sum(axis=1) / mask.sum(axis=1)
        lr = _float32s(lrs)
        # in place: the same float32 sums as ``V[:m] + step``, without a temporary and its copy back
        V[:m] += _damped_step((lr * g)[:, None] * Ur, lr, sizes, V[:m], reg)
    _store_vectors(news, order, V, n_steps)


def apply_item_forwards(
    state: ItemState | None, item_id: str, forwards: Iterable[Forward], cfg: CoreConfig
) -> ItemState:
    """Apply one item's forwards (arrival order); see :func:`apply_item_batch`."""
    return apply_item_batch([(item_id, state, list(forwards))], cfg)[0]


def _window(buckets: dict[int, list[int]], width_us: int, now_us: int, span_us: int) -> list[int]:
    lo = (now_us - span_us) // width_us
    hi = now_us // width_us
    total = [0, 0, 0]
    for idx, counts in buckets.items():
        if lo < idx <= hi:
            total[0] += counts[0]
            total[1] += counts[1]
            total[2] += counts[2]
    return total


def ctr(clicks: int, impressions: int, cfg: CoreConfig) -> float:
    """A click-through rate with a Beta prior: ``(clicks + a) / (max(impressions, clicks) + b)``.

    ``a`` / ``b`` are ``cfg.ctr_prior_clicks`` / ``ctr_prior_impressions`` (a prior CTR of a / b, worth b
    impressions). A click counts as its own impression when fewer impressions than clicks were logged in
    the window: apps click through from surfaces whose impressions never reach the ``impressions``
    topic (another app, a push message, a link), so the raw ratio could exceed 1. With that, and
    ``0 <= a <= b`` (checked by CoreConfig), the rate always lies in [0, 1].
    """
    shown = impressions if impressions > clicks else clicks
    return (clicks + cfg.ctr_prior_clicks) / (shown + cfg.ctr_prior_impressions)


def item_features(state: ItemState, now_us: int, cfg: CoreConfig) -> dict[str, float]:
    """Read-time item features as of ``now_us`` (event time).

    * ``ctr_1h`` / ``ctr_24h``: :func:`ctr` over the window, a Beta prior.
    * ``pos_1h`` / ``pos_24h``: positive interactions in the window.
    * ``popularity``: exponentially decayed positives (half-life ``trend_half_life_us``).
    * ``trending``: ``(pos_1h + 1) / (pos_24h / 24 + 1)``, the last hour against the day's mean.
    """
    h1 = _window(state.b5, B5_US, now_us, 12 * B5_US)
    h24 = _window(state.b60, B60_US, now_us, 24 * B60_US)
    lam = math.log(2) / cfg.trend_half_life_us
    popularity = 0.0
    for idx, counts in state.b60.items():
        end = (idx + 1) * B60_US
        if end - B60_US <= now_us:
            popularity += counts[2] * math.exp(-lam * max(0, now_us - end))
    return {
        "ctr_1h": ctr(h1[1], h1[0], cfg),
        "ctr_24h": ctr(h24[1], h24[0], cfg),
        "pos_1h": float(h1[2]),
        "pos_24h": float(h24[2]),
        "popularity": popularity,
        "trending": (h1[2] + 1.0) / (h24[2] / 24.0 + 1.0),
        "impressions": float(state.counts[_IMPR]),
        "clicks": float(state.counts[_CLICK]),
    }


def user_features(state: UserState) -> dict[str, object]:
    """Read-time user features: counts by type, recent items and the session context."""
    counts = {t.value: state.counts[i] for t, i in TYPE_INDEX.items()}
    session = state.session
    return {
        "counts": counts,
        "recent_items": [r[2] for r in state.recent],
        "session_id": session[2] if session else None,
        "surface": session[3] if session else None,
        "device": session[4] if session else None,
        "last_event_us": state.max_ts,
    }
