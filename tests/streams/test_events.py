"""The event records: immutable values, as the NamedTuples they replaced were (callers rely on that)."""

from __future__ import annotations

import pickle

import pytest

from streams.events import Context, Event, EventType


def _ev(**changes: object) -> Event:
    fields: dict[str, object] = {"event_id": "e1", "type": EventType.CLICK, "ts_us": 5, "user_id": "u1",
                                 "item_id": "i1", "context": Context(surface="home", position=2)}  # fmt: skip
    fields.update(changes)
    return Event(**fields)  # type: ignore[arg-type]


def test_positional_fields_and_defaults() -> None:
    ev = Event("e1", EventType.CLICK, 5, "u1", "i1")
    assert (ev.event_id, ev.type, ev.ts_us, ev.user_id, ev.item_id) == ("e1", EventType.CLICK, 5, "u1", "i1")
    assert (ev.schema_version, ev.context, ev.items, ev.request_id, ev.propensity) == (1, Context(), (), None, None)
    assert (ev.eligible, ev.category, ev.vector) == (True, None, None)
    assert Context() == Context(None, None, None, None)


def test_values_are_immutable_hashable_and_compared_by_value() -> None:
    ev = _ev()
    with pytest.raises(AttributeError):
        ev.user_id = "u2"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        ev.context.surface = "x"  # type: ignore[misc]
    assert ev == _ev() and hash(ev) == hash(_ev()) and len({ev, _ev()}) == 1
    assert ev != _ev(context=Context(surface="home"))
    # ordered field by field, as tuples of the fields are
    assert _ev(event_id="a") < _ev(event_id="b") < _ev(event_id="b", ts_us=6)
    assert Context("a", "z") < Context("b", "a")
    assert pickle.loads(pickle.dumps(ev)) == ev


def test_replace_returns_a_changed_copy() -> None:
    ev = _ev()
    other = ev._replace(event_id="e2", ts_us=9)
    assert (other.event_id, other.ts_us, other.user_id, other.context) == ("e2", 9, "u1", ev.context)
    assert ev == _ev()
    with pytest.raises(TypeError):
        ev._replace(nope=1)


def test_derived_views() -> None:
    assert _ev(ts_us=1_795_341_600_250_000).event_time.isoformat() == "2026-11-22T10:00:00.250000+00:00"
    assert _ev().weight == 1.0 and _ev(type=EventType.IMPRESSION).weight == 0.0
