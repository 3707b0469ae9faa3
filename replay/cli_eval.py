"""``freshrec replay training-set`` and ``freshrec replay evaluate``.

Registered by :mod:`replay.cli` through :func:`add_commands` (same convention as there:
each leaf parser stores ``set_defaults(func=handler)``; a handler takes the parsed
``argparse.Namespace`` and returns the exit status). Heavy imports happen inside the
handlers, never at import time. Bad input (a missing or unreadable log, a bad duration,
an empty split) prints ``error: ...`` to stderr and returns 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

__all__ = ["add_commands", "parse_duration", "parse_split_time"]

_UNITS = {"us": 1, "ms": 1_000, "s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000, "d": 86_400_000_000}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|m|h|d)?\s*$")


def parse_duration(text: str) -> int:
    """``"24h"``, ``"30m"``, ``"90s"``, ``"2d"``, ``"500ms"`` (a bare number is seconds) -> microseconds."""
    match = _DURATION.match(text.lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a duration like 24h, 30m, 90s or 2d, got {text!r}")
    value = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"duration must be > 0, got {text!r}")
    return int(value)


def parse_split_time(text: str) -> int:
    """An ISO-8601 time with a timezone -> microseconds since the epoch."""
    try:
        dt = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--split-time must be ISO-8601, got {text!r}") from exc
    if dt.tzinfo is None:
        raise argparse.ArgumentTypeError("--split-time needs a timezone (e.g. 1998-03-01T00:00:00Z)")
    from streams.events import datetime_to_ts

    return datetime_to_ts(dt)


def _quantile(text: str) -> float:
    try:
        q = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--split-quantile must be a number, got {text!r}") from exc
    if not 0.0 < q < 1.0:
        raise argparse.ArgumentTypeError(f"--split-quantile must be in (0, 1), got {text!r}")
    return q


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from exc
        if n < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return n

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _cmd_training_set(args: argparse.Namespace) -> int:
    from replay.training import LeakageError, TrainingSetConfig, build_training_set, read_events, write_parquet
    from streams.errors import FreshrecError

    out = Path(args.out)
    if not out.parent.is_dir():
        return _fail(f"{out.parent}: output directory does not exist")
    try:
        read = read_events(args.log)
        if not read.events:
            return _fail(f"{args.log}: no valid events ({read.skipped} skipped)")
        cfg = TrainingSetConfig(
            ttl_us=args.ttl, negatives=args.negatives, reward_window_us=args.reward_window, seed=args.seed
        )
        table = build_training_set(read.events, cfg)
    except LeakageError as exc:
        print(f"error: leakage check failed: {exc}", file=sys.stderr)
        return 3
    except FreshrecError as exc:
        return _fail(str(exc))
    write_parquet(table, out)
    labels = table.column("label").to_pylist()
    summary = {
        "events": len(read.events),
        "skipped": read.skipped,
        "skipped_reasons": dict(read.reasons),
        "rows": table.num_rows,
        "positives": sum(labels),
        "negatives": len(labels) - sum(labels),
        "leakage": "ok",
        "out": str(out),
    }
    print(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from replay.evaluate import EvalConfig, evaluate
    from replay.training import read_events
    from streams.errors import FreshrecError

    try:
        read = read_events(args.log)
    except FreshrecError as exc:
        return _fail(str(exc))
    if not read.events:
        return _fail(f"{args.log}: no valid events ({read.skipped} skipped)")
    cfg = EvalConfig(
        k=args.k,
        split_quantile=args.split_quantile,
        split_time_us=args.split_time,
        bootstrap=args.bootstrap,
        seed=args.seed,
        als_backend=args.als_backend,
    )
    try:
        result = evaluate(read.events, cfg, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    except ValueError as exc:
        return _fail(str(exc))
    except ImportError as exc:
        return _fail(f"{exc} (install the bench extra: pip install 'freshrec[bench]', or --als-backend numpy)")
    models: dict[str, Any] = {}
    for name, m in result.models.items():
        models[name] = {
            metric: {"mean": round(ci.mean, 5), "ci95": [round(ci.low, 5), round(ci.high, 5)]}
            for metric, ci in (("hit_rate", m.hit_rate), ("recall", m.recall), ("ndcg", m.ndcg))
        }
    summary = {
        "events": len(read.events),
        "skipped": read.skipped,
        "split_us": result.split_us,
        "train_events": result.train_events,
        "test_events": result.test_events,
        "queries": result.queries,
        "k": cfg.k,
        "als_backend": result.als_backend,
        "models": models,
    }
    print(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    return 0


def add_commands(subparsers: Any) -> None:
    """Add ``training-set`` and ``evaluate`` to the ``freshrec replay`` subparsers."""
    p = subparsers.add_parser("training-set", help="build a point-in-time-correct training set (Parquet)")
    p.add_argument("log", help="JSONL event log or MovieLens ratings CSV")
    p.add_argument("--out", required=True, help="output Parquet file")
    p.add_argument("--ttl", type=parse_duration, default=parse_duration("24h"), help="feature TTL (default 24h)")
    p.add_argument("--negatives", type=_non_negative_int, default=4, help="sampled negatives per positive event")
    p.add_argument(
        "--reward-window",
        dest="reward_window",
        type=parse_duration,
        default=parse_duration("30m"),
        help="an impression is clicked if the click follows within this window (default 30m)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_training_set)

    p = subparsers.add_parser("evaluate", help="prequential evaluation: freshrec vs ALS and popularity")
    p.add_argument("log", help="JSONL event log or MovieLens ratings CSV")
    p.add_argument("--k", type=_positive_int, default=10)
    split = p.add_mutually_exclusive_group()
    split.add_argument("--split-quantile", dest="split_quantile", type=_quantile, default=0.8)
    split.add_argument("--split-time", dest="split_time", type=parse_split_time, default=None)
    p.add_argument("--bootstrap", type=_non_negative_int, default=1000, help="bootstrap resamples for the CIs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--als-backend", dest="als_backend", choices=("auto", "implicit", "numpy"), default="auto")
    p.set_defaults(func=_cmd_evaluate)
