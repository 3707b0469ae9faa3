"""``freshrec produce``: events from files or a synthetic generator into Kafka.

Sources:

* ``--jsonl PATH``: one event JSON object per line (sent as-is, even if invalid:
  validation is the worker's job, and bad lines must reach the DLQ there).
* ``--csv PATH``: a CSV with the event fields as columns (``event_id, type,
  user_id, item_id, event_time`` and optional context columns).
* ``--movielens PATH``: MovieLens ratings (``user_id,movie_id,rating,timestamp``
  or ``userId,movieId,...``), each rating becoming a ``click`` at its timestamp,
  in (timestamp, movie_id) order.
* ``--synthetic N``: N events of seeded synthetic sessions (views, clicks,
  add-to-carts, purchases, impressions) with a Zipf item popularity, clicks drawn
  independently of the impressions (the ingest benchmark's stream).
* ``--sessions N``: N events of seeded slate sessions (``slate_sessions``, the demo's
  stream): a click names an item of a slate shown to that user, with its request id.

Pacing: ``--rate R`` throttles to R events/s; ``--speed X`` replays X times
faster than the recorded event times. Without either, it sends as fast as it can.
Events are keyed by user id and partitioned with murmur2, like Kafka's Java
clients, so a user's events always land on the same shard.
"""

from __future__ import annotations

import argparse
import csv
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from streams.config import Settings
from streams.errors import FreshrecError

__all__ = [
    "Record",
    "event_time_of",
    "jsonl_lines",
    "read_jsonl",
    "read_csv",
    "read_movielens",
    "synthetic_events",
    "slate_sessions",
    "add_arguments",
    "run_produce",
    "produce_records",
    "LINGER_MS",
    "make_producer",
]


#: the first event time of the seeded generators when none is given (2026-09-21 14:13:20 UTC): reproducible output
SYNTHETIC_START_US = 1_790_000_000_000_000

#: the most event time one forward jump may add to a ``--speed`` schedule (1 hour)
MAX_PACE_JUMP_US = 3_600 * 1_000_000


@dataclass(frozen=True, slots=True)
class Record:
    """One message to produce: key, raw value, and its event time (for pacing)."""

    key: bytes | None
    value: bytes
    ts_us: int | None


def _iso(ts_us: int) -> str:
    return datetime.fromtimestamp(ts_us / 1_000_000, UTC).isoformat().replace("+00:00", "Z")


def event_time_of(obj: Any) -> int | None:
    """The ``event_time`` of a decoded JSON event in microseconds, or None (for pacing; no validation)."""
    raw = obj.get("event_time") if isinstance(obj, dict) else None
    if not isinstance(raw, str):
        return None
    try:
        dt = datetime.fromisoformat(raw)
    except ValueError:
        return None
    if dt.tzinfo is None:
        return None
    return int(dt.timestamp() * 1_000_000)


def _key_of(obj: Any) -> bytes | None:
    if not isinstance(obj, dict):
        return None
    key = obj.get("user_id") or obj.get("item_id")
    return key.encode() if isinstance(key, str) else None


def jsonl_lines(fh: Iterable[bytes]) -> Iterator[tuple[bytes, Any]]:
    """``(line, decoded JSON or None)`` for each non-blank line of a binary JSONL stream.

    The line keeps everything but its line ending, so a malformed one is passed on verbatim.
    Shared with :func:`replay.readers.read_jsonl_log`, which must see the lines this sends.
    """
    for line in fh:
        line = line.rstrip(b"\r\n")
        if not line.strip():
            continue
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            obj = None
        yield line, obj


def read_jsonl(path: str | Path) -> Iterator[Record]:
    """Lines of a JSONL file, sent verbatim (malformed lines included, for the DLQ)."""
    with open(path, "rb") as fh:
        for line, obj in jsonl_lines(fh):
            yield Record(_key_of(obj), line, event_time_of(obj))


_CTX = ("surface", "session_id", "device", "position")


def read_csv(path: str | Path) -> Iterator[Record]:
    """A CSV of events; required columns: event_id, type, user_id, event_time."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"event_id", "type", "user_id", "event_time"} - set(reader.fieldnames or ())
        if missing:
            raise FreshrecError(f"{path}: CSV is missing column(s) {sorted(missing)}")
        for row in reader:
            obj: dict[str, Any] = {
                "event_id": row["event_id"],
                "type": row["type"],
                "user_id": row["user_id"] or None,
                "event_time": row["event_time"],
                "schema_version": int(row.get("schema_version") or 1),
            }
            if row.get("item_id"):
                obj["item_id"] = row["item_id"]
            ctx = {k: row[k] for k in _CTX if row.get(k)}
            if "position" in ctx:
                ctx["position"] = int(ctx["position"])
            if ctx:
                obj["context"] = ctx
            yield Record(_key_of(obj), orjson.dumps(obj), event_time_of(obj))


def read_movielens(path: str | Path) -> Iterator[Record]:
    """MovieLens ratings as clicks, in (timestamp, movie_id) order."""
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise FreshrecError(f"{path}: empty ratings file")
        cols = [c.strip().lower() for c in header]
        try:
            iu = cols.index("user_id") if "user_id" in cols else cols.index("userid")
            ii = cols.index("movie_id") if "movie_id" in cols else cols.index("movieid")
            it = cols.index("timestamp")
        except ValueError as exc:
            raise FreshrecError(f"{path}: expected user_id,movie_id,rating,timestamp columns, got {header}") from exc
        rows: list[tuple[int, int, str, str]] = []
        for n, row in enumerate(reader, start=2):
            try:
                rows.append((int(row[it]), int(row[ii]), row[iu], row[ii]))
            except (ValueError, IndexError) as exc:
                raise FreshrecError(f"{path}:{n}: malformed rating row {row!r}") from exc
    rows.sort(key=lambda r: (r[0], r[1]))
    for ts, _, user, movie in rows:
        ts_us = ts * 1_000_000
        obj = {
            "event_id": f"ml-{user}-{movie}-{ts}",
            "type": "click",
            "user_id": user,
            "event_time": _iso(ts_us),
            "schema_version": 1,
            "item_id": movie,
        }
        yield Record(user.encode(), orjson.dumps(obj), ts_us)


def synthetic_events(
    n: int,
    users: int = 10_000,
    items: int = 5_000,
    seed: int = 0,
    start_us: int | None = None,
    step_us: int = 1_000,
    bad_every: int = 0,
) -> Iterator[Record]:
    """Seeded synthetic sessions. ``bad_every=k`` makes every k-th record malformed."""
    rng = np.random.default_rng(seed)
    start = start_us if start_us is not None else SYNTHETIC_START_US
    kinds = np.array(["view", "click", "add_to_cart", "purchase", "impression"])
    probs = np.array([0.55, 0.25, 0.08, 0.02, 0.10])
    chunk = 65_536
    done = 0
    while done < n:
        m = min(chunk, n - done)
        u = rng.integers(0, users, m)
        it = np.minimum(rng.zipf(1.3, m) - 1, items - 1)
        kind = rng.choice(len(kinds), m, p=probs)
        for j in range(m):
            i = done + j
            ts = start + i * step_us
            if bad_every and i % bad_every == bad_every - 1:
                yield Record(f"u{u[j]}".encode(), b'{"event_id": "bad-%d", "type": ' % i, ts)
                continue
            obj: dict[str, Any] = {
                "event_id": f"s{seed}-{i}",
                "type": str(kinds[kind[j]]),
                "user_id": f"u{u[j]}",
                "event_time": _iso(ts),
                "schema_version": 1,
                "context": {"session_id": f"u{u[j]}-{ts // 1_800_000_000}", "surface": "home", "device": "web"},
            }
            if kind[j] == 4:
                obj["items"] = [f"i{(it[j] + k * 7) % items}" for k in range(5)]
            else:
                obj["item_id"] = f"i{it[j]}"
            yield Record(f"u{u[j]}".encode(), orjson.dumps(obj), ts)
        done += m


def slate_sessions(
    n: int,
    users: int = 10_000,
    items: int = 5_000,
    seed: int = 0,
    start_us: int | None = None,
    step_us: int = 1_000,
    slate: int = 5,
    click_rate: float = 0.3,
) -> Iterator[Record]:
    """Seeded sessions whose clicks come from slates that were shown: the demo's stream.

    Each step shows a user a slate of ``slate`` distinct items (Zipf popularity) as an ``impression``;
    with probability ``click_rate`` the user clicks one of them (position-biased: weight 1 / (position
    + 1)), which then may lead to a ``view`` (0.5), an ``add_to_cart`` (0.15) and a ``purchase`` (a third
    of those). Every click carries its slate's ``request_id`` and its position, so an item's clicks never
    outnumber its impressions and impression -> click rewards join as served ones do. (``synthetic_events``
    draws clicks independently of impressions; the ingest benchmark keeps it as its fixed stream.)
    ``n`` counts records; the last step may be cut short.
    """
    if slate < 1 or slate > items:
        raise ValueError(f"slate must be in [1, items], got {slate}")
    rng = np.random.default_rng(seed)
    start = start_us if start_us is not None else SYNTHETIC_START_US
    bias = 1.0 / np.arange(1, slate + 1)
    bias /= bias.sum()
    sent = 0
    step = 0
    while sent < n:
        user = f"u{int(rng.integers(0, users))}"
        shown: list[str] = []
        while len(shown) < slate:  # distinct items, popular ones first more often
            item = f"i{min(int(rng.zipf(1.3)) - 1, items - 1)}"
            if item not in shown:
                shown.append(item)
        request = f"r{seed}-{step}"
        session = {"session_id": f"{user}-{step // 50}", "surface": "home", "device": "web"}
        events: list[dict[str, Any]] = [{"type": "impression", "items": shown}]
        if rng.random() < click_rate:
            pos = int(rng.choice(slate, p=bias))
            events.append({"type": "click", "item_id": shown[pos], "position": pos})
            if rng.random() < 0.5:
                events.append({"type": "view", "item_id": shown[pos]})
            if rng.random() < 0.15:
                events.append({"type": "add_to_cart", "item_id": shown[pos]})
                if rng.random() < 1 / 3:
                    events.append({"type": "purchase", "item_id": shown[pos]})
        for k, fields in enumerate(events):
            if sent >= n:
                return
            ts = start + sent * step_us
            context = dict(session, position=fields.pop("position")) if "position" in fields else session
            obj: dict[str, Any] = {
                "event_id": f"d{seed}-{step}-{k}",
                "type": fields.pop("type"),
                "user_id": user,
                "event_time": _iso(ts),
                "schema_version": 1,
                "context": context,
                **fields,  # (item_id or items, then request_id: the codec's field order)
                "request_id": request,
            }
            yield Record(user.encode(), orjson.dumps(obj), ts)
            sent += 1
        step += 1


#: how long the producer gathers records into one batch per partition before it sends. Every
#: produced batch is an object the embedded broker stores for good and lists on every fetch of its
#: partition (docs/ARCHITECTURE.md, "Tansu quirks"): a live stream of 16.5k events/s cost Tansu 46-47% of
#: a core at 5 ms (librdkafka's default), 9.5-9.7% at 50 ms (benchmarks/broker_linger.py). It adds at most
#: this much to an event's freshness.
LINGER_MS = 50


def make_producer(bootstrap: str, linger_ms: int = LINGER_MS, **extra: Any) -> Any:
    """A confluent-kafka producer that partitions like Kafka's Java clients (murmur2)."""
    from confluent_kafka import Producer

    conf = {
        "bootstrap.servers": bootstrap,
        "partitioner": "murmur2_random",
        "linger.ms": linger_ms,
        "batch.num.messages": 10000,
        "queue.buffering.max.messages": 1_000_000,
        "log_level": 3,
        **extra,
    }
    return Producer(conf)


def produce_records(
    producer: Any,
    topic: str,
    records: Iterator[Record],
    rate: float | None = None,
    speed: float | None = None,
    clock: Any = time.monotonic,
    sleep: Any = time.sleep,
) -> int:
    """Produce ``records`` with optional pacing; returns how many were sent.

    ``speed`` paces on event time: the schedule follows the highest event time seen so far
    (an out-of-order record never waits), and one jump forward counts for at most
    ``MAX_PACE_JUMP_US`` of event time, so an outlier dated decades ahead costs at most an
    hour / speed of waiting instead of stalling the stream.
    """
    sent = 0
    t0 = clock()
    high: int | None = None
    virtual_us = 0
    for rec in records:
        if rate:
            due = t0 + sent / rate
        elif speed and rec.ts_us is not None:
            if high is None:
                high = rec.ts_us
            elif rec.ts_us > high:
                virtual_us += min(rec.ts_us - high, MAX_PACE_JUMP_US)
                high = rec.ts_us
            due = t0 + virtual_us / 1_000_000 / speed
        else:
            due = 0.0
        if due:
            delay = due - clock()
            if delay > 0.001:
                producer.poll(0)
                sleep(delay)
        while True:
            try:
                producer.produce(topic, rec.value, rec.key)
                break
            except BufferError:
                producer.poll(0.01)
        sent += 1
        if sent % 5000 == 0:
            producer.poll(0)
    producer.flush(60)
    return sent


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``freshrec produce``."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--jsonl", help="a JSONL file of events")
    src.add_argument("--csv", help="a CSV file of events")
    src.add_argument("--movielens", help="MovieLens ratings CSV")
    src.add_argument("--synthetic", type=int, metavar="N", help="N synthetic events")
    src.add_argument(
        "--sessions", type=int, metavar="N", help="N events of slate sessions: clicks only on items of shown slates"
    )
    p.add_argument("--users", type=int, default=10_000, help="synthetic: number of users")
    p.add_argument("--items", type=int, default=5_000, help="synthetic: number of items")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--topic", default=None, help="default: the events topic")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=float, help="events per second")
    pace.add_argument("--speed", type=float, help="times faster than recorded event time")
    p.add_argument(
        "--linger-ms",
        type=int,
        default=LINGER_MS,
        help=f"ms the producer gathers records into a batch (default {LINGER_MS}: every batch costs the embedded "
        "broker for good)",
    )


def run_produce(args: argparse.Namespace, settings: Settings) -> int:
    """Run ``freshrec produce``."""
    if args.jsonl:
        records = read_jsonl(args.jsonl)
    elif args.csv:
        records = read_csv(args.csv)
    elif args.movielens:
        records = read_movielens(args.movielens)
    else:
        now_us = int(time.time() * 1_000_000)
        step = int(1_000_000 / args.rate) if args.rate else 1_000
        if args.sessions:
            records = slate_sessions(args.sessions, args.users, args.items, args.seed, start_us=now_us, step_us=step)
        else:
            records = synthetic_events(args.synthetic, args.users, args.items, args.seed, start_us=now_us, step_us=step)
    producer = make_producer(settings.bootstrap_servers, args.linger_ms)
    t0 = time.monotonic()
    n = produce_records(producer, args.topic or settings.topics.events, records, args.rate, args.speed)
    dt = time.monotonic() - t0
    print(f"produced {n} events in {dt:.1f}s ({n / max(dt, 1e-9):,.0f}/s)")
    return 0
