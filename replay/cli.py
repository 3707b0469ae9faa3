"""``freshrec replay ...``: run a log offline, verify live state, play a log into Kafka.

Subcommands::

    freshrec replay run LOG --out DIR [--partitions N] [--format jsonl|parquet|movielens|kafka]
    freshrec replay verify --snapshot DIR (--live-data-dir DIR | --against DIR) [--min-cosine C] [--max-abs A]
    freshrec replay produce LOG --speed 60x [--format ...] [--topic T] [--bootstrap-servers HOST:PORT]
    freshrec replay parity LOG [--bootstrap-servers HOST:PORT] (needs a running broker)

**Registration convention.** :mod:`streams.cli` imports this module if it exists and
calls ``register(subparsers)`` with its top-level subparsers object. ``register``
adds the ``replay`` parser and its own subparsers (``dest="replay_command"``). Every
leaf parser stores its handler with ``set_defaults(func=handler)``; ``streams.cli.main``
calls ``args.func(args)`` and uses the returned int as the exit status. Handlers
import their heavy dependencies lazily (nothing is imported or opened at import
time). Other modules add ``replay`` subcommands by exposing
``add_commands(replay_subparsers)`` and following the same convention; ``register``
calls ``replay.cli_eval.add_commands`` when that module is present.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from typing import Any

import orjson

__all__ = ["register", "parse_speed"]


def parse_speed(text: str) -> float:
    """``"60x"`` or ``"60"`` -> 60.0 (times faster than the recorded event time)."""
    raw = text.strip().lower().removesuffix("x")
    try:
        value = float(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"speed must look like 60x, got {text!r}") from exc
    if value <= 0:
        raise argparse.ArgumentTypeError("speed must be > 0")
    return value


def _settings(args: argparse.Namespace) -> Any:
    from streams.config import Settings

    overrides: dict[str, Any] = {}
    for name in ("bootstrap_servers", "partitions", "data_dir"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    return Settings(**overrides)


def _record_time(text: str | None) -> int | None:
    if text is None:
        return None
    if text == "now":
        return int(time.time() * 1_000_000)
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        raise SystemExit("error: --record-time needs a timezone (e.g. 2026-01-01T00:00:00Z)")
    return int(dt.timestamp() * 1_000_000)


def _cmd_run(args: argparse.Namespace) -> int:
    from replay.readers import ReplayInputError, open_log
    from replay.replayer import replay_records
    from replay.snapshot import snapshot_from_result, write_snapshot

    settings = _settings(args)
    cfg = settings.model.core()
    try:
        t0 = time.perf_counter()
        records = list(open_log(args.log, args.format, settings.partitions))
        read_s = time.perf_counter() - t0
        result = replay_records(
            records,
            cfg,
            settings.partitions,
            batch_size=args.batch_size or settings.batch_size,
            topic=settings.topics.events,
            record_ts_us=_record_time(args.record_time),
        )
    except ReplayInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    snap = snapshot_from_result(result, cfg, settings.partitions, source=str(args.log))
    manifest = write_snapshot(snap, args.out)
    summary = {
        "events": result.events,
        "read_seconds": round(read_s, 3),
        "replay_seconds": round(result.seconds, 3),
        "replay_cpu_seconds": round(result.cpu_seconds, 3),
        "events_per_s": round(result.events_per_s),
        "events_per_cpu_s": round(result.events / result.cpu_seconds) if result.cpu_seconds > 0 else None,
        "users": len(result.users),
        "items": len(result.items),
        "duplicates": result.duplicates,
        "dlq": result.dlq_counts(),
        "checksum": manifest["checksum"],
        "out": str(args.out),
    }
    print(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from replay.readers import ReplayInputError
    from replay.snapshot import VectorTolerance, compare, load_live_snapshot, load_snapshot

    try:
        left = load_snapshot(args.snapshot)
        if args.against:
            right = load_snapshot(args.against)
        else:
            url = f"rocksdb://{args.live_data_dir}"
            right = load_live_snapshot(url, left.partitions)
        report = compare(left, right, VectorTolerance(args.min_cosine, args.max_abs))
    except ReplayInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = report.to_dict(max_diffs=args.max_diffs)
    if args.json:
        print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
    else:
        verdict = "OK" if report.ok else "MISMATCH"
        print(f"{verdict}: checksums {'equal' if report.checksums_equal else 'differ'}, "
              f"keys left {report.counts_left} right {report.counts_right}")  # fmt: skip
        for stage, st in report.vector_stats.items():
            print(f"  {stage} vectors: {int(st['compared'])} compared, min cosine {st['min_cosine']:.6f}, "
                  f"max |diff| {st['max_abs']:.3g}")  # fmt: skip
        if report.diffs:
            print(f"  differences: {report.by_kind()}")
            for d in report.diffs[: args.max_diffs]:
                print(f"    {d.stage} {d.key!r} (shard {d.partition}): {d.kind} {d.detail}")
        if out["first_diverging_event"] is not None:
            f = out["first_diverging_event"]
            print(f"  first diverging event: {f['event_id']!r} (partition {f['partition']}, offset {f['offset']}, "
                  f"replay position {f['seq']}) touching {f['stage']} {f['key']!r}")  # fmt: skip
    return 0 if report.ok else 1


def _cmd_produce(args: argparse.Namespace) -> int:
    from replay.parity import to_produce_records
    from replay.readers import ReplayInputError, open_log
    from streams.producer import make_producer, produce_records

    settings = _settings(args)
    producer = make_producer(settings.bootstrap_servers)
    t0 = time.monotonic()
    try:
        n = produce_records(
            producer,
            args.topic or settings.topics.events,
            to_produce_records(open_log(args.log, args.format, settings.partitions)),
            rate=args.rate,
            speed=args.speed,
        )
    except ReplayInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    dt = time.monotonic() - t0
    print(f"produced {n} records in {dt:.1f}s ({n / max(dt, 1e-9):,.0f}/s)")
    return 0


def _cmd_parity(args: argparse.Namespace) -> int:
    import tempfile
    import uuid

    from replay.parity import check_parity
    from replay.snapshot import VectorTolerance
    from streams.config import Topics

    tag = uuid.uuid4().hex[:8]
    topics = Topics(**{name: f"{value}-parity-{tag}" for name, value in Topics().model_dump().items()})
    base = _settings(args)
    with tempfile.TemporaryDirectory(prefix="freshrec-parity-") as tmp:
        settings = base.model_copy(update={"topics": topics, "data_dir": tmp, "group_id": f"parity-{tag}"})
        report = check_parity(args.log, settings, args.format, VectorTolerance(args.min_cosine, args.max_abs))
    print(orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2).decode())
    return 0 if report.ok else 1


def _add_tolerance(p: argparse.ArgumentParser) -> None:
    from replay.snapshot import VectorTolerance

    default = VectorTolerance()
    p.add_argument("--min-cosine", type=float, default=default.min_cosine,
                   help=f"vectors must have at least this cosine (default {default.min_cosine})")  # fmt: skip
    p.add_argument("--max-abs", type=float, default=default.max_abs,
                   help=f"and at most this max |a-b| per coordinate (default {default.max_abs})")  # fmt: skip


def register(subparsers: Any) -> None:
    """Add ``replay`` and its subcommands to ``freshrec``'s top-level ``subparsers``."""
    from replay.readers import FORMATS

    rp = subparsers.add_parser("replay", help="offline replay: run a log, verify live state, produce a log")
    sub = rp.add_subparsers(dest="replay_command", required=True)

    p = sub.add_parser("run", help="replay a log through the state logic and write a snapshot")
    p.add_argument("log", help="a JSONL/Parquet/MovieLens file, or kafka://host:port/topic?partition=&start=&end=")
    p.add_argument("--out", required=True, help="snapshot directory to write")
    p.add_argument("--partitions", type=int, help="shards per stage (default: FRESHREC_PARTITIONS or 4)")
    p.add_argument("--format", choices=FORMATS, help="log format (default: from the URL scheme / file name)")
    p.add_argument("--batch-size", type=int, help="records per replay batch (default: the worker's batch_size)")
    p.add_argument("--record-time", help="reference time for the future check of file records (ISO or 'now'; "
                   "default: no check, file logs carry no Kafka timestamp)")  # fmt: skip
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("verify", help="compare a replay snapshot with the live stores or another snapshot")
    p.add_argument("--snapshot", required=True, help="the replay snapshot directory")
    side = p.add_mutually_exclusive_group(required=True)
    side.add_argument("--live-data-dir", help="the live worker's data dir (RocksDB shards, opened read-only)")
    side.add_argument("--against", help="another snapshot directory")
    _add_tolerance(p)
    p.add_argument("--max-diffs", type=int, default=20, help="list at most this many differing keys")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("produce", help="play a log into Kafka at N x its recorded speed")
    p.add_argument("log")
    p.add_argument("--format", choices=FORMATS)
    p.add_argument("--bootstrap-servers", dest="bootstrap_servers")
    p.add_argument("--partitions", type=int, help="only used to number file records (Kafka partitions by key)")
    p.add_argument("--topic", help="default: the events topic")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--speed", type=parse_speed, help="times faster than the event times, e.g. 60x")
    pace.add_argument("--rate", type=float, help="records per second")
    p.set_defaults(func=_cmd_produce)

    p = sub.add_parser("parity", help="produce a log, run a live worker on it, replay it and compare")
    p.add_argument("log")
    p.add_argument("--format", choices=FORMATS)
    p.add_argument("--bootstrap-servers", dest="bootstrap_servers")
    p.add_argument("--partitions", type=int)
    _add_tolerance(p)
    p.set_defaults(func=_cmd_parity)

    try:
        from replay import cli_eval
    except ImportError:
        pass
    else:
        cli_eval.add_commands(sub)
