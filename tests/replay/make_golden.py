"""Seeded generator of the committed golden log ``tests/replay/golden/events.jsonl``.

Regenerate with ``.venv/bin/python tests/replay/make_golden.py`` (same seed, same bytes).

What the log holds (~30 users, ~50 items, about three hours of event time in June 2026):

* ``item_upsert`` for every item up front (categories, a few ineligible, two with a
  64-float bootstrap vector), later re-upserts (newest wins) and one re-sent upsert;
* sessions of views, clicks, add-to-carts, purchases and impressions (slates of 5);
* events out of order within the allowed lateness (local shuffles of up to ~10 minutes);
* re-sent events (same ``event_id``): duplicates that must change nothing;
* events more than the lateness (1 h) older than their user's newest event: ``late_event``;
* bad payloads, one per codec rejection: bad JSON, not an object, missing field, wrong type,
  unknown type, bad and naive timestamps, unsupported schema version, bad value, and one event
  in 2099 (``future_timestamp`` against the record time).
"""

from __future__ import annotations

import random
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

__all__ = ["generate", "GOLDEN", "T0_US"]

GOLDEN = Path(__file__).resolve().parent / "golden" / "events.jsonl"
T0_US = int(datetime(2026, 6, 1, 10, 0, tzinfo=UTC).timestamp() * 1_000_000)
MIN_US = 60 * 1_000_000
CATEGORIES = ("books", "music", "games", "garden", "kitchen")


def _iso(ts_us: int) -> str:
    dt = datetime.fromtimestamp(ts_us // 1_000_000, UTC).replace(microsecond=ts_us % 1_000_000)
    return dt.isoformat().replace("+00:00", "Z")


def _dump(obj: Any) -> bytes:
    return orjson.dumps(obj)


def generate(seed: int = 4, users: int = 30, items: int = 50, sessions: int = 140) -> list[bytes]:
    """The golden log's lines (no newline), deterministic in ``seed``."""
    rng = random.Random(seed)
    lines: list[bytes] = []
    n = 0

    def eid(prefix: str) -> str:
        nonlocal n
        n += 1
        return f"{prefix}{seed}-{n:05d}"

    item_ids = [f"i{j:02d}" for j in range(items)]
    user_ids = [f"u{j:02d}" for j in range(users)]
    for j, iid in enumerate(item_ids):
        up: dict[str, Any] = {"event_id": eid("up"), "type": "item_upsert", "item_id": iid,
                              "event_time": _iso(T0_US - 10 * MIN_US + j), "schema_version": 1,
                              "category": CATEGORIES[j % len(CATEGORIES)], "eligible": j % 11 != 7}  # fmt: skip
        if j in (3, 4):
            up["vector"] = [round(rng.gauss(0.0, 0.1), 4) for _ in range(64)]
        lines.append(_dump(up))
    # sessions: (time, line) pairs, then sorted by time with local jitter (out of order within lateness)
    timed: list[tuple[int, bytes]] = []
    weights = [1.0 / (k + 1) ** 0.8 for k in range(items)]
    kinds = ["view", "click", "add_to_cart", "purchase"]
    for _ in range(sessions):
        uid = rng.choice(user_ids)
        t = T0_US + rng.randrange(0, 180 * MIN_US)
        sid = f"s-{uid}-{t // (30 * MIN_US)}"
        surface, device = rng.choice(["home", "search", "pdp"]), rng.choice(["ios", "web"])
        ctx = {"session_id": sid, "surface": surface, "device": device}
        for _step in range(rng.randint(3, 14)):
            t += rng.randrange(5, 90) * 1_000_000
            if rng.random() < 0.25:
                slate = rng.sample(item_ids, 5)
                obj: dict[str, Any] = {"event_id": eid("e"), "type": "impression", "user_id": uid, "items": slate,
                                       "event_time": _iso(t), "schema_version": 1, "context": ctx,
                                       "request_id": f"r{n}", "propensity": 0.2}  # fmt: skip
            else:
                kind = rng.choices(kinds, [0.6, 0.28, 0.08, 0.04])[0]
                obj = {"event_id": eid("e"), "type": kind, "user_id": uid,
                       "item_id": rng.choices(item_ids, weights)[0], "event_time": _iso(t), "schema_version": 1,
                       "context": {**ctx, "position": rng.randrange(0, 10)}}  # fmt: skip
            timed.append((t, _dump(obj)))
    # a few later catalog changes (newest upsert wins), interleaved by time
    for k in range(6):
        iid = item_ids[rng.randrange(items)]
        t = T0_US + rng.randrange(0, 180 * MIN_US)
        up2 = {"event_id": eid("up"), "type": "item_upsert", "item_id": iid, "event_time": _iso(t),
               "schema_version": 1, "category": CATEGORIES[(k + 2) % 5], "eligible": k % 2 == 0}  # fmt: skip
        timed.append((t, _dump(up2)))
    # arrival order = event time + up to 10 minutes of jitter: out of order, but within the 1 h lateness
    timed.sort(key=lambda x: x[0] + rng.randrange(0, 10 * MIN_US))
    body = [line for _, line in timed]
    # re-sent events (duplicates) a little later in the log, still within the lateness window
    for _ in range(20):
        i = rng.randrange(0, len(body) - 40)
        body.insert(i + rng.randrange(5, 40), body[i])
    body.insert(len(body) // 2, lines[5])  # a re-sent item_upsert: the item stage counts it again, like live
    # late events: 2 h older than their user's newest event so far
    last_ts: dict[str, int] = {}
    late_at: list[int] = []
    for i, line in enumerate(body):
        obj = orjson.loads(line)
        if "user_id" in obj:
            ts = int(datetime.fromisoformat(obj["event_time"]).timestamp() * 1_000_000)
            last_ts[obj["user_id"]] = max(last_ts.get(obj["user_id"], 0), ts)
            if len(late_at) < 3 and ts > T0_US + 150 * MIN_US and i % 7 == 0:
                late_at.append(i)
    for shift, i in enumerate(late_at):
        obj = orjson.loads(body[i + shift])
        ts = int(datetime.fromisoformat(obj["event_time"]).timestamp() * 1_000_000)
        late = {**obj, "event_id": eid("late"), "event_time": _iso(ts - 120 * MIN_US)}
        body.insert(i + shift + 1, _dump(late))
    bad = [
        b'{"event_id": "bad-1", "type": "click", "user_id": "u01"',  # bad_json (truncated)
        b"[1, 2, 3]",  # not_an_object
        _dump({"event_id": "bad-3", "type": "click", "user_id": "u02", "event_time": _iso(T0_US), "schema_version": 1}),
        _dump(
            {
                "event_id": "bad-4",
                "type": "click",
                "user_id": 7,
                "item_id": "i01",
                "event_time": _iso(T0_US),
                "schema_version": 1,
            }
        ),  # wrong_type  # fmt: skip
        _dump(
            {
                "event_id": "bad-5",
                "type": "teleport",
                "user_id": "u03",
                "item_id": "i01",
                "event_time": _iso(T0_US),
                "schema_version": 1,
            }
        ),  # fmt: skip
        _dump(
            {
                "event_id": "bad-6",
                "type": "view",
                "user_id": "u04",
                "item_id": "i01",
                "event_time": "yesterday",
                "schema_version": 1,
            }
        ),  # bad_timestamp  # fmt: skip
        _dump(
            {
                "event_id": "bad-7",
                "type": "view",
                "user_id": "u05",
                "item_id": "i01",
                "event_time": "2026-06-01T10:00:00",
                "schema_version": 1,
            }
        ),  # naive: bad_timestamp  # fmt: skip
        _dump(
            {
                "event_id": "bad-8",
                "type": "view",
                "user_id": "u06",
                "item_id": "i01",
                "event_time": _iso(T0_US),
                "schema_version": 9,
            }
        ),  # unsupported_schema_version  # fmt: skip
        _dump(
            {
                "event_id": "bad-9",
                "type": "impression",
                "user_id": "u07",
                "items": [],
                "event_time": _iso(T0_US),
                "schema_version": 1,
            }
        ),  # bad_value (empty slate)  # fmt: skip
        _dump(
            {
                "event_id": "bad-10",
                "type": "click",
                "user_id": "u-future",
                "item_id": "i02",
                "event_time": "2099-01-01T00:00:00Z",
                "schema_version": 1,
            }
        ),  # future_timestamp  # fmt: skip
    ]
    step = len(body) // (len(bad) + 1)
    for k, line in enumerate(bad):
        body.insert((k + 1) * step + k, line)
    return lines + body


def main(argv: list[str]) -> int:
    """Write the golden log (``argv[0]`` overrides the path)."""
    out = Path(argv[0]) if argv else GOLDEN
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(b"".join(line + b"\n" for line in generate()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
