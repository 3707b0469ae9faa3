"""Strict JSON codec for :class:`streams.events.Event`.

``decode`` either returns a valid event or raises :class:`InvalidEvent` with a
machine-readable ``reason`` (one of :data:`REASONS`) and a human detail. It is a
pure function: the reference time for the "too far in the future" check is an
argument (the Kafka record timestamp on the live path), never the wall clock.

Wire format (one JSON object)::

    {"event_id": "e1", "type": "click", "user_id": "u1", "item_id": "i9",
     "event_time": "2026-11-22T10:00:00.250Z", "schema_version": 1,
     "context": {"surface": "home", "session_id": "s1", "device": "ios", "position": 3}}

``impression`` carries ``items`` (the slate) and optionally ``request_id`` and
``propensity``; ``item_upsert`` carries ``item_id`` and optionally ``eligible``,
``category`` and ``vector`` (a bootstrap embedding).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

import msgspec
import orjson

from streams.errors import InvalidEvent
from streams.events import SCHEMA_VERSION, Context, Event, EventType, datetime_to_ts, ts_to_datetime

__all__ = [
    "REASONS",
    "MAX_EVENT_BYTES",
    "MAX_FUTURE_US",
    "clear_caches",
    "decode",
    "decode_at",
    "decode_strict",
    "format_time",
    "encode",
    "to_dict",
    "from_dict",
]

#: Every reason ``decode`` can give, for DLQ consumers and metrics labels.
REASONS = (
    "oversized",
    "bad_json",
    "not_an_object",
    "missing_field",
    "wrong_type",
    "unknown_type",
    "bad_timestamp",
    "future_timestamp",
    "unsupported_schema_version",
    "bad_value",
)

MAX_EVENT_BYTES = 64 * 1024
#: Events more than this far ahead of the reference time are rejected (1 hour).
MAX_FUTURE_US = 3_600 * 1_000_000
MAX_ID_LEN = 256
MAX_SLATE = 1_000
MAX_VECTOR = 4_096

_TYPES = {t.value: t for t in EventType}
_NEEDS_USER = frozenset(t for t in EventType if t is not EventType.ITEM_UPSERT)
_NEEDS_ITEM = frozenset(
    {EventType.VIEW, EventType.CLICK, EventType.ADD_TO_CART, EventType.PURCHASE, EventType.ITEM_UPSERT}
)


def _id(obj: dict[str, Any], name: str, required: bool) -> str | None:
    value = obj.get(name)
    if value is None:
        if required:
            raise InvalidEvent("missing_field", f"{name!r} is required")
        return None
    if type(value) is not str:
        raise InvalidEvent("wrong_type", f"{name!r} must be a string, got {type(value).__name__}")
    if not value or len(value) > MAX_ID_LEN:
        raise InvalidEvent("bad_value", f"{name!r} must be 1..{MAX_ID_LEN} characters")
    return value


def _opt_str(obj: dict[str, Any], name: str) -> str | None:
    value = obj.get(name)
    if value is None:
        return None
    if type(value) is not str:
        raise InvalidEvent("wrong_type", f"{name!r} must be a string, got {type(value).__name__}")
    return value


def _parse_time(raw: Any) -> int:
    if type(raw) is not str:
        raise InvalidEvent("wrong_type", "'event_time' must be an ISO-8601 string with a timezone")
    try:
        dt = datetime.fromisoformat(raw)
    except ValueError as exc:
        raise InvalidEvent("bad_timestamp", f"'event_time' is not ISO-8601: {raw[:64]!r}") from exc
    if dt.tzinfo is None:
        raise InvalidEvent("bad_timestamp", "'event_time' must carry a timezone (e.g. 'Z' or '+00:00')")
    return datetime_to_ts(dt)


_NO_CONTEXT = Context()


def _context(raw: Any) -> Context:
    if raw is None:
        return _NO_CONTEXT
    if type(raw) is not dict:
        raise InvalidEvent("wrong_type", "'context' must be an object")
    position = raw.get("position")
    if position is not None and (type(position) is not int or position < 0):
        raise InvalidEvent("wrong_type", "'context.position' must be a non-negative integer")
    return Context(
        surface=_opt_str(raw, "surface"),
        session_id=_opt_str(raw, "session_id"),
        device=_opt_str(raw, "device"),
        position=position,
    )


def from_dict(obj: Any, ref_us: int | None = None) -> Event:
    """Validate a decoded JSON object and build an :class:`Event`.

    ``ref_us`` is the reference time for the future check (None skips it).
    """
    if type(obj) is not dict:
        raise InvalidEvent("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    version = obj.get("schema_version")
    if version is None:
        raise InvalidEvent("missing_field", "'schema_version' is required")
    if type(version) is not int:
        raise InvalidEvent("wrong_type", "'schema_version' must be an integer")
    if not 1 <= version <= SCHEMA_VERSION:
        raise InvalidEvent("unsupported_schema_version", f"schema_version {version} is not supported")
    raw_type = obj.get("type")
    if raw_type is None:
        raise InvalidEvent("missing_field", "'type' is required")
    etype = _TYPES.get(raw_type) if type(raw_type) is str else None
    if etype is None:
        raise InvalidEvent("unknown_type", f"unknown event type {str(raw_type)[:64]!r}")
    event_id = _id(obj, "event_id", True)
    if "event_time" not in obj:
        raise InvalidEvent("missing_field", "'event_time' is required")
    ts_us = _parse_time(obj["event_time"])
    if ref_us is not None and ts_us > ref_us + MAX_FUTURE_US:
        raise InvalidEvent("future_timestamp", "'event_time' is more than 1 hour after the record time")
    user_id = _id(obj, "user_id", etype in _NEEDS_USER)
    item_id = _id(obj, "item_id", etype in _NEEDS_ITEM)
    items: tuple[str, ...] = ()
    propensity = None
    vector = None
    eligible = True
    if etype is EventType.IMPRESSION:
        raw_items = obj.get("items")
        if raw_items is None:
            raise InvalidEvent("missing_field", "'items' is required for impressions")
        if type(raw_items) is not list or not all(type(i) is str and i for i in raw_items):
            raise InvalidEvent("wrong_type", "'items' must be a list of non-empty strings")
        if not 0 < len(raw_items) <= MAX_SLATE:
            raise InvalidEvent("bad_value", f"'items' must hold 1..{MAX_SLATE} ids")
        items = tuple(raw_items)
        raw_p = obj.get("propensity")
        if raw_p is not None:
            if type(raw_p) not in (int, float) or not 0.0 < raw_p <= 1.0:
                raise InvalidEvent("bad_value", "'propensity' must be a number in (0, 1]")
            propensity = float(raw_p)
    if etype is EventType.ITEM_UPSERT:
        raw_e = obj.get("eligible", True)
        if type(raw_e) is not bool:
            raise InvalidEvent("wrong_type", "'eligible' must be a boolean")
        eligible = raw_e
        raw_v = obj.get("vector")
        if raw_v is not None:
            if (
                type(raw_v) is not list
                or not 0 < len(raw_v) <= MAX_VECTOR
                or not all(type(x) in (int, float) for x in raw_v)
            ):
                raise InvalidEvent("wrong_type", "'vector' must be a non-empty list of numbers")
            vector = tuple(float(x) for x in raw_v)
    return Event(
        event_id=event_id,  # type: ignore[arg-type]  # required above
        type=etype,
        ts_us=ts_us,
        user_id=user_id,
        item_id=item_id,
        schema_version=version,
        context=_context(obj.get("context")),
        items=items,
        request_id=_opt_str(obj, "request_id"),
        propensity=propensity,
        eligible=eligible,
        category=_opt_str(obj, "category"),
        vector=vector,
    )


def decode_strict(data: bytes, ref_us: int | None = None) -> Event:
    """The reference decoder: orjson + :func:`from_dict`. Slower than :func:`decode`, same results.

    It gives every rejection its reason; :func:`decode` falls back to it whenever its
    fast path does not accept an event outright.
    """
    if len(data) > MAX_EVENT_BYTES:
        raise InvalidEvent("oversized", f"event is {len(data)} bytes, the limit is {MAX_EVENT_BYTES}")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent("bad_json", f"not valid JSON: {exc}") from exc
    return from_dict(obj, ref_us)


# -- the fast path -------------------------------------------------------------------------
# msgspec parses and type-checks a well-formed event in one C call (~1.5 us against ~9 us for
# orjson + from_dict). It is deliberately *at least as strict* as from_dict: whatever it does
# not accept outright (a wrong type, a constraint, a field that matters only for another event
# type, an integer orjson would read as a float) goes to decode_strict, which then accepts it or
# names the reason. A property test checks that both decoders agree on arbitrary input.
_I64 = 2**63 - 1  # orjson reads larger integers as floats: leave those to the strict path
_ID_LEN = MAX_ID_LEN  # (a C constant in the compiled build: ``decode`` checks the ids' lengths)
_FUTURE_US = MAX_FUTURE_US  # (C constants too: the size and future checks compare C integers)
_MAX_BYTES = MAX_EVENT_BYTES
_MAX_SLATE = MAX_SLATE
#: the reference times ``_decode`` takes: every event time lies in int64 (datetime's years 1-9999), so a
#: reference time outside these bounds compares with all of them as the nearest bound does
_REF_MIN = -_I64 - 1
_REF_MAX = _I64 - MAX_FUTURE_US


# (the fields in the order that this project's producers write the keys: ``to_dict``/``encode``, the
# producer CLI's generators, the API's impressions. msgspec looks a key up from the field after the last
# one found: ~500 instructions an event less than in another order, which still decodes the same.
# kw_only: a required field may follow optional ones)
class _FastEvent(msgspec.Struct, gc=False, kw_only=True):
    event_id: str  # (the ids' lengths: ``decode`` checks them, ~250 instructions an event less than msgspec.Meta)
    type: EventType
    user_id: str | None = None
    event_time: str
    schema_version: Annotated[int, msgspec.Meta(ge=1, le=SCHEMA_VERSION)]
    context: Context | None = None  # (straight into the event's type, its position's bounds included)
    item_id: str | None = None
    # (tuples, as the Event holds them: no copy)
    items: Annotated[tuple[Annotated[str, msgspec.Meta(min_length=1)], ...], msgspec.Meta(min_length=1)] | None = None
    request_id: str | None = None
    propensity: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] | None = None
    eligible: bool = True
    category: str | None = None
    vector: Annotated[tuple[float, ...], msgspec.Meta(min_length=1, max_length=MAX_VECTOR)] | None = None


_FAST = msgspec.json.Decoder(_FastEvent)
_fast_decode = _FAST.decode  # bound once: a method lookup per event costs ~300 instructions
_astuple = msgspec.structs.astuple  # one C call for all fields (attribute reads are ~100 ns each)
_isascii = bytes.isascii  # (the unbound method: ~200 instructions less than looking ``data.isascii`` up)
#: a memo of parsed event times (a log's neighbouring events often share a timestamp string)
_TIMES: dict[str, int] = {}
_TIMES_MAX = 1 << 16
#: a memo of the whole seconds of canonical UTC times (``_utc_time_memo``): "YYYY-MM-DDTHH:MM:SS" -> us
_SECONDS: dict[str, int] = {}
_SECONDS_FORM = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", re.ASCII)
#: whether this module runs compiled (its file is then the extension, not the .py)
_COMPILED = not __file__.endswith(".py")
_IMPRESSION = EventType.IMPRESSION
_UPSERT = EventType.ITEM_UPSERT
#: not an event time (``_utc_time_at``'s "none"): int64's minimum lies far outside datetime's years
_NO_TIME = _REF_MIN


def clear_caches() -> None:
    """Forget the memos of parsed event times and context strings (benchmarks start each timed run cold)."""
    _TIMES.clear()
    _SECONDS.clear()
    _FEW[:] = [(b"", "")] * _FEW_SLOTS


def _utc_time_us(text: str) -> int | None:
    """The event time ``text`` in us since the epoch if it is ``YYYY-MM-DDTHH:MM:SS[.fff|.ffffff]Z``, else None.

    The canonical UTC form that producers write (``format_time``, millisecond clocks); the caller
    parses any other form (and any invalid time: None) in full. Where this gives a number,
    ``datetime.fromisoformat`` gives the same time. Two implementations, one for each build.
    """
    return _utc_time_scan(text) if _COMPILED else _utc_time_memo(text)


def _utc_time_scan(text: str) -> int | None:
    """:func:`_utc_time_us` for the compiled build: :func:`_utc_time_at` over the text's ASCII bytes."""
    if not text.isascii():
        return None
    raw = text.encode()
    ts = _utc_time_at(raw, 0, len(raw))
    return None if ts == _NO_TIME else ts


def _utc_time_at(p: bytes, a: int, b: int) -> int:
    """The canonical UTC time in ``p[a:b]`` (:func:`_utc_time_us`'s forms) in us since the epoch, else ``_NO_TIME``.

    Read where its digits lie: compiled, C reads that make no objects. (Slices, ``int()`` and a memo of
    the whole seconds cost the compiled build ~3k instructions an event.)
    """
    n = b - a
    if n == 20:
        frac = 0
    elif n == 24 or n == 27:
        if p[a + 19] != ord("."):
            return _NO_TIME
        frac = _digits(p, a + 20, b - 1)
        if frac < 0:
            return _NO_TIME
        if n == 24:
            frac *= 1000  # milliseconds
    else:
        return _NO_TIME
    if (p[a + 4] != ord("-") or p[a + 7] != ord("-") or p[a + 10] != ord("T") or p[a + 13] != ord(":")
            or p[a + 16] != ord(":") or p[b - 1] != ord("Z")):  # fmt: skip
        return _NO_TIME
    year = _digits(p, a, a + 4)
    month = _digits(p, a + 5, a + 7)
    day = _digits(p, a + 8, a + 10)
    hour = _digits(p, a + 11, a + 13)
    minute = _digits(p, a + 14, a + 16)
    second = _digits(p, a + 17, a + 19)
    if month == 2:
        month_days = 29 if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0) else 28
    elif month == 4 or month == 6 or month == 9 or month == 11:
        month_days = 30
    else:
        month_days = 31
    # datetime's ranges (year 0, month 13, hour 24, second 60: none, and the full parse names the reason; -1:
    # not digits)
    if (year < 1 or not 1 <= month <= 12 or not 1 <= day <= month_days or not 0 <= hour <= 23
            or not 0 <= minute <= 59 or not 0 <= second <= 59):  # fmt: skip
        return _NO_TIME
    # days since 1970-01-01 (proleptic Gregorian; years counted from March, so a leap day ends its year)
    y = year - 1 if month <= 2 else year
    day_of_year = (153 * (month - 3 if month > 2 else month + 9) + 2) // 5 + day - 1
    days = y * 365 + y // 4 - y // 100 + y // 400 + day_of_year - 719_468
    return (((days * 24 + hour) * 60 + minute) * 60 + second) * 1_000_000 + frac


def _utc_time_memo(text: str) -> int | None:
    """:func:`_utc_time_us` for plain Python: the whole seconds are parsed once (memoized) and the fraction added.

    (A character loop costs plain Python ~1.4k instructions a character; slices, ``int()`` and
    a dict lookup are what is cheap there.)
    """
    n = len(text)
    if n == 20:
        frac = 0
    elif n == 24 or n == 27:
        digits = text[20 : n - 1]
        if text[19] != "." or not (digits.isascii() and digits.isdigit()):
            return None
        frac = int(digits) * 1000 if n == 24 else int(digits)
    else:
        return None
    if text[n - 1] != "Z":
        return None
    head = text[:19]
    seconds = _SECONDS.get(head)
    if seconds is None:
        if _SECONDS_FORM.fullmatch(head) is None:
            return None
        try:
            dt = datetime.fromisoformat(head + "+00:00")
        except ValueError:
            return None  # e.g. month 13: the caller's full parse names the reason
        seconds = datetime_to_ts(dt)
        if len(_SECONDS) >= _TIMES_MAX:
            _SECONDS.clear()
        _SECONDS[head] = seconds
    return seconds + frac


# -- the canonical form's scanner (the compiled build's first try) ------------------------------------
# Producers write one form (``encode``/``to_dict``, the producer CLI, serving's impressions through orjson):
# no whitespace, printable ASCII strings without escapes, integers without fractions. ``_scan`` reads exactly
# that straight from the bytes (compiled: C loops over a char pointer, a string object made from each span)
# and builds the Event itself; it declines (None) anything else, which then takes msgspec's path unchanged.
# It accepts only what that path accepts and gives an equal event (tests/streams/test_codec.py checks both).
# Fractional numbers (propensity, vector), nulls and keys that are not the event's fields are declined.
#: the event's keys (``_FastEvent``'s fields) by number, as ``_field`` gives them
_F_EVENT_ID = 0
_F_TYPE = 1
_F_USER_ID = 2
_F_EVENT_TIME = 3
_F_VERSION = 4
_F_CONTEXT = 5
_F_ITEM_ID = 6
_F_ITEMS = 7
_F_REQUEST_ID = 8
_F_PROPENSITY = 9
_F_ELIGIBLE = 10
_F_CATEGORY = 11
_F_VECTOR = 12
#: the keys every event has (bits of field numbers)
_REQUIRED = 1 << _F_EVENT_ID | 1 << _F_TYPE | 1 << _F_EVENT_TIME | 1 << _F_VERSION
#: the context's keys (``Context``'s fields) by number, as ``_context_field`` gives them
_C_SURFACE = 0
_C_SESSION_ID = 1
_C_DEVICE = 2
_C_POSITION = 3
_VIEW = EventType.VIEW
_CLICK = EventType.CLICK
_ADD_TO_CART = EventType.ADD_TO_CART
_PURCHASE = EventType.PURCHASE
_MAX_VERSION = SCHEMA_VERSION
#: the most digits an integer may have here (any 18 digits fit in int64; a longer one takes the general path)
_MAX_DIGITS = 18
#: the context's surfaces and devices seen last (``_few_str``), by slot: the bytes and the string made of them
_FEW_SLOTS = 64
_FEW: list[tuple[bytes, str]] = [(b"", "")] * _FEW_SLOTS


def _scan(data: bytes, check: bool, ref_us: int) -> Event | None:
    """The event in ``data`` if it is in the producers' canonical form (above), else None.

    ``check`` and ``ref_us`` as for ``_decode``; an event past the future limit is declined too (the
    general path names the reason).
    """
    p = data  # (compiled: a const unsigned char pointer into the bytes)
    n = len(data)
    if n > _MAX_BYTES or n < 2 or p[0] != ord("{") or not _printable(p, n):
        return None
    event_id = user_id = item_id = request_id = category = etype = None
    context = _NO_CONTEXT
    items: tuple[str, ...] = ()
    eligible = True
    ts = version = 0
    seen = 0  # the keys read so far (bits of field numbers)
    i = 1
    while True:
        # "key":value, then a comma or the object's end
        e = _str_end(p, i, n)
        if e < 0:
            return None
        f = _field(p, i + 1, e - 1)
        if f < 0 or seen >> f & 1:  # an unknown or a repeated key
            return None
        seen |= 1 << f
        if e >= n or p[e] != ord(":"):
            return None
        i = e + 1
        if f == _F_CONTEXT:
            got = _context_at(p, i, n)
            if got is None:
                return None
            context, i = got
        elif f == _F_ITEMS:
            slate = _slate_at(p, i, n)
            if slate is None:
                return None
            items, i = slate
        elif f == _F_VERSION:
            e = _uint_end(p, i, n)
            if e < 0:
                return None
            version = _digits(p, i, e)
            i = e
        elif f == _F_ELIGIBLE:
            if i + 4 <= n and _same(p, i, i + 4, b"true"):
                i += 4
            elif i + 5 <= n and _same(p, i, i + 5, b"false"):
                eligible = False
                i += 5
            else:
                return None
        elif f in (_F_PROPENSITY, _F_VECTOR):
            return None
        else:  # a string
            e = _str_end(p, i, n)
            if e < 0:
                return None
            a = i + 1
            b = e - 1
            i = e
            if f == _F_TYPE:
                etype = _event_type(p, a, b)
                if etype is None:
                    return None
            elif f == _F_EVENT_TIME:
                ts = _utc_time_at(p, a, b)
                if ts == _NO_TIME:
                    return None
            elif f == _F_REQUEST_ID:
                request_id = p[a:b].decode("ascii")
            elif f == _F_CATEGORY:
                category = p[a:b].decode("ascii")
            else:  # an id: 1.._ID_LEN characters
                if not 0 < b - a <= _ID_LEN:
                    return None
                if f == _F_EVENT_ID:
                    event_id = p[a:b].decode("ascii")
                elif f == _F_USER_ID:
                    user_id = p[a:b].decode("ascii")
                else:
                    item_id = p[a:b].decode("ascii")
        if i >= n:
            return None
        if p[i] == ord(","):
            i += 1
        elif p[i] == ord("}") and i + 1 == n:
            break
        else:
            return None
    if seen & _REQUIRED != _REQUIRED or not 1 <= version <= _MAX_VERSION:
        return None
    if check and ts > ref_us + _FUTURE_US:
        return None
    # the fields each type requires; a slate or an eligibility that another type would ignore is declined
    if etype is _UPSERT:
        if item_id is None or seen >> _F_ITEMS & 1:
            return None
    elif etype is _IMPRESSION:
        if user_id is None or not seen >> _F_ITEMS & 1 or seen >> _F_ELIGIBLE & 1:
            return None
    elif user_id is None or item_id is None or seen >> _F_ITEMS & 1 or seen >> _F_ELIGIBLE & 1:
        return None
    return Event(  # every field, in order
        event_id,  # type: ignore[arg-type]  # required above
        etype,  # type: ignore[arg-type]  # required above
        ts, user_id, item_id, version, context, items, request_id, None, eligible, category, None,
    )  # fmt: skip


def _context_at(p: bytes, i: int, n: int) -> tuple[Context, int] | None:
    """The context object at ``p[i]`` and the position after it, or None (not in the canonical form)."""
    if i + 1 >= n or p[i] != ord("{"):
        return None
    if p[i + 1] == ord("}"):
        return _NO_CONTEXT, i + 2
    surface = session_id = device = position = None
    seen = 0
    i += 1
    while True:
        e = _str_end(p, i, n)
        if e < 0:
            return None
        f = _context_field(p, i + 1, e - 1)
        if f < 0 or seen >> f & 1:
            return None
        seen |= 1 << f
        if e >= n or p[e] != ord(":"):
            return None
        i = e + 1
        if f == _C_POSITION:
            e = _uint_end(p, i, n)
            if e < 0:
                return None
            position = _digits(p, i, e)
        else:
            e = _str_end(p, i, n)
            if e < 0:
                return None
            if f == _C_SESSION_ID:
                session_id = p[i + 1 : e - 1].decode("ascii")
            elif f == _C_SURFACE:
                surface = _few_str(p, i + 1, e - 1)
            else:
                device = _few_str(p, i + 1, e - 1)
        i = e
        if i >= n:
            return None
        if p[i] == ord(","):
            i += 1
        elif p[i] == ord("}"):
            return Context(surface, session_id, device, position), i + 1
        else:
            return None


def _few_str(p: bytes, a: int, b: int) -> str:
    """``p[a:b]`` as a string, for a field of few values (a surface, a device): mostly the one made last time.

    The string made of the same bytes is kept in a slot chosen by the length and the last byte (``_FEW``):
    a comparison of the bytes instead of a new string (~190 instructions each). (Strings are values: a
    shared one is equal to a new one in every use.)
    """
    k = ((b - a) * 8 + p[b - 1]) % _FEW_SLOTS  # (p[b - 1]: the opening quote of an empty string)
    seen = _FEW[k]
    raw = seen[0]
    if _same(p, a, b, raw):
        return seen[1]
    raw = p[a:b]
    s = raw.decode("ascii")
    _FEW[k] = (raw, s)  # (one store: a reader never sees the bytes of one entry with the string of another)
    return s


def _slate_at(p: bytes, i: int, n: int) -> tuple[tuple[str, ...], int] | None:
    """The slate (1.._MAX_SLATE non-empty ids) at ``p[i]`` and the position after it, or None."""
    if i >= n or p[i] != ord("["):
        return None
    out: list[str] = []
    i += 1
    while True:
        e = _str_end(p, i, n)
        if e < 0 or e - i == 2:  # not a string (an empty list's "]" too), or an empty one
            return None
        out.append(p[i + 1 : e - 1].decode("ascii"))
        if len(out) > _MAX_SLATE or e >= n:
            return None
        if p[e] == ord(","):
            i = e + 1
        elif p[e] == ord("]"):
            return tuple(out), e + 1
        else:
            return None


def _printable(p: bytes, n: int) -> bool:
    """Whether ``p[:n]`` is printable ASCII without a backslash: then a string ends at the next quote.

    (One pass without branches, which the C compiler vectorizes, 16 bytes a step with a byte-wide ``bad``:
    outside strings, every byte the scanner accepts is printable ASCII anyway.)
    """
    bad = 0
    for k in range(n):
        c = p[k]
        bad |= (c < 0x20) | (c > 0x7E) | (c == ord("\\"))
    return bad == 0


def _str_end(p: bytes, i: int, n: int) -> int:
    """The position after the string that starts at ``p[i]``, else -1 (``_printable``: it has no escapes)."""
    if i >= n or p[i] != ord('"'):
        return -1
    i += 1
    while i + 4 <= n:  # (four bytes a step: one bounds check for four, ~400 instructions an event less)
        if p[i] == ord('"'):
            return i + 1
        if p[i + 1] == ord('"'):
            return i + 2
        if p[i + 2] == ord('"'):
            return i + 3
        if p[i + 3] == ord('"'):
            return i + 4
        i += 4
    while i < n:
        if p[i] == ord('"'):
            return i + 1
        i += 1
    return -1


def _uint_end(p: bytes, i: int, n: int) -> int:
    """The position after the non-negative JSON integer (1.._MAX_DIGITS digits) at ``p[i]``, else -1.

    (What follows it is the caller's to check: a fraction or an exponent is neither "," nor "}".)
    """
    j = i
    while j < n and ord("0") <= p[j] <= ord("9"):
        j += 1
    if j == i or j - i > _MAX_DIGITS or (p[i] == ord("0") and j - i > 1):  # (JSON has no leading zeros)
        return -1
    return j


def _digits(p: bytes, a: int, b: int) -> int:
    """The value of the decimal digits ``p[a:b]`` (at most ``_MAX_DIGITS``), or -1 if one is not a digit."""
    v = 0
    for k in range(a, b):
        c = p[k] - 48  # 48: ord("0")
        if not 0 <= c <= 9:
            return -1
        v = v * 10 + c
    return v


def _same(p: bytes, a: int, b: int, name: bytes) -> bool:
    """Whether ``p[a:b]`` is ``name`` (compiled: a C string literal, whose length the C compiler knows)."""
    if b - a != len(name):
        return False
    for k in range(b - a):  # noqa: SIM110 (all() over a generator is a closure, which cdef functions cannot hold)
        if p[a + k] != name[k]:
            return False
    return True


def _field(p: bytes, a: int, b: int) -> int:
    """The number of the event's key ``p[a:b]`` (``_F_*``), or -1 for another key."""
    if _same(p, a, b, b"event_id"):
        return _F_EVENT_ID
    if _same(p, a, b, b"type"):
        return _F_TYPE
    if _same(p, a, b, b"user_id"):
        return _F_USER_ID
    if _same(p, a, b, b"event_time"):
        return _F_EVENT_TIME
    if _same(p, a, b, b"schema_version"):
        return _F_VERSION
    if _same(p, a, b, b"context"):
        return _F_CONTEXT
    if _same(p, a, b, b"item_id"):
        return _F_ITEM_ID
    if _same(p, a, b, b"items"):
        return _F_ITEMS
    if _same(p, a, b, b"request_id"):
        return _F_REQUEST_ID
    if _same(p, a, b, b"propensity"):
        return _F_PROPENSITY
    if _same(p, a, b, b"eligible"):
        return _F_ELIGIBLE
    if _same(p, a, b, b"category"):
        return _F_CATEGORY
    if _same(p, a, b, b"vector"):
        return _F_VECTOR
    return -1


def _context_field(p: bytes, a: int, b: int) -> int:
    """The number of the context's key ``p[a:b]`` (``_C_*``), or -1 for another key."""
    if _same(p, a, b, b"surface"):
        return _C_SURFACE
    if _same(p, a, b, b"session_id"):
        return _C_SESSION_ID
    if _same(p, a, b, b"device"):
        return _C_DEVICE
    if _same(p, a, b, b"position"):
        return _C_POSITION
    return -1


def _event_type(p: bytes, a: int, b: int) -> EventType | None:
    """The event type named ``p[a:b]``, or None."""
    if _same(p, a, b, b"view"):
        return _VIEW
    if _same(p, a, b, b"click"):
        return _CLICK
    if _same(p, a, b, b"add_to_cart"):
        return _ADD_TO_CART
    if _same(p, a, b, b"purchase"):
        return _PURCHASE
    if _same(p, a, b, b"impression"):
        return _IMPRESSION
    if _same(p, a, b, b"item_upsert"):
        return _UPSERT
    return None


def decode(data: bytes, ref_us: int | None = None) -> Event:
    """Parse and validate one event. Raises :class:`InvalidEvent` on any problem.

    ``ref_us`` is the reference time of the future check (None skips it). This is the fast
    path; whatever it does not accept outright goes to :func:`decode_strict`.
    """
    if ref_us is None:
        return _decode(data, False, 0)
    # (clamped: see _REF_MAX)
    return _decode(data, True, _REF_MAX if ref_us > _REF_MAX else _REF_MIN if ref_us < _REF_MIN else ref_us)


def decode_at(data: bytes, record_ms: int) -> Event:
    """:func:`decode` with a Kafka record's timestamp (ms since the epoch, ``<= 0``: none) as the reference time.

    The same as ``decode(data, record_ms * 1000 if record_ms > 0 else None)``; the worker calls this for
    every record (compiled, the reference time stays a C integer: no Python integer arithmetic a record).
    """
    if record_ms <= 0:
        return _decode(data, False, 0)
    return _decode(data, True, _REF_MAX if record_ms > _REF_MAX // 1000 else record_ms * 1000)


def _decode(data: bytes, check: bool, ref_us: int) -> Event:
    """:func:`decode`'s fast path; ``ref_us`` (within ``_REF_MIN``..``_REF_MAX``) is checked when ``check``.

    Compiled, the canonical form's scanner first (``_scan``: ~5k instructions an event less than msgspec and
    the checks after it); whatever it declines goes to ``_decode_general``.
    """
    if _COMPILED and type(data) is bytes:
        ev = _scan(data, check, ref_us)
        if ev is not None:
            return ev
    return _decode_general(data, check, ref_us)


def _decode_general(data: bytes, check: bool, ref_us: int) -> Event:
    """``_decode`` through msgspec: whatever it does not accept outright goes to :func:`decode_strict`."""
    if len(data) > _MAX_BYTES:
        return _strict(data, check, ref_us)
    # (the fallbacks are called outside the except blocks: a rejection's error carries no context)
    if not (_isascii(data) if type(data) is bytes else data.isascii()):
        try:  # msgspec skips unknown keys without checking their UTF-8; orjson rejects them
            data.decode()
            utf8 = True
        except UnicodeDecodeError:
            utf8 = False
        if not utf8:
            return _strict(data, check, ref_us)
    try:
        w: _FastEvent | None = _fast_decode(data)
    except (msgspec.MsgspecError, ValueError):  # ValueError: e.g. invalid UTF-8 inside a string
        w = None
    if w is None:
        return _strict(data, check, ref_us)
    # _FastEvent's fields, in order
    (event_id, etype, user_id, event_time, version, c, item_id, raw_items, request_id, raw_p, raw_e, category,
     raw_v) = _astuple(w)  # fmt: skip
    if not 0 < len(event_id) <= _ID_LEN:
        return _strict(data, check, ref_us)
    if user_id is None:
        if etype in _NEEDS_USER:
            return _strict(data, check, ref_us)
    elif not 0 < len(user_id) <= _ID_LEN:
        return _strict(data, check, ref_us)
    if item_id is None:
        if etype in _NEEDS_ITEM:
            return _strict(data, check, ref_us)
    elif not 0 < len(item_id) <= _ID_LEN:
        return _strict(data, check, ref_us)
    ts_us = _utc_time_us(event_time)
    if ts_us is None:
        ts_us = _TIMES.get(event_time)
    if ts_us is None:
        try:
            dt: datetime | None = datetime.fromisoformat(event_time)
        except ValueError:
            dt = None
        if dt is None or dt.tzinfo is None:
            return _strict(data, check, ref_us)
        ts_us = datetime_to_ts(dt)
        if len(_TIMES) >= _TIMES_MAX:
            _TIMES.clear()
        _TIMES[event_time] = ts_us
    ts = ts_us  # (compiled: a C integer; every event time lies in int64)
    if check and ts > ref_us + _FUTURE_US:
        return _strict(data, check, ref_us)
    items: tuple[str, ...] = ()
    propensity = None
    eligible = True
    vector = None
    if etype is _IMPRESSION:
        if raw_items is None or len(raw_items) > _MAX_SLATE:
            return _strict(data, check, ref_us)
        items = raw_items
        propensity = raw_p
    elif etype is _UPSERT:
        eligible = raw_e
        vector = raw_v
    if c is None:
        c = _NO_CONTEXT
    return Event(  # every field, in order (positional: a Struct takes them in one C call)
        event_id, etype, ts_us, user_id, item_id, version, c, items, request_id, propensity, eligible, category, vector
    )


def _strict(data: bytes, check: bool, ref_us: int) -> Event:
    """:func:`decode_strict` with ``_decode``'s reference time."""
    return decode_strict(data, ref_us if check else None)


def format_time(ts_us: int) -> str:
    """Microseconds since the epoch -> the wire's RFC 3339 UTC event time (``...Z``)."""
    return ts_to_datetime(ts_us).isoformat().replace("+00:00", "Z")


def to_dict(event: Event) -> dict[str, Any]:
    """The wire representation of ``event`` as a dict (omits empty optionals)."""
    # keys in the fast decoder's field order (``_FastEvent``): msgspec then finds each at its first try
    out: dict[str, Any] = {"event_id": event.event_id, "type": event.type.value}
    if event.user_id is not None:
        out["user_id"] = event.user_id
    out["event_time"] = format_time(event.ts_us)
    out["schema_version"] = event.schema_version
    ctx = event.context
    if ctx != _NO_CONTEXT:
        out["context"] = {
            k: v
            for k, v in (
                ("surface", ctx.surface),
                ("session_id", ctx.session_id),
                ("device", ctx.device),
                ("position", ctx.position),
            )
            if v is not None
        }
    if event.item_id is not None:
        out["item_id"] = event.item_id
    if event.items:
        out["items"] = list(event.items)
    for name in ("request_id", "propensity", "category"):
        value = getattr(event, name)
        if value is not None:
            out[name] = value
    if event.type is EventType.ITEM_UPSERT:
        out["eligible"] = event.eligible
    if event.vector is not None:
        out["vector"] = list(event.vector)
    return out


def encode(event: Event) -> bytes:
    """Serialize ``event`` to its JSON wire form."""
    return orjson.dumps(to_dict(event))
