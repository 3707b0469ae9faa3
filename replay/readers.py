"""Log readers: JSONL, Parquet, MovieLens ratings and Kafka offset ranges as :class:`LogRecord` streams.

Every reader yields the records the live worker would have consumed, *before*
validation: a malformed line is still a record (it must reach the DLQ in replay
exactly as it does live). What a reader rejects with :class:`ReplayInputError` is
input it cannot read at all: a missing file, a CSV with the wrong header, a
non-integer MovieLens timestamp, a corrupt Parquet file, an unknown URL scheme.

Partitions of file logs follow the live producer: the key is the event's
``user_id`` (``item_id`` for ``item_upsert``) and the partition is Kafka's murmur2
(:func:`streams.core.partition.partition_for`). Keyless records (lines that are
not a JSON object with an id) go to partition 0: they can only end in the DLQ, so
their partition changes no state. Offsets count the records of each partition in
log order, like the offsets the broker assigns when the log is produced by one
producer. File records carry no Kafka record timestamp (``ts_us`` is None).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlparse

import orjson

from streams.core.partition import partition_for
from streams.errors import FreshrecError

__all__ = [
    "FORMATS",
    "LogRecord",
    "ReplayInputError",
    "KafkaRange",
    "guess_format",
    "open_log",
    "read_jsonl_log",
    "read_parquet_log",
    "read_movielens_log",
    "read_kafka_log",
    "parse_kafka_url",
]

#: The log formats :func:`open_log` understands.
FORMATS = ("jsonl", "parquet", "movielens", "kafka")


class ReplayInputError(FreshrecError):
    """A replay input could not be read (names the file, line or URL at fault)."""


class LogRecord(NamedTuple):
    """One record of an event log, as the live worker would consume it."""

    #: the Kafka key (user id; item id for ``item_upsert``), or None
    key: bytes | None
    #: the raw event bytes, unvalidated
    value: bytes
    #: the Kafka record timestamp in microseconds (None for file logs)
    ts_us: int | None
    partition: int
    offset: int


def _key_of(obj: Any) -> bytes | None:
    # mirrors streams.producer: key = user_id, or item_id for keyless (item_upsert) events; but
    # an empty id is no key here (partition 0), where the producer sends the empty key b""
    if not isinstance(obj, dict):
        return None
    key = obj.get("user_id") or obj.get("item_id")
    return key.encode() if isinstance(key, str) and key else None


class _Numberer:
    """Assigns (partition, offset) to keyed records the way a single producer + broker would."""

    def __init__(self, partitions: int) -> None:
        if partitions < 1:
            raise ValueError("partitions must be >= 1")
        self.partitions = partitions
        self._next = [0] * partitions
        self._cache: dict[bytes, int] = {}

    def record(self, key: bytes | None, value: bytes, ts_us: int | None = None) -> LogRecord:
        if key is None:
            p = 0
        else:
            p = self._cache.get(key, -1)
            if p < 0:
                p = self._cache[key] = partition_for(key, self.partitions)
        off = self._next[p]
        self._next[p] = off + 1
        return LogRecord(key, value, ts_us, p, off)


def _open_binary(path: str | Path) -> Any:
    try:
        return open(path, "rb")  # noqa: SIM115  # closed by the caller's with-block
    except OSError as exc:
        raise ReplayInputError(f"{path}: cannot open the log: {exc.strerror or exc}") from exc


def read_jsonl_log(path: str | Path, partitions: int = 4) -> Iterator[LogRecord]:
    """Records of a JSONL file, one raw event per non-blank line (malformed lines included)."""
    from streams.producer import jsonl_lines  # not at the top: it pulls in numpy and pydantic

    numberer = _Numberer(partitions)
    with _open_binary(path) as fh:
        for line, obj in jsonl_lines(fh):
            yield numberer.record(_key_of(obj), line)


def _iso(value: Any) -> Any:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)  # Parquet timestamps without a zone are UTC by convention
        return value.isoformat().replace("+00:00", "Z")
    return value


_CONTEXT_COLUMNS = ("surface", "session_id", "device", "position")


def _row_to_event(row: dict[str, Any]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    ctx: dict[str, Any] = {}
    for name, value in row.items():
        if value is None:
            continue
        if name in _CONTEXT_COLUMNS:
            ctx[name] = value
        elif name == "context" and isinstance(value, dict):
            ctx.update({k: v for k, v in value.items() if v is not None})
        else:
            obj[name] = _iso(value)
    if ctx:
        obj["context"] = ctx
    return obj


def read_parquet_log(path: str | Path, partitions: int = 4) -> Iterator[LogRecord]:
    """Records of a Parquet file: either a ``value`` column of raw JSON (plus optional ``key``),
    or one column per event field (``event_id``, ``type``, ``user_id``, ``item_id``, ``event_time``
    as ISO string or timestamp, ``schema_version``, ``items``, ``context`` struct or flat
    ``surface``/``session_id``/``device``/``position`` columns, ...). Nulls mean "absent"."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        raise ReplayInputError(f"{path}: no such Parquet file")
    try:
        pf = pq.ParquetFile(str(path))
        names = pf.schema_arrow.names
    except (pa.ArrowException, OSError) as exc:
        raise ReplayInputError(f"{path}: not a readable Parquet file: {exc}") from exc
    numberer = _Numberer(partitions)
    raw = "value" in names
    if not raw and not {"event_id", "type"} <= set(names):
        raise ReplayInputError(f"{path}: expected a 'value' column or event-field columns, got {names}")
    row_no = 0
    try:
        for batch in pf.iter_batches(batch_size=65_536):
            for row in batch.to_pylist():
                row_no += 1
                if raw:
                    value = row["value"]
                    if value is None:
                        value = b""
                    elif isinstance(value, str):
                        value = value.encode()
                    key = row.get("key")
                    if isinstance(key, str):
                        key = key.encode()
                    if key is None:
                        try:
                            key = _key_of(orjson.loads(value))
                        except orjson.JSONDecodeError:
                            key = None
                    yield numberer.record(key, value)
                else:
                    obj = _row_to_event(row)
                    try:
                        value = orjson.dumps(obj)
                    except TypeError as exc:
                        raise ReplayInputError(f"{path}: row {row_no}: cannot encode as JSON: {exc}") from exc
                    yield numberer.record(_key_of(obj), value)
    except (pa.ArrowException, OSError) as exc:
        raise ReplayInputError(f"{path}: corrupt Parquet data after row {row_no}: {exc}") from exc


def read_movielens_log(path: str | Path, partitions: int = 4) -> Iterator[LogRecord]:
    """MovieLens ratings as ``click`` events in (timestamp, movie_id) order, exactly the records
    ``freshrec produce --movielens`` sends (it is :func:`streams.producer.read_movielens` underneath)."""
    from streams.producer import read_movielens

    if not Path(path).is_file():
        raise ReplayInputError(f"{path}: no such ratings file")
    numberer = _Numberer(partitions)
    try:
        records = read_movielens(path)  # reads and sorts the whole file on the first next()
        for rec in records:
            yield numberer.record(rec.key, rec.value)
    except FreshrecError as exc:  # the producer's "malformed rating row" / "expected columns" errors
        raise ReplayInputError(str(exc)) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ReplayInputError(f"{path}: cannot read the ratings file: {exc}") from exc


class KafkaRange(NamedTuple):
    """A topic offset range: ``end`` is exclusive; None reads until an empty poll."""

    bootstrap: str
    topic: str
    partitions: tuple[int, ...] | None = None
    start: int = 0
    end: int | None = None


def parse_kafka_url(url: str) -> KafkaRange:
    """``kafka://host:port/topic?partition=0,1&start=0&end=1000`` -> :class:`KafkaRange`."""
    parsed = urlparse(url)
    if parsed.scheme != "kafka":
        raise ReplayInputError(f"{url}: not a kafka:// URL")
    topic = parsed.path.lstrip("/")
    if not parsed.netloc or not topic:
        raise ReplayInputError(f"{url}: expected kafka://host:port/topic[?partition=..&start=..&end=..]")
    query = parse_qs(parsed.query)
    unknown = set(query) - {"partition", "start", "end"}
    if unknown:
        raise ReplayInputError(f"{url}: unknown parameter(s) {sorted(unknown)}")
    try:
        parts = tuple(int(p) for v in query["partition"] for p in v.split(",")) if "partition" in query else None
        start = int(query["start"][0]) if "start" in query else 0
        end = int(query["end"][0]) if "end" in query else None
    except ValueError as exc:
        raise ReplayInputError(f"{url}: partition/start/end must be integers") from exc
    return KafkaRange(parsed.netloc, topic, parts, start, end)


def read_kafka_log(
    source: str | KafkaRange,
    poll_timeout_s: float = 1.0,
) -> Iterator[LogRecord]:
    """Records of a topic offset range, partition by partition in offset order.

    Stops a partition at ``end`` (exclusive) or at the first empty poll: Tansu's high
    watermark is too low (see ARCHITECTURE.md), so it is never used to decide "done".
    Records keep their real partition, offset and timestamp.
    """
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    rng = parse_kafka_url(source) if isinstance(source, str) else source
    consumer = Consumer(
        {"bootstrap.servers": rng.bootstrap, "group.id": "freshrec-replay-reader", "enable.auto.commit": False,
         "log_level": 3, "fetch.wait.max.ms": 50}
    )  # fmt: skip
    try:
        try:
            meta = consumer.list_topics(rng.topic, timeout=10)
        except KafkaException as exc:
            raise ReplayInputError(f"kafka://{rng.bootstrap}/{rng.topic}: cannot reach the broker: {exc}") from exc
        tmeta = meta.topics.get(rng.topic)
        if tmeta is None or tmeta.error is not None or not tmeta.partitions:
            raise ReplayInputError(f"kafka://{rng.bootstrap}/{rng.topic}: no such topic")
        parts = rng.partitions if rng.partitions is not None else tuple(sorted(tmeta.partitions))
        missing = set(parts) - set(tmeta.partitions)
        if missing:
            raise ReplayInputError(f"kafka://{rng.bootstrap}/{rng.topic}: no partition(s) {sorted(missing)}")
        for p in parts:
            consumer.assign([TopicPartition(rng.topic, p, rng.start)])
            done = False
            while not done:
                if rng.end is not None and rng.end <= rng.start:
                    break
                msgs = consumer.consume(10_000, poll_timeout_s)
                if not msgs:
                    break
                for m in msgs:
                    if m.error() is not None:
                        continue
                    off = m.offset()
                    if off is None:
                        continue
                    if rng.end is not None and off >= rng.end:
                        done = True
                        break
                    ts_type, ts_ms = m.timestamp()
                    ts_us = ts_ms * 1000 if ts_type != 0 and ts_ms > 0 else None
                    yield LogRecord(m.key(), m.value() or b"", ts_us, p, off)
                    if rng.end is not None and off + 1 >= rng.end:
                        done = True
                        break
    finally:
        consumer.close()


def guess_format(source: str) -> str:
    """The format of ``source`` from its URL scheme or file name."""
    if "://" in source:
        scheme = source.split("://", 1)[0]
        if scheme == "kafka":
            return "kafka"
        if scheme != "file":
            raise ReplayInputError(f"{source}: unknown URL scheme {scheme!r} (use kafka:// or a file path)")
        source = source[len("file://") :]
    name = Path(source).name.lower()
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith(".csv"):
        return "movielens"
    raise ReplayInputError(f"{source}: cannot tell the log format from the name; pass --format {'|'.join(FORMATS)}")


def open_log(source: str | Path, fmt: str | None = None, partitions: int = 4) -> Iterator[LogRecord]:
    """Records of ``source`` in log order; ``fmt`` is one of :data:`FORMATS` (guessed when None)."""
    src = str(source)
    fmt = fmt or guess_format(src)
    if fmt == "kafka":
        return read_kafka_log(src)
    if src.startswith("file://"):
        src = src[len("file://") :]
    elif "://" in src:
        raise ReplayInputError(f"{src}: unknown URL scheme {src.split('://', 1)[0]!r} for format {fmt}")
    if fmt == "jsonl":
        return read_jsonl_log(src, partitions)
    if fmt == "parquet":
        return read_parquet_log(src, partitions)
    if fmt == "movielens":
        return read_movielens_log(src, partitions)
    raise ReplayInputError(f"unknown log format {fmt!r}; expected one of {', '.join(FORMATS)}")
