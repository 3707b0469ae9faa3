"""Log readers: one contract over every file reader, then each reader's malformed inputs."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from replay.readers import (
    LogRecord,
    ReplayInputError,
    open_log,
    parse_kafka_url,
    read_jsonl_log,
    read_kafka_log,
    read_movielens_log,
    read_parquet_log,
)
from streams import codec
from streams.config import Settings
from streams.core.partition import partition_for
from streams.errors import FreshrecError
from streams.producer import read_jsonl

PARTS = 3
# (user, movie, unix seconds): written in this order, read back in (timestamp, movie_id) order
RATINGS = [("7", "20", 1_000), ("3", "11", 900), ("7", "5", 1_000), ("12", "5", 950), ("3", "2", 2_000)]
EXPECTED_ORDER = [("3", "11", 900), ("12", "5", 950), ("7", "5", 1_000), ("7", "20", 1_000), ("3", "2", 2_000)]


def _event(user: str, movie: str, ts: int) -> dict[str, object]:
    # the shape freshrec's MovieLens reader gives a rating, so every format describes the same events
    return {"event_id": f"ml-{user}-{movie}-{ts}", "type": "click", "user_id": user, "item_id": movie,
            "event_time": codec.format_time(ts * 1_000_000), "schema_version": 1}  # fmt: skip


def _write_jsonl(path: Path) -> Path:
    path = path / "log.jsonl"
    path.write_bytes(b"".join(orjson.dumps(_event(*r)) + b"\n" for r in EXPECTED_ORDER))
    return path


def _write_parquet_fields(path: Path) -> Path:
    path = path / "fields.parquet"
    pq.write_table(pa.Table.from_pylist([_event(*r) for r in EXPECTED_ORDER]), path)
    return path


def _write_parquet_values(path: Path) -> Path:
    path = path / "values.parquet"
    values = [orjson.dumps(_event(*r)) for r in EXPECTED_ORDER]
    pq.write_table(pa.table({"value": pa.array(values, pa.binary())}), path)
    return path


def _write_movielens(path: Path) -> Path:
    path = path / "ratings.csv"
    path.write_text("user_id,movie_id,rating,timestamp\n" + "".join(f"{u},{m},4,{t}\n" for u, m, t in RATINGS))
    return path


Reader = Callable[[Path, int], Iterator[LogRecord]]
READERS: dict[str, tuple[Callable[[Path], Path], Reader]] = {
    "jsonl": (_write_jsonl, read_jsonl_log),
    "parquet-fields": (_write_parquet_fields, read_parquet_log),
    "parquet-values": (_write_parquet_values, read_parquet_log),
    "movielens": (_write_movielens, read_movielens_log),
}


@pytest.fixture(params=sorted(READERS))
def reader_case(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Reader]:
    write, read = READERS[request.param]
    return write(tmp_path), read


def test_contract_same_events_keys_partitions_offsets(reader_case: tuple[Path, Reader]) -> None:
    path, read = reader_case
    records = list(read(path, PARTS))
    events = [codec.decode(r.value) for r in records]
    assert [(e.user_id, e.item_id, e.ts_us // 1_000_000) for e in events] == EXPECTED_ORDER
    assert all(r.key == e.user_id.encode() for r, e in zip(records, events, strict=True))  # type: ignore[union-attr]
    assert all(r.partition == partition_for(r.key, PARTS) for r in records)  # type: ignore[arg-type]
    assert all(r.ts_us is None for r in records)  # files carry no Kafka record timestamp
    for p in range(PARTS):  # offsets count each partition's records in log order, from 0
        assert [r.offset for r in records if r.partition == p] == list(range(sum(r.partition == p for r in records)))


def test_contract_deterministic_and_does_not_touch_the_input(reader_case: tuple[Path, Reader]) -> None:
    path, read = reader_case
    before = path.read_bytes()
    assert list(read(path, PARTS)) == list(read(path, PARTS))
    assert path.read_bytes() == before


def test_contract_missing_file_is_a_clear_error(reader_case: tuple[Path, Reader]) -> None:
    path, read = reader_case
    missing = path.with_name("nope-" + path.name)
    with pytest.raises(ReplayInputError, match=str(missing.name)):
        list(read(missing, PARTS))


def test_replay_input_error_is_a_freshrec_error() -> None:
    assert issubclass(ReplayInputError, FreshrecError)


def test_jsonl_bad_lines_are_still_records(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    good = orjson.dumps(_event("u1", "i1", 5))
    path.write_bytes(b"{nope\n\n" + good + b"\r\n[1, 2]\n   \n")
    records = list(read_jsonl_log(path, PARTS))
    assert [r.value for r in records] == [b"{nope", good, b"[1, 2]"]  # blank lines skipped, CRLF stripped
    assert [r.key for r in records] == [None, b"u1", None]
    assert records[0].partition == 0 and records[2].partition == 0  # keyless records: partition 0


def test_jsonl_reads_the_lines_the_producer_sends_but_an_empty_id_is_no_key(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    good = orjson.dumps(_event("u1", "i1", 5))
    empty = orjson.dumps({**_event("u1", "i1", 6), "user_id": "", "item_id": ""})
    path.write_bytes(b"{nope\n\n" + good + b"\r\n" + empty + b"\n   \n")
    records = list(read_jsonl_log(path, PARTS))
    sent = list(read_jsonl(path))
    assert [r.value for r in records] == [s.value for s in sent] == [b"{nope", good, empty]
    assert [r.key for r in records] == [None, b"u1", None]  # an empty id is no key: partition 0
    assert records[2].partition == 0
    assert [s.key for s in sent] == [None, b"u1", b""]  # the producer sends the empty key as is


def test_item_upsert_is_keyed_by_item(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    up = {"event_id": "up1", "type": "item_upsert", "item_id": "i42", "event_time": "2026-01-01T00:00:00Z",
          "schema_version": 1}  # fmt: skip
    path.write_bytes(orjson.dumps(up) + b"\n")
    (rec,) = read_jsonl_log(path, 8)
    assert rec.key == b"i42" and rec.partition == partition_for("i42", 8)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("userId,title,rating\n1,2,3\n", r"expected user_id,movie_id,rating,timestamp"),
        ("user_id,movie_id,rating,timestamp\n1,2,3,100\n1,2,3,soon\n", r"ratings\.csv:3: malformed rating row"),
        ("user_id,movie_id,rating,timestamp\n1,x,3,100\n", r"ratings\.csv:2:"),
        ("", r"empty ratings file"),
    ],
)
def test_movielens_malformed(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "ratings.csv"
    path.write_text(content)
    with pytest.raises(ReplayInputError, match=match):
        list(read_movielens_log(path, PARTS))


def test_movielens_accepts_camel_case_headers(tmp_path: Path) -> None:
    path = tmp_path / "ratings.csv"
    path.write_text("userId,movieId,rating,timestamp\n9,1,5,10\n")
    (rec,) = read_movielens_log(path, PARTS)
    ev = codec.decode(rec.value)
    assert (ev.user_id, ev.item_id, ev.ts_us) == ("9", "1", 10_000_000)


def test_parquet_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(ReplayInputError, match=r"bad\.parquet: not a readable Parquet file"):
        list(read_parquet_log(path, PARTS))


def test_parquet_without_event_columns(tmp_path: Path) -> None:
    path = tmp_path / "odd.parquet"
    pq.write_table(pa.table({"a": [1, 2]}), path)
    with pytest.raises(ReplayInputError, match=r"expected a 'value' column"):
        list(read_parquet_log(path, PARTS))


def test_parquet_fields_with_context_and_timestamps(tmp_path: Path) -> None:
    path = tmp_path / "ctx.parquet"
    from datetime import UTC, datetime

    table = pa.table(
        {
            "event_id": ["e1", "e2"],
            "type": ["impression", "view"],
            "user_id": ["u1", "u2"],
            "item_id": [None, "i1"],
            "items": [["i1", "i2"], None],
            "event_time": pa.array(
                [datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC)], pa.timestamp("us", tz="UTC")
            ),  # fmt: skip
            "schema_version": [1, 1],
            "surface": ["home", None],
            "position": [None, 3],
        }
    )
    pq.write_table(table, path)
    a, b = (codec.decode(r.value) for r in read_parquet_log(path, PARTS))
    assert a.items == ("i1", "i2") and a.context.surface == "home" and a.item_id is None
    assert b.context.position == 3 and b.context.surface is None
    assert b.ts_us - a.ts_us == 86_400_000_000


def test_open_log_dispatch_and_errors(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path)
    assert list(open_log(path)) == list(read_jsonl_log(path, 4))
    assert list(open_log(f"file://{path}", partitions=PARTS)) == list(read_jsonl_log(path, PARTS))
    with pytest.raises(ReplayInputError, match="unknown URL scheme 's3'"):
        open_log("s3://bucket/log.jsonl")
    with pytest.raises(ReplayInputError, match="cannot tell the log format"):
        open_log(tmp_path / "log.bin")
    with pytest.raises(ReplayInputError, match="unknown log format"):
        open_log(path, "avro")


def test_parse_kafka_url() -> None:
    rng = parse_kafka_url("kafka://127.0.0.1:9092/events?partition=0,2&start=5&end=10")
    assert (rng.bootstrap, rng.topic, rng.partitions, rng.start, rng.end) == ("127.0.0.1:9092", "events", (0, 2), 5, 10)
    assert parse_kafka_url("kafka://h:1/t").partitions is None
    with pytest.raises(ReplayInputError, match="integers"):
        parse_kafka_url("kafka://h:1/t?start=x")
    with pytest.raises(ReplayInputError, match="unknown parameter"):
        parse_kafka_url("kafka://h:1/t?offset=3")
    with pytest.raises(ReplayInputError, match="expected kafka://"):
        parse_kafka_url("kafka://h:1/")


@pytest.mark.integration
def test_kafka_range_reader(live_settings: Settings) -> None:
    from streams.broker import ensure_topics
    from streams.producer import make_producer

    s = live_settings
    ensure_topics(s)
    producer = make_producer(s.bootstrap_servers)
    topic = f"range-{uuid.uuid4().hex[:8]}"
    for i in range(30):
        producer.produce(topic, b"v%d" % i, b"k", partition=1, timestamp=1_700_000_000_000 + i)
    producer.produce(topic, b"other", b"k", partition=0)
    producer.flush()
    got = list(read_kafka_log(f"kafka://{s.bootstrap_servers}/{topic}?partition=1&start=10&end=20"))
    assert [r.value for r in got] == [b"v%d" % i for i in range(10, 20)]
    assert [r.offset for r in got] == list(range(10, 20)) and {r.partition for r in got} == {1}
    assert got[0].ts_us == (1_700_000_000_000 + 10) * 1000 and got[0].key == b"k"
    # no end: read until an empty poll (never the high watermark)
    tail = list(read_kafka_log(f"kafka://{s.bootstrap_servers}/{topic}?partition=1&start=25", poll_timeout_s=0.5))
    assert [r.offset for r in tail] == list(range(25, 30))
    with pytest.raises(ReplayInputError, match="no partition"):
        list(read_kafka_log(f"kafka://{s.bootstrap_servers}/{topic}?partition=9"))
