"""Live-vs-replay parity: the same log through a real :class:`StreamWorker` and through the replayer.

:func:`check_parity` produces a log to the broker named by ``settings``, runs a
live worker until its own counters say it has consumed everything (never the
high watermark: Tansu's is too low), closes it, replays the same log offline and
compares: per-shard feature checksums, keys, DLQ counts by reason and the DLQ
records themselves (bytes + reason header), duplicates, and vectors within a
:class:`~replay.snapshot.VectorTolerance`.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from replay.readers import LogRecord, ReplayInputError, open_log
from replay.replayer import ReplayResult, replay_records
from replay.snapshot import Snapshot, VectorTolerance, VerifyReport, compare, load_live_snapshot, snapshot_from_result
from streams.codec import MAX_FUTURE_US
from streams.config import Settings
from streams.producer import Record, event_time_of
from streams.store import shard_path

__all__ = ["ParityReport", "check_parity", "event_time_us", "read_dlq", "to_produce_records"]


@dataclass
class ParityReport:
    """What :func:`check_parity` found (``ok`` is the verdict)."""

    verify: VerifyReport
    live_dlq: dict[str, int]
    replay_dlq: dict[str, int]
    live_duplicates: int
    replay_duplicates: int
    records: int
    live_seconds: float
    replay_seconds: float
    live_stats: dict[str, Any] = field(default_factory=dict)
    replay: ReplayResult | None = None
    live_snapshot: Snapshot | None = None
    replay_snapshot: Snapshot | None = None

    #: True when the live DLQ topic holds exactly the replay's (bytes, reason) records (None: not read)
    dlq_records_equal: bool | None = None

    @property
    def ok(self) -> bool:
        """Equal checksums and keys, vectors within tolerance, equal DLQ counts, records and duplicates."""
        return (
            self.verify.ok
            and self.live_dlq == self.replay_dlq
            and self.live_duplicates == self.replay_duplicates
            and self.dlq_records_equal is not False
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary."""
        return {
            "ok": self.ok,
            "records": self.records,
            "live_seconds": round(self.live_seconds, 3),
            "replay_seconds": round(self.replay_seconds, 3),
            "live_dlq": self.live_dlq,
            "replay_dlq": self.replay_dlq,
            "live_duplicates": self.live_duplicates,
            "replay_duplicates": self.replay_duplicates,
            "dlq_records_equal": self.dlq_records_equal,
            "verify": self.verify.to_dict(),
        }


def event_time_us(value: bytes) -> int | None:
    """The ``event_time`` of a raw event in microseconds, or None (for pacing; no validation)."""
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    return event_time_of(obj)


def to_produce_records(records: Iterable[LogRecord]) -> Iterator[Record]:
    """LogRecords as :class:`streams.producer.Record` for ``produce_records``' pacing.

    The pacing time is a log clock: the running maximum of the event times (the record
    time for records without one). An event more than ``codec.MAX_FUTURE_US`` ahead of
    that clock (an outlier such as a year-2099 timestamp, which the worker rejects anyway)
    is paced at the clock instead of stalling the replay for decades.
    """
    clock: int | None = None
    for rec in records:
        ts = event_time_us(rec.value)
        if ts is None:
            ts = rec.ts_us
        if ts is not None:
            if clock is None:
                clock = ts
            elif ts <= clock + MAX_FUTURE_US:
                clock = max(clock, ts)
        yield Record(rec.key, rec.value, clock)


def _run_worker_until_drained(settings: Settings, n_records: int, timeout_s: float) -> tuple[dict[str, Any], float]:
    from streams.worker import StreamWorker

    worker = StreamWorker(settings)
    thread = threading.Thread(target=worker.run, name="parity-worker", daemon=True)
    t0 = time.monotonic()
    thread.start()
    deadline = t0 + timeout_s
    stable_since: float | None = None
    last: tuple[int, int, int] | None = None
    try:
        while True:
            st = worker.stats
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"live worker did not drain the log in {timeout_s:.0f}s: {st.snapshot()}")
            if not thread.is_alive():
                raise RuntimeError(f"live worker stopped early: {st.snapshot()}")
            cur = (st.events, st.forwards, st.item_records)
            # drained: every record consumed by the user stage, every forward consumed by the item stage,
            # and nothing moved for a little while (resent forwards are counted in item_records too)
            if st.events >= n_records and st.item_records >= st.forwards:
                if cur != last:
                    stable_since = now
                elif stable_since is not None and now - stable_since > 0.5:
                    break
            last = cur
            time.sleep(0.05)
    finally:
        worker.stop()
        thread.join(60)
    return worker.stats.snapshot(), time.monotonic() - t0


def read_dlq(settings: Settings, poll_timeout_s: float = 1.0) -> Counter[tuple[bytes, str]]:
    """The live DLQ topic as a multiset of (value bytes, ``reason`` header), read until an empty poll."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer(
        {"bootstrap.servers": settings.bootstrap_servers, "group.id": "freshrec-parity-dlq",
         "enable.auto.commit": False, "log_level": 3}
    )  # fmt: skip
    out: Counter[tuple[bytes, str]] = Counter()
    try:
        consumer.assign([TopicPartition(settings.topics.dlq, 0, OFFSET_BEGINNING)])
        while True:
            msgs = consumer.consume(10_000, poll_timeout_s)
            if not msgs:
                return out
            for m in msgs:
                if m.error() is None:
                    reason = dict(m.headers() or []).get("reason") or b""
                    out[(m.value() or b"", reason.decode() if isinstance(reason, bytes) else str(reason))] += 1
    finally:
        consumer.close()


def check_parity(
    log_path: str | Path,
    settings: Settings,
    fmt: str | None = None,
    tolerance: VectorTolerance | None = None,
    timeout_s: float = 180.0,
    batch_size: int | None = None,
) -> ParityReport:
    """Produce ``log_path`` into ``settings``' broker, drain it with a live worker, replay it, compare.

    ``settings`` names the broker (``bootstrap_servers``), the topics, the partition
    count and a ``data_dir`` that must not hold shards yet (the live state must come
    from this log alone); use fresh topic names per call.
    """
    from streams.broker import ensure_topics
    from streams.producer import make_producer, produce_records

    for p in range(settings.partitions):
        for stage in ("user", "item"):
            if shard_path(settings.data_dir, stage, p).exists():
                raise ReplayInputError(f"{settings.data_dir}: already holds shards; parity needs a fresh data_dir")
    records = list(open_log(log_path, fmt, settings.partitions))
    ensure_topics(settings)
    producer = make_producer(settings.bootstrap_servers)
    # the live record timestamps are the produce times: the future check uses them, so replay must too
    produced_at_us = int(time.time() * 1_000_000)
    produce_records(producer, settings.topics.events, to_produce_records(records))
    live_stats, live_s = _run_worker_until_drained(settings, len(records), timeout_s)
    cfg = settings.model.core()
    result = replay_records(
        records,
        cfg,
        settings.partitions,
        batch_size=batch_size or settings.batch_size,
        topic=settings.topics.events,
        record_ts_us=produced_at_us,
    )
    replay_snap = snapshot_from_result(result, cfg, settings.partitions, source=str(log_path))
    live_snap = load_live_snapshot(settings.store_url, settings.partitions, cfg)
    verify = compare(replay_snap, live_snap, tolerance)
    dlq_equal = read_dlq(settings) == Counter(result.dlq)
    return ParityReport(
        verify=verify,
        live_dlq=dict(live_stats["dlq_reasons"]),
        replay_dlq=result.dlq_counts(),
        live_duplicates=int(live_stats["duplicates"]),
        replay_duplicates=result.duplicates,
        records=len(records),
        live_seconds=live_s,
        replay_seconds=result.seconds,
        live_stats=live_stats,
        replay=result,
        live_snapshot=live_snap,
        replay_snapshot=replay_snap,
        dlq_records_equal=dlq_equal,
    )
