"""Asynchronous impression logging: every served slate goes to the ``impressions`` topic.

The request path only appends to an in-process deque (sub-microsecond, and it wakes no
thread); a background thread drains the deque every ``interval_s`` (50 ms, so about one
produce request per round), encodes the impression events and hands them to the Kafka
producer. (Waking the logging thread once per request cost a GIL hand-over per request, and
every produce request costs the broker CPU on the same cores.) If the broker is
down the producer buffers (up to its queue limit) and the API keeps answering; records
that cannot be queued at all are counted as ``dropped`` rather than blocking requests.

The record is a regular ``impression`` event (see :mod:`streams.codec`), keyed by user
and partitioned with murmur2 like every producer of ``events``, so the worker co-partitions
it with the user's events. The extra fields (``positions``, ``scores``, ``sources``,
``versions``) are carried for the learners and audits of later issues; the codec ignores
fields it does not know.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson
from confluent_kafka import KafkaException, Producer

from serving.recommend import Slate
from serving.settings import ServingSettings
from streams.codec import format_time
from streams.core.partition import partition_for
from streams.events import SCHEMA_VERSION

__all__ = ["ImpressionLogger", "impression_event"]

log = logging.getLogger(__name__)


def impression_event(slate: Slate, ts_us: int, surface: str | None) -> dict[str, Any]:
    """The impression event for ``slate`` served at ``ts_us``."""
    event: dict[str, Any] = {
        "event_id": f"imp-{slate.request_id}",
        "type": "impression",
        "user_id": slate.user_id,
        "event_time": format_time(ts_us),
        "schema_version": SCHEMA_VERSION,
        "request_id": slate.request_id,
        "items": [it.item_id for it in slate.items],
        "positions": list(range(len(slate.items))),
        "scores": [round(it.score, 6) for it in slate.items],
        "sources": [it.source for it in slate.items],
        "fallback": slate.fallback,
        "versions": {
            "model": slate.provenance["model_version"],
            "index": slate.provenance["index"]["version"],
            "state_event_watermark_us": slate.provenance["state"]["event_watermark_us"],
        },
    }
    if surface:
        event["context"] = {"surface": surface}
    return event


class ImpressionLogger:
    """Deque + background producer thread for served slates (drained every ``interval_s``)."""

    def __init__(
        self,
        settings: ServingSettings,
        producer: Producer,
        clock: Callable[[], float] = time.time,
        interval_s: float = 0.05,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.interval_s = interval_s
        # deque append/popleft are atomic under the GIL: no lock, and appending wakes nobody
        self._queue: deque[tuple[Slate, int, str | None]] = deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._producer = producer
        self.sent = 0
        self.dropped = 0
        self.failed = 0

    def start(self) -> None:
        """Start the logging thread."""
        self._thread = threading.Thread(target=self._run, name="freshrec-impressions", daemon=True)
        self._thread.start()

    def log(self, slate: Slate, surface: str | None) -> None:
        """Queue ``slate`` for logging (never blocks)."""
        if slate.items:
            self._queue.append((slate, int(self.clock() * 1e6), surface))

    def _delivered(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self.failed += 1

    def _drain(self) -> None:
        producer = self._producer
        topic = self.settings.topics.impressions
        parts = self.settings.partitions
        queue = self._queue
        while queue:
            slate, ts_us, surface = queue.popleft()
            value = orjson.dumps(impression_event(slate, ts_us, surface))
            try:
                producer.produce(
                    topic,
                    value,
                    slate.user_id.encode(),
                    partition=partition_for(slate.user_id, parts),
                    on_delivery=self._delivered,
                )
                self.sent += 1
            except (BufferError, KafkaException) as exc:
                self.dropped += 1
                log.warning("impression not queued (%s); dropped", exc)
        producer.poll(0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._drain()
        self._drain()

    def stop(self, timeout: float = 5.0) -> None:
        """Drain the queue into the producer (the owner flushes the producer)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout)
