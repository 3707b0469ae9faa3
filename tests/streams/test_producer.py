"""Pacing of ``produce_records`` with a fake clock (no broker)."""

from __future__ import annotations

from collections import Counter

from streams.codec import decode
from streams.events import EventType
from streams.producer import MAX_PACE_JUMP_US, Record, produce_records, slate_sessions

S = 1_000_000


class FakeProducer:
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.sent_at: list[float] = []

    def produce(self, topic: str, value: bytes, key: bytes | None) -> None:
        self.sent_at.append(self.clock.now)

    def poll(self, timeout: float) -> int:
        return 0

    def flush(self, timeout: float) -> int:
        return 0


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _run(ts: list[int], speed: float) -> list[float]:
    clock = FakeClock()
    producer = FakeProducer(clock)
    records = iter([Record(b"k", b"v", t) for t in ts])
    assert produce_records(producer, "events", records, speed=speed, clock=clock, sleep=clock.sleep) == len(ts)
    return [t - 100.0 for t in producer.sent_at]


def test_speed_replays_event_time_n_times_faster() -> None:
    sent = _run([0, 60 * S, 120 * S], speed=60)
    assert sent == [0.0, 1.0, 2.0]  # a minute of event time per second


def test_out_of_order_records_never_wait_and_outliers_cost_at_most_an_hour() -> None:
    far = 80 * 365 * 24 * 3600 * S  # decades ahead
    sent = _run([0, 60 * S, 30 * S, far, far + 60 * S], speed=60)
    assert sent[:3] == [0.0, 1.0, 1.0]  # 30 s is behind the schedule: sent at once
    assert sent[3] == 1.0 + MAX_PACE_JUMP_US / S / 60  # the outlier's jump is capped at one hour
    assert sent[4] == sent[3] + 1.0


def test_slate_sessions_click_only_what_was_shown() -> None:
    """The demo's stream: every record is a valid event; a click names an item of an earlier slate shown to
    the same user with the same request id and its position there, so no item has more clicks than
    impressions; seeded, so two runs are equal."""
    records = list(slate_sessions(3_000, users=50, items=200, seed=7, start_us=1_790_000_000_000_000))
    assert len(records) == 3_000
    assert records == list(slate_sessions(3_000, users=50, items=200, seed=7, start_us=1_790_000_000_000_000))
    shown: dict[str, tuple[str, tuple[str, ...]]] = {}  # request id -> (user, slate)
    impressions: Counter[str] = Counter()
    clicks: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    times = []
    for rec in records:
        ev = decode(rec.value)
        kinds[ev.type.value] += 1
        times.append(ev.ts_us)
        assert rec.key == (ev.user_id or "").encode() and ev.request_id is not None
        if ev.type is EventType.IMPRESSION:
            assert len(set(ev.items)) == len(ev.items) == 5
            shown[ev.request_id] = (ev.user_id or "", ev.items)
            impressions.update(ev.items)
            continue
        user, slate = shown[ev.request_id]  # (a KeyError: an action on a slate never shown)
        assert ev.user_id == user and ev.item_id in slate
        if ev.type is EventType.CLICK:
            assert ev.context.position is not None and slate[ev.context.position] == ev.item_id
            clicks[ev.item_id or ""] += 1
    assert times == sorted(times)
    assert all(clicks[i] <= impressions[i] for i in clicks)
    assert set(kinds) == {"impression", "click", "view", "add_to_cart", "purchase"}
    # ~0.3 clicks a slate of 5: a CTR near 6% overall, far from 1
    assert 0.03 < sum(clicks.values()) / sum(impressions.values()) < 0.09
