"""The one event schema of freshrec.

Every event that enters the system is one of :class:`EventType`. Events are
immutable, slotted ``msgspec.Struct`` records (a frozen dataclass costs 5 us to
construct, a NamedTuple 1 us; a Struct is built by one C call, and the decoder
builds the context straight into its :class:`Context`); encoding to and from
bytes lives in :mod:`streams.codec`, never here.

Times are kept as integer microseconds since the Unix epoch (``ts_us``) on the
hot path; :attr:`Event.event_time` gives the tz-aware ``datetime`` view.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec

__all__ = [
    "SCHEMA_VERSION",
    "POSITIVE_WEIGHTS",
    "EventType",
    "Context",
    "Event",
    "ts_to_datetime",
    "datetime_to_ts",
]

#: The schema version this code writes. Readers accept versions <= this.
SCHEMA_VERSION = 1


class EventType(enum.StrEnum):
    """What happened."""

    VIEW = "view"
    CLICK = "click"
    ADD_TO_CART = "add_to_cart"
    PURCHASE = "purchase"
    IMPRESSION = "impression"
    ITEM_UPSERT = "item_upsert"


#: Event types that count as a positive interaction, with their learning weight.
POSITIVE_WEIGHTS: dict[EventType, float] = {
    EventType.VIEW: 0.5,
    EventType.CLICK: 1.0,
    EventType.ADD_TO_CART: 1.5,
    EventType.PURCHASE: 2.0,
}


# frozen: immutable and hashable; order: compared field by field, as tuples are; gc=False: neither
# holds anything that can refer back to it, so the cyclic collector need not track them (the worker
# makes one of each per event)
class Context(msgspec.Struct, frozen=True, order=True, gc=False):
    """Optional request/session context attached to an event."""

    surface: str | None = None
    session_id: str | None = None
    device: str | None = None
    # (the bounds bind decoding only, where they are the codec's: a non-negative position that JSON
    # readers take as an integer, int64)
    position: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] | None = None


_EMPTY_CONTEXT = Context()


class Event(msgspec.Struct, frozen=True, order=True, gc=False):
    """One user or catalog event.

    * ``user_id`` is required for every type except ``item_upsert``.
    * ``item_id`` is required for view/click/add_to_cart/purchase/item_upsert.
    * ``items`` is the served slate for ``impression`` (``item_id`` is unused).
    * ``ts_us`` is the event time in integer microseconds since the epoch (UTC).
    """

    event_id: str
    type: EventType
    ts_us: int
    user_id: str | None = None
    item_id: str | None = None
    schema_version: int = SCHEMA_VERSION
    context: Context = _EMPTY_CONTEXT
    items: tuple[str, ...] = ()
    request_id: str | None = None
    propensity: float | None = None
    eligible: bool = True
    category: str | None = None
    vector: tuple[float, ...] | None = None

    def _replace(self, **changes: Any) -> Event:
        """A copy with ``changes`` applied (the NamedTuple spelling, which callers use)."""
        return msgspec.structs.replace(self, **changes)

    @property
    def event_time(self) -> datetime:
        """The event time as a tz-aware UTC datetime."""
        return ts_to_datetime(self.ts_us)

    @property
    def weight(self) -> float:
        """Learning weight; 0 for events that are not positive interactions."""
        return POSITIVE_WEIGHTS.get(self.type, 0.0)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def ts_to_datetime(ts_us: int) -> datetime:
    """Microseconds since the epoch -> tz-aware UTC datetime."""
    return datetime.fromtimestamp(ts_us // 1_000_000, UTC).replace(microsecond=ts_us % 1_000_000)


def datetime_to_ts(dt: datetime) -> int:
    """Tz-aware datetime -> microseconds since the epoch. Naive datetimes are rejected."""
    tz = dt.tzinfo
    if tz is not UTC and (tz is None or dt.utcoffset() is None):  # UTC (what "Z" parses to) has an offset
        raise ValueError("naive datetime: event times must carry a timezone")
    # exact integer arithmetic; ``dt - _EPOCH`` reads no offset when dt is in UTC too, and the
    # timedelta's fields are cheaper to combine than ``// timedelta(microseconds=1)``
    d = dt - _EPOCH
    return (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds
