"""Pacing of ``produce_records`` with a fake clock (no broker)."""

from __future__ import annotations

from streams.producer import MAX_PACE_JUMP_US, Record, produce_records

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
