"""Codec: round trips (property-based) and one test per rejection reason."""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams import codec
from streams.errors import InvalidEvent
from streams.events import Context, Event, EventType, datetime_to_ts

ids = st.text(min_size=1, max_size=40)
ts = st.integers(min_value=0, max_value=4_000_000_000_000_000)
opt = st.none() | st.text(max_size=20)


@st.composite
def events(draw: st.DrawFn) -> Event:
    etype = draw(st.sampled_from(list(EventType)))
    ctx = Context(draw(opt), draw(opt), draw(opt), draw(st.none() | st.integers(0, 10_000)))
    common = {"event_id": draw(ids), "type": etype, "ts_us": draw(ts), "context": ctx}
    if etype is EventType.IMPRESSION:
        return Event(**common, user_id=draw(ids), items=tuple(draw(st.lists(ids, min_size=1, max_size=5))),
                     request_id=draw(opt), propensity=draw(st.none() | st.floats(0.001, 1.0)))  # fmt: skip
    if etype is EventType.ITEM_UPSERT:
        vec = draw(st.none() | st.lists(st.floats(-10, 10, width=32), min_size=1, max_size=8).map(tuple))
        return Event(**common, item_id=draw(ids), eligible=draw(st.booleans()), category=draw(opt), vector=vec)
    return Event(**common, user_id=draw(ids), item_id=draw(ids))


@given(events())
def test_round_trip(ev: Event) -> None:
    assert codec.decode(codec.encode(ev)) == ev


@given(events())
def test_event_time_is_tz_aware(ev: Event) -> None:
    assert ev.event_time.tzinfo is not None
    assert codec.decode(codec.encode(ev)).event_time == ev.event_time


GOOD = {"event_id": "e1", "type": "click", "user_id": "u1", "item_id": "i1",
        "event_time": "2026-11-22T10:00:00Z", "schema_version": 1}  # fmt: skip


def _reason(raw: bytes, ref_us: int | None = None) -> str:
    with pytest.raises(InvalidEvent) as info:
        codec.decode(raw, ref_us)
    return info.value.reason


def test_good_event_decodes() -> None:
    ev = codec.decode(orjson.dumps(GOOD))
    assert (ev.type, ev.user_id, ev.item_id) == (EventType.CLICK, "u1", "i1")
    assert ev.ts_us == 1_795_341_600_000_000  # 2026-11-22T10:00:00Z, by hand: 20779 days * 86400 + 36000 s


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "bad_json"),
        (b"[1, 2]", "not_an_object"),
        (orjson.dumps({k: v for k, v in GOOD.items() if k != "user_id"}), "missing_field"),
        (orjson.dumps({k: v for k, v in GOOD.items() if k != "event_time"}), "missing_field"),
        (orjson.dumps({k: v for k, v in GOOD.items() if k != "schema_version"}), "missing_field"),
        (orjson.dumps({**GOOD, "user_id": 42}), "wrong_type"),
        (orjson.dumps({**GOOD, "event_time": 1700000000}), "wrong_type"),
        (orjson.dumps({**GOOD, "type": "teleport"}), "unknown_type"),
        (orjson.dumps({**GOOD, "event_time": "yesterday"}), "bad_timestamp"),
        (orjson.dumps({**GOOD, "event_time": "2026-11-22T10:00:00"}), "bad_timestamp"),
        (orjson.dumps({**GOOD, "schema_version": 99}), "unsupported_schema_version"),
        (orjson.dumps({**GOOD, "user_id": ""}), "bad_value"),
        (orjson.dumps({**GOOD, "type": "impression", "items": []}), "bad_value"),
        (orjson.dumps({**GOOD, "context": {"position": -1}}), "wrong_type"),
        (b'{"pad": "' + b"x" * codec.MAX_EVENT_BYTES + b'"}', "oversized"),
    ],
)
def test_rejections_have_machine_readable_reasons(raw: bytes, reason: str) -> None:
    assert _reason(raw) == reason
    assert reason in codec.REASONS


def test_future_timestamp_is_relative_to_the_record_time() -> None:
    raw = orjson.dumps(GOOD)
    event_us = 1_795_341_600_000_000
    assert _reason(raw, ref_us=event_us - codec.MAX_FUTURE_US - 1) == "future_timestamp"
    assert codec.decode(raw, ref_us=event_us - codec.MAX_FUTURE_US).user_id == "u1"


_EVENT_US = 1_795_341_600_000_000  # GOOD's event time
#: record timestamps (ms) around GOOD's future limit, and at and beyond the ends of int64 (the ms -> us product
#: of the largest ones is past int64: decode_at's C arithmetic clamps it)
_record_ms = (
    st.integers(-(2**63), 2**63 - 1)
    | st.sampled_from([0, -1, 1, 2**63 - 1, 2**62, (2**63 - 1) // 1000, (2**63 - 1) // 1000 + 1])
    | st.integers(-3, 3).map(lambda d: (_EVENT_US - codec.MAX_FUTURE_US) // 1000 + d)
)


@given(record_ms=_record_ms, event_time=st.sampled_from([None, "2026-11-22T10:00:00.999Z", "9999-12-31T23:59:59Z"]))
def test_decode_at_is_decode_with_the_record_time_in_microseconds(record_ms: int, event_time: str | None) -> None:
    raw = orjson.dumps(GOOD if event_time is None else {**GOOD, "event_time": event_time})
    ref_us = record_ms * 1000 if record_ms > 0 else None
    expected = _outcome(codec.decode_strict, raw, ref_us)
    assert _outcome(codec.decode_at, raw, record_ms) == expected
    assert _outcome(codec.decode, raw, ref_us) == expected


@given(ref_us=st.integers(-(2**70), 2**70) | st.sampled_from([-(2**63) - 1, -(2**63), 2**63 - 1, 2**63]))
def test_decode_takes_reference_times_beyond_int64(ref_us: int) -> None:
    # (the fast path compares C integers: a reference time outside int64 acts as its nearest bound, which
    # every event time (int64) compares with in the same way)
    for event_time in ("2026-11-22T10:00:00Z", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z"):
        raw = orjson.dumps({**GOOD, "event_time": event_time})
        assert _outcome(codec.decode, raw, ref_us) == _outcome(codec.decode_strict, raw, ref_us)


def test_decoded_slates_and_vectors_are_tuples() -> None:
    imp = codec.decode(orjson.dumps({**GOOD, "type": "impression", "items": ["a", "b"]}))
    up = codec.decode(orjson.dumps({**GOOD, "type": "item_upsert", "vector": [1, 2.5]}))
    assert type(imp.items) is tuple and imp.items == ("a", "b")
    assert type(up.vector) is tuple and up.vector == (1.0, 2.5)


# -- the fast path agrees with the strict decoder on arbitrary input -------------------------

_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=300)
)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_times = st.sampled_from(
    ["2026-11-22T10:00:00Z", "2026-11-22T10:00:00.250+02:00", "2026-11-22T10:00:00", "2026-11-22",
     "2026-13-01T00:00:00Z", "2030-01-01T00:00:00Z", "20261122T100000Z", "x"]
)  # fmt: skip
_FIELDS = {
    "event_id": ids | _json_values,
    "type": st.sampled_from([t.value for t in EventType]) | _json_values,
    "event_time": _times | _json_values,
    "schema_version": st.sampled_from([1, 2, 0, 1.0, True]) | _json_values,
    "user_id": ids | _json_values,
    "item_id": ids | st.just("x" * 257) | _json_values,
    "items": st.lists(ids, max_size=3) | _json_values,
    "propensity": st.floats(-1, 2) | _json_values,
    "eligible": st.booleans() | _json_values,
    "vector": st.lists(st.floats(-1e3, 1e3) | st.integers(-(2**65), 2**65), max_size=4) | _json_values,
    "category": opt | _json_values,
    "request_id": opt | _json_values,
    "context": st.fixed_dictionaries(
        {}, optional={"surface": opt | _json_values, "position": st.integers(-2, 2**65) | _json_values}
    )
    | _json_values,
}


@st.composite
def raw_objects(draw: st.DrawFn) -> bytes:
    obj: dict[str, object] = {}
    for name, strategy in _FIELDS.items():
        if draw(st.integers(0, 9)) < 8:  # mostly present, sometimes missing
            obj[name] = draw(strategy)
    return json.dumps(obj).encode()  # the stdlib writes integers of any size


def _outcome(fn: object, raw: bytes, ref_us: int | None) -> object:
    try:
        return fn(raw, ref_us)  # type: ignore[operator]
    except InvalidEvent as exc:
        return exc.reason, exc.detail  # what the DLQ record carries


@given(raw_objects(), st.none() | st.just(1_795_000_000_000_000))
def test_fast_decoder_agrees_with_strict_decoder(raw: bytes, ref_us: int | None) -> None:
    assert _outcome(codec.decode, raw, ref_us) == _outcome(codec.decode_strict, raw, ref_us)


@given(events(), st.data())
def test_fast_decoder_agrees_on_corrupted_events(ev: Event, data: st.DataObject) -> None:
    raw = bytearray(codec.encode(ev))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    assert _outcome(codec.decode, bytes(raw), None) == _outcome(codec.decode_strict, bytes(raw), None)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"event_id":"e","type":"view","user_id":"u","item_id":"i","event_time":"2026-11-22T10:00:00Z",'
        b'"schema_version":1,"context":{"position":18446744073709551616}}',  # orjson: a float
        b'{"event_id":"e","type":"view","user_id":"u","item_id":"i","event_time":"2026-11-22T10:00:00Z",'
        b'"schema_version":1,"items":[1]}',  # malformed, but ignored for a view
        *(
            b'{"event_id":"e","type":"view","user_id":"u","item_id":"i","event_time":"2026-11-22T10:00:00Z",'
            b'"schema_version":1,"context":' + ctx + b"}"
            for ctx in (
                b'{"position":-1}',
                b'{"position":9223372036854775807}',
                b'{"position":9223372036854775808}',
                b'{"position":true}',
                b'{"position":1.0}',
                b'{"position":"3"}',
                b"null",
                b"[]",
                b'{"surface":1}',
                b'{"device":null,"position":null,"x":[1]}',
            )
        ),
    ],
)
def test_fast_decoder_edge_cases(raw: bytes) -> None:
    assert _outcome(codec.decode, raw, None) == _outcome(codec.decode_strict, raw, None)


@pytest.mark.parametrize("field", ["event_id", "user_id", "item_id"])
@pytest.mark.parametrize("value", ["", "x", "x" * 256, "x" * 257, "\U0001f600" * 256, "\U0001f600" * 257, None, 7])
def test_fast_decoder_checks_id_lengths_as_the_strict_decoder(field: str, value: object) -> None:
    # (the fast path checks the ids' lengths itself, in code points as from_dict does)
    raw = orjson.dumps({**GOOD, field: value})
    assert _outcome(codec.decode, raw, None) == _outcome(codec.decode_strict, raw, None)
    if value == "x" * 256:
        assert getattr(codec.decode(raw), field) == value


def test_fast_path_unpacks_the_struct_in_field_order() -> None:
    # decode unpacks msgspec.structs.astuple(...) positionally, and builds the Event positionally
    assert codec._FastEvent.__struct_fields__ == (
        "event_id", "type", "user_id", "event_time", "schema_version", "context", "item_id", "items",
        "request_id", "propensity", "eligible", "category", "vector",
    )  # fmt: skip
    assert Event.__struct_fields__ == (
        "event_id", "type", "ts_us", "user_id", "item_id", "schema_version", "context", "items", "request_id",
        "propensity", "eligible", "category", "vector",
    )  # fmt: skip


_canonical_times = st.builds(
    lambda y, mo, d, h, mi, s, frac: f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{s:02d}{frac}Z",
    st.integers(0, 9999), st.integers(0, 13), st.integers(0, 32), st.integers(0, 25), st.integers(0, 61),
    st.integers(0, 61), st.sampled_from(["", ".000", ".250", ".999", ".000000", ".000001", ".123456", ".5", ".1234",
                                          ".1234567", "."]),
)  # fmt: skip


_CANONICAL = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3}|\.\d{6})?Z", re.ASCII)


@pytest.mark.parametrize("parse", [codec._utc_time_us, codec._utc_time_scan, codec._utc_time_memo])
@given(text=_canonical_times | _times | st.text(max_size=30))
def test_utc_time_fast_path_agrees_with_fromisoformat(parse: Any, text: str) -> None:
    # both builds' implementations (the compiled one's loop and plain Python's memo), whichever runs
    codec.clear_caches()
    for _ in range(2):  # cold, then from the memo of whole seconds
        got = parse(text)
        try:
            dt: datetime | None = datetime.fromisoformat(text)
        except ValueError:
            dt = None
        if got is None:  # only the canonical form is taken, and all of it that is valid
            assert dt is None or _CANONICAL.fullmatch(text) is None
        else:
            assert dt is not None and dt.tzinfo is not None and got == datetime_to_ts(dt)


@pytest.mark.parametrize("parse", [codec._utc_time_us, codec._utc_time_scan, codec._utc_time_memo])
def test_utc_time_fast_path_takes_the_canonical_forms(parse: Any) -> None:
    base = 1_795_341_600_000_000  # 2026-11-22T10:00:00Z
    assert parse("2026-11-22T10:00:00Z") == base
    assert parse("2026-11-22T10:00:00.250Z") == base + 250_000
    assert parse("2026-11-22T10:00:00.000007Z") == base + 7
    assert parse("2024-02-29T23:59:59.999999Z") == 1_709_251_199_999_999  # the last microsecond of a leap day
    assert parse("0001-01-01T00:00:00Z") == -62_135_596_800_000_000  # datetime.min (719,162 days before 1970)
    for other in ("2026-11-22T10:00:00+00:00", "2026-11-22 10:00:00Z", "2026-11-22T10:00:00.5Z",
                  "2026-11-22T10:00:00.\u0661\u0662\u0663Z", "2026-13-22T10:00:00Z", "2025-02-29T00:00:00Z",
                  "0000-01-01T00:00:00Z", "2026-11-22T24:00:00Z", "2026-11-22T10:00:60Z"):  # fmt: skip
        assert parse(other) is None
    # the other forms are parsed in full
    assert codec.decode(orjson.dumps({**GOOD, "event_time": "2026-11-22T10:00:00.5Z"})).ts_us == base + 500_000
    assert codec.decode(orjson.dumps({**GOOD, "event_time": "2026-11-22T12:00:00+02:00"})).ts_us == base


# -- the canonical form's scanner (the compiled build's first try) ----------------------------
# codec._scan either declines (None: the general path decides) or gives exactly the event that the general
# path (msgspec, then from_dict) and the strict decoder give. It runs here in whichever build is loaded.


def _scanned(raw: bytes, ref_us: int | None = None) -> Event | None:
    """What the scanner gives for ``raw``, after checking it against the general path and the strict decoder."""
    check = ref_us is not None
    got = codec._scan(raw, check, ref_us if ref_us is not None else 0)
    if got is not None:  # (repr: an int where a float or bool belongs, or a str for an EventType, would differ)
        general = codec._decode_general(raw, check, ref_us or 0)
        assert repr(got) == repr(general) == repr(codec.decode_strict(raw, ref_us))
    assert _outcome(codec.decode, raw, ref_us) == _outcome(codec.decode_strict, raw, ref_us)
    return got


#: strings in the canonical form: printable ASCII without quotes or backslashes (which JSON would escape)
_plain = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters='"\\'), max_size=20)
_plain_ids = _plain.filter(bool)


@st.composite
def canonical_events(draw: st.DrawFn) -> Event:
    """Events that ``encode`` writes in the canonical form: the scanner must take each of them."""
    etype = draw(st.sampled_from(list(EventType)))
    popt = st.none() | _plain
    ctx = Context(draw(popt), draw(popt), draw(popt), draw(st.none() | st.integers(0, 10**18 - 1)))
    common = {"event_id": draw(_plain_ids), "type": etype, "ts_us": draw(ts), "context": ctx,
              "request_id": draw(popt), "category": draw(popt)}  # fmt: skip
    if etype is EventType.IMPRESSION:
        return Event(**common, user_id=draw(_plain_ids), item_id=draw(st.none() | _plain_ids),
                     items=tuple(draw(st.lists(_plain_ids, min_size=1, max_size=5))))  # fmt: skip
    if etype is EventType.ITEM_UPSERT:
        return Event(**common, user_id=draw(st.none() | _plain_ids), item_id=draw(_plain_ids),
                     eligible=draw(st.booleans()))  # fmt: skip
    return Event(**common, user_id=draw(_plain_ids), item_id=draw(_plain_ids))


@given(canonical_events())
def test_scanner_takes_the_canonical_form(ev: Event) -> None:
    raw = codec.encode(ev)
    assert _scanned(raw) == ev
    assert _scanned(raw, ev.ts_us - codec.MAX_FUTURE_US) == ev  # at the future limit
    assert _scanned(raw, ev.ts_us - codec.MAX_FUTURE_US - 1) is None  # past it: the general path names the reason


def test_scanner_takes_what_the_producers_write() -> None:
    from streams.producer import synthetic_events

    records = list(synthetic_events(300, 50, 20, seed=4, bad_every=50))
    taken = [_scanned(rec.value) for rec in records]
    assert sum(ev is None for ev in taken) == 6  # the malformed ones (every 50th)
    movielens = orjson.dumps({"event_id": "ml-1-2-3", "type": "click", "user_id": "1",
                              "event_time": "2001-01-01T00:00:03Z", "schema_version": 1, "item_id": "2"})  # fmt: skip
    assert _scanned(movielens) is not None


@given(events())
def test_scanner_agrees_on_any_encoded_event(ev: Event) -> None:
    # (unicode, propensities and vectors are declined: the general path decodes them)
    got = _scanned(codec.encode(ev))
    assert got is None or got == ev


@given(canonical_events(), st.data())
def test_scanner_agrees_on_corrupted_events(ev: Event, data: st.DataObject) -> None:
    raw = bytearray(codec.encode(ev))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(raw) - 1))
        edit = data.draw(st.sampled_from(["set", "delete", "insert"]))
        byte = data.draw(st.sampled_from(b'{}[]:,"\\ 0179.e-tfnul\x00\x1f\x7f\x80\xff') | st.integers(0, 255))
        if edit == "set":
            raw[i] = byte
        elif edit == "delete":
            del raw[i]
        else:
            raw.insert(i, byte)
    _scanned(bytes(raw))


_junk = _json_values | st.dictionaries(st.text(max_size=4), _json_values, max_size=3)


@given(canonical_events(), st.data())
def test_scanner_agrees_on_other_spellings(ev: Event, data: st.DataObject) -> None:
    # the same event (or a near one) as other valid JSON: whitespace, escapes, other key orders, duplicate and
    # unknown keys, nulls, numbers written as floats or beyond int64, values of other types
    obj = codec.to_dict(ev)
    items = list(obj.items())
    if data.draw(st.booleans()):
        items = data.draw(st.permutations(items))
    for _ in range(data.draw(st.integers(0, 2))):
        key = data.draw(st.sampled_from([*obj, "context", "items", "propensity", "vector", "eligible", "x"]))
        value = data.draw(
            st.sampled_from([None, 1, 0, -1, 1.0, 2**63, 10**18, 10**19, True, "", "x", [], {}, ["a"], 0.5])
            | st.sampled_from(list(obj.values()))
            | _junk
        )
        if key == "context" and data.draw(st.booleans()):
            value = {**obj.get("context", {}), data.draw(st.sampled_from(["surface", "position", "device"])): value}
        items.insert(data.draw(st.integers(0, len(items))), (key, value))  # (a duplicate key where it exists)
    sep = data.draw(st.sampled_from([(",", ":"), (", ", ": "), (",", " :"), ("\n,", ":\t")]))
    ascii_only = data.draw(st.booleans())  # (True: non-ASCII written as \u escapes)
    body = sep[0].join(json.dumps(k, ensure_ascii=ascii_only) + sep[1] + json.dumps(v, ensure_ascii=ascii_only)
                       for k, v in items)  # fmt: skip
    raw = ("{" + body + "}").encode()
    if data.draw(st.booleans()):
        raw = data.draw(st.sampled_from([b" ", b"\n", b""])) + raw + data.draw(st.sampled_from([b" ", b"\n", b"x"]))
    _scanned(raw, data.draw(st.none() | st.just(ev.ts_us) | st.just(ev.ts_us - codec.MAX_FUTURE_US - 1)))


@given(raw_objects(), st.none() | st.just(1_795_000_000_000_000))
def test_scanner_agrees_on_arbitrary_objects(raw: bytes, ref_us: int | None) -> None:
    _scanned(raw, ref_us)
    _scanned(raw.replace(b", ", b",").replace(b": ", b":"), ref_us)  # (json.dumps's spaces: the scanner declines them)


_CANONICAL_CLICK = (b'{"event_id":"e","type":"click","user_id":"u","event_time":"2026-11-22T10:00:00Z",'
                    b'"schema_version":1,"item_id":"i"}')  # fmt: skip


@pytest.mark.parametrize(
    ("raw", "taken"),
    [
        (_CANONICAL_CLICK, True),
        (_CANONICAL_CLICK.replace(b'"i"}', b'"i","context":{}}'), True),
        (_CANONICAL_CLICK.replace(b'"i"}', b'"i","context":{"position":0}}'), True),
        (_CANONICAL_CLICK.replace(b'"i"}', b'"i","context":{"position":999999999999999999}}'), True),
        (_CANONICAL_CLICK.replace(b'"i"}', b'"i","context":{"position":9223372036854775807}}'), False),  # 19 digits
        (_CANONICAL_CLICK.replace(b'"i"}', b'"i","context":{"position":9223372036854775808}}'), False),
        (_CANONICAL_CLICK.replace(b'"i"}', b'"i","context":{"position":01}}'), False),
        (_CANONICAL_CLICK.replace(b'"i"}', b'"i","context":{"position":1.0}}'), False),
        (_CANONICAL_CLICK.replace(b'"i"}', b'"i","context":{"position":1e2}}'), False),
        (_CANONICAL_CLICK.replace(b'"i"}', b'"i","context":{"position":-1}}'), False),
        (_CANONICAL_CLICK.replace(b'"i"}', b'"i","context":{"device":"a","device":"b"}}'), False),
        (_CANONICAL_CLICK.replace(b'"i"}', b'"i","context":{"device":null}}'), False),
        (_CANONICAL_CLICK.replace(b'"i"}', b'"i","context":{"x":"y"}}'), False),
        (_CANONICAL_CLICK.replace(b'"i"}', b'"i","context":{}'), False),
        (_CANONICAL_CLICK.replace(b'"i"}', b'"i","propensity":0.5}'), False),
        (_CANONICAL_CLICK.replace(b'"i"}', b'"i","items":["a"]}'), False),  # ignored for a click: declined
        (_CANONICAL_CLICK.replace(b'"i"}', b'"i","eligible":true}'), False),
        (_CANONICAL_CLICK.replace(b'"i"}', b'"i","request_id":""}'), True),
        (_CANONICAL_CLICK.replace(b'"i"}', b'"i","item_id":"j"}'), False),  # a duplicate key
        (_CANONICAL_CLICK.replace(b'"i"}', b'"i","x":1}'), False),
        (_CANONICAL_CLICK.replace(b'"user_id":"u"', b'"user_id":"' + b"u" * 256 + b'"'), True),
        (_CANONICAL_CLICK.replace(b'"user_id":"u"', b'"user_id":"' + b"u" * 257 + b'"'), False),
        (_CANONICAL_CLICK.replace(b'"user_id":"u"', b'"user_id":""'), False),
        (_CANONICAL_CLICK.replace(b'"user_id":"u"', b'"user_id":"\\u0075"'), False),
        (_CANONICAL_CLICK.replace(b'"user_id":"u"', b'"user_id":"\xc3\xa9"'), False),
        (_CANONICAL_CLICK.replace(b'"user_id":"u"', b'"user_id":"\x7f"'), False),
        (_CANONICAL_CLICK.replace(b'"user_id":"u",', b""), False),
        (_CANONICAL_CLICK.replace(b'"schema_version":1', b'"schema_version":2'), False),
        (_CANONICAL_CLICK.replace(b'"schema_version":1', b'"schema_version":true'), False),
        (_CANONICAL_CLICK.replace(b"10:00:00Z", b"10:00:00.5Z"), False),  # valid, not canonical
        (_CANONICAL_CLICK.replace(b"10:00:00Z", b"10:00:00.123Z"), True),
        (_CANONICAL_CLICK.replace(b"10:00:00Z", b"10:00:00.123456Z"), True),
        (_CANONICAL_CLICK.replace(b"2026-11-22", b"2026-02-29"), False),
        (_CANONICAL_CLICK.replace(b'"click"', b'"clicks"'), False),
        (_CANONICAL_CLICK.replace(b'"click"', b'"impression"'), False),  # no slate
        (_CANONICAL_CLICK.replace(b'"click"', b'"item_upsert"'), True),
        (_CANONICAL_CLICK + b" ", False),
        (b" " + _CANONICAL_CLICK, False),
        (_CANONICAL_CLICK[:-1] + b",}", False),
        (b"{}", False),
        (b"{", False),
        (b"", False),
    ],
)
def test_scanner_edge_cases(raw: bytes, taken: bool) -> None:
    assert (_scanned(raw) is not None) is taken
    assert (_scanned(raw, 0) is not None) is False  # (2026 is past the future limit of 1970)
    for i in range(len(raw)):  # every prefix (of a taken one: declined), handled alike by the other paths
        assert _scanned(raw[:i]) is None or not taken


@pytest.mark.parametrize(
    ("slate", "taken"),
    [(b'["a"]', True), (b'["a","b"]', True), (b"[]", False), (b'[""]', False), (b'["a",""]', False),
     (b'["a",]', False), (b'["a" ]', False), (b'["a",1]', False), (b'["a"', False),
     (b"[" + b'"x",' * 999 + b'"y"]', True), (b"[" + b'"x",' * 1000 + b'"y"]', False)],
)  # fmt: skip
def test_scanner_reads_slates_as_the_general_path(slate: bytes, taken: bool) -> None:
    raw = (b'{"event_id":"e","type":"impression","user_id":"u","event_time":"2026-11-22T10:00:00Z",'
           b'"schema_version":1,"items":' + slate + b"}")  # fmt: skip
    got = _scanned(raw)
    assert (got is not None) is taken
    assert got is None or type(got.items) is tuple


@pytest.mark.parametrize("parse", [codec._utc_time_us, codec._utc_time_scan])
def test_utc_time_scan_declines_non_ascii(parse: Any) -> None:
    assert parse("2026-11-22T10:00:0\u0661Z") is None
    assert parse("2026-11-22T10:00:00.\u0661\u0662\u0663Z") is None


def test_scanner_context_strings_in_one_memo_slot_stay_apart() -> None:
    # (surfaces and devices are kept by length and last byte: "home" and "hume" share a slot, "" has its own)
    codec.clear_caches()
    pairs = [("home", "ios"), ("hume", "ios"), ("home", "iOs"), ("", "ios"), ("home", ""), ("hume", "x")]
    for surface, device in pairs:
        ev = Event("e", EventType.CLICK, 5, "u", "i", context=Context(surface, "s", device))
        assert _scanned(codec.encode(ev)) == ev
