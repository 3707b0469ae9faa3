"""Local read replicas of the user and item stores, fed by tailing the changelog topics.

The serving process never calls the worker. One background thread reads every partition
of ``freshrec.user-state.changelog`` and ``freshrec.item-state.changelog`` (``assign``,
no consumer group, so any number of API processes can tail the same topics) and keeps:

* user states as their encoded bytes (decoded per request: one user per request);
* item vectors staged into the HNSW index (coalesced, applied by the index thread);
* compact item features in :class:`~serving.catalog.ItemCatalog`.

"Caught up" never trusts Tansu's high watermark (too low, see docs/ARCHITECTURE.md): the
replica is caught up once its positions passed the high watermarks sampled at start
*and* a fetch came back short (fewer records than asked for), i.e. it reached the tail.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, cast

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from serving.catalog import ItemCatalog
from serving.settings import ServingSettings
from streams.core import serde
from streams.core.state import UserState, Vec

__all__ = ["VectorSink", "LiveState"]

log = logging.getLogger(__name__)

_BATCH = 5000


class VectorSink(Protocol):
    """Where item-vector changes go (the sharded HNSW index)."""

    def upsert(self, item_id: str, vector: Vec) -> None:
        """Stage a new vector for ``item_id``."""

    def remove(self, item_id: str) -> None:
        """Stage the removal of ``item_id``."""


class LiveState:
    """The read side: user bytes, item catalog, index feed, provenance counters."""

    def __init__(
        self,
        settings: ServingSettings,
        catalog: ItemCatalog,
        sink: VectorSink,
        index_watermark: dict[int, int] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.sink = sink
        self.clock = clock
        self.users: dict[str, bytes] = {}
        #: item-changelog offsets already reflected in a loaded index snapshot
        self.index_watermark = dict(index_watermark or {})
        #: next offset per (topic, partition)
        self.positions: dict[tuple[str, int], int] = {}
        #: newest event time seen in any item state (microseconds): every event reaches an item
        self.event_watermark_us = 0
        self.last_record_at: float | None = None
        self.records = 0
        #: item records not staged into the index because the loaded snapshot already had them
        self.snapshot_skipped = 0
        self.broker_ok = False
        self.broker_error: str | None = None
        self.caught_up = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer: Consumer | None = None
        self._start_hw: dict[tuple[str, int], int] = {}

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the tailing thread (returns at once)."""
        self._thread = threading.Thread(target=self._run, name="freshrec-replica", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop tailing and close the consumer."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def user(self, user_id: str) -> UserState | None:
        """The replica's current state of ``user_id``, or None when unknown."""
        blob = self.users.get(user_id)
        return None if blob is None else serde.decode_user(blob)

    def age_s(self) -> float | None:
        """Seconds since the replica last received a changelog record (None: never)."""
        return None if self.last_record_at is None else max(0.0, self.clock() - self.last_record_at)

    # -- the thread ------------------------------------------------------------------------------

    def _error_cb(self, err: KafkaError) -> None:
        if err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):  # noqa: SLF001
            self.broker_ok = False
            self.broker_error = err.str()

    def _make_consumer(self) -> Consumer:
        s = self.settings
        return Consumer(
            {
                "bootstrap.servers": s.bootstrap_servers,
                "group.id": "freshrec-serving-replica",  # required by librdkafka; no group is joined (assign)
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "fetch.wait.max.ms": s.serving.replica_fetch_wait_ms,
                "fetch.min.bytes": s.serving.replica_fetch_min_bytes,
                "fetch.error.backoff.ms": 50,
                "reconnect.backoff.max.ms": 1000,
                "error_cb": self._error_cb,
                "log_level": 3,
            }
        )

    def _assign(self, consumer: Consumer) -> list[TopicPartition]:
        s = self.settings
        tps = []
        for topic in (s.topics.user_changelog, s.topics.item_changelog):
            for p in range(s.partitions):
                tps.append(TopicPartition(topic, p, OFFSET_BEGINNING))
        consumer.assign(tps)
        for tp in tps:
            try:
                _low, high = consumer.get_watermark_offsets(tp, timeout=5.0, cached=False)
            except KafkaException as exc:
                raise ConnectionError(f"cannot read watermarks of {tp.topic}[{tp.partition}]: {exc}") from exc
            self._start_hw[(tp.topic, tp.partition)] = high
        self.broker_ok = True
        return tps

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                consumer = self._make_consumer()
                self._consumer = consumer
                try:
                    self._assign(consumer)
                    self._loop(consumer)
                finally:
                    consumer.close()
            except Exception as exc:  # keep serving the last state; retry the broker
                self.broker_ok = False
                self.broker_error = str(exc)
                log.warning("changelog replica: %s; serving the last state, retrying", exc)
                self._stop.wait(1.0)

    def _check_caught_up(self, short_fetch: bool) -> None:
        if self.caught_up.is_set() or not short_fetch:
            return
        for key, hw in self._start_hw.items():
            if self.positions.get(key, 0) < hw:
                return
        self.caught_up.set()
        log.info("changelog replica caught up: %d users, %d items", len(self.users), len(self.catalog))

    def _loop(self, consumer: Consumer) -> None:
        s = self.settings
        user_topic, item_topic = s.topics.user_changelog, s.topics.item_changelog
        last_probe = time.monotonic()
        while not self._stop.is_set():
            msgs = consumer.consume(_BATCH, 0.05)
            got = 0
            # a popular item changes several times per fetched batch: apply only its last record
            items: dict[bytes, tuple[bytes, int, int]] = {}
            for m in msgs:
                err = m.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:  # noqa: SLF001
                        log.warning("changelog replica: %s", err)
                    continue
                got += 1
                key = m.key()
                topic, partition, offset = cast(str, m.topic()), cast(int, m.partition()), cast(int, m.offset())
                self.positions[(topic, partition)] = offset + 1
                if not key or key[:1] == b"\x00":
                    continue  # meta records (stored offsets)
                value = m.value()
                if value is None:
                    continue
                if topic == user_topic:
                    self.users[key.decode()] = value  # decoded per request, one user at a time
                elif topic == item_topic:
                    items[key] = (value, partition, offset)
            for key, (value, partition, offset) in items.items():
                self._apply_item(key.decode(), value, partition, offset)
            if got:
                self.records += got
                self.last_record_at = self.clock()
                self.broker_ok = True
                self.broker_error = None
            elif time.monotonic() - last_probe > 2.0:
                last_probe = time.monotonic()
                self._probe(consumer)
            self._check_caught_up(got < _BATCH)

    def _probe(self, consumer: Consumer) -> None:
        try:
            consumer.list_topics(self.settings.topics.item_changelog, timeout=1.0)
            self.broker_ok = True
            self.broker_error = None
        except KafkaException as exc:
            self.broker_ok = False
            self.broker_error = str(exc)

    def _apply_item(self, item_id: str, value: bytes, partition: int, offset: int) -> None:
        cat = self.catalog
        row = cat.row(item_id)
        if row >= 0:
            old_eligible = bool(cat.eligible[row])
            old_vector = cat.vectors[row].tobytes()  # compared as bytes: ~4x cheaper than a copy + array_equal
        vector, eligible = cat.update_encoded(item_id, value)
        # most item updates (impressions, clicks without a vector step) leave the vector and the
        # eligibility as they were: only real changes may cost an index update (~1 ms each)
        changed = row < 0 or old_eligible != eligible or vector is None or vector.tobytes() != old_vector
        ts = int(cat.last_ts[row if row >= 0 else cat.row(item_id)])
        if ts > self.event_watermark_us:
            self.event_watermark_us = ts
        if offset < self.index_watermark.get(partition, 0):
            self.snapshot_skipped += 1
            return  # already in the loaded index snapshot
        if not changed:
            return
        if vector is None or not eligible:
            self.sink.remove(item_id)
        else:
            self.sink.upsert(item_id, vector)

    def provenance(self) -> dict[str, Any]:
        """The replica's part of a response's provenance."""
        s = self.settings
        return {
            "event_watermark_us": self.event_watermark_us,
            "user_offsets": {p: self.positions.get((s.topics.user_changelog, p), 0) for p in range(s.partitions)},
            "item_offsets": {p: self.positions.get((s.topics.item_changelog, p), 0) for p in range(s.partitions)},
            "replica_age_s": self.age_s(),
            "broker_connected": self.broker_ok,
            "caught_up": self.caught_up.is_set(),
        }
