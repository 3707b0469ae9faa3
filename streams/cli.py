"""The ``freshrec`` command line.

Subcommands: ``broker``, ``worker``, ``produce``, ``inspect``, ``demo``; the
``replay`` and ``serve`` subcommands are registered by :mod:`replay.cli` and
:mod:`serving.cli` (each exposes ``register(subparsers)``).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import signal
import sys
import time
from typing import Any

from streams import _compiled

__all__ = ["main", "build_parser"]

log = logging.getLogger("freshrec")


def _settings(args: argparse.Namespace) -> Any:
    from streams.config import Settings

    overrides: dict[str, Any] = {}
    for name in ("bootstrap_servers", "partitions", "data_dir", "group_id", "stats_path"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    return Settings(**overrides)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap-servers", dest="bootstrap_servers", help="Kafka bootstrap (FRESHREC_BOOTSTRAP_SERVERS)")
    p.add_argument("--partitions", type=int, help="partitions = shards per stage (FRESHREC_PARTITIONS)")
    p.add_argument("--data-dir", dest="data_dir", help="where the RocksDB shards live (FRESHREC_DATA_DIR)")


def _cmd_broker(args: argparse.Namespace) -> int:
    from streams.broker import EmbeddedBroker, ensure_topics
    from streams.config import Settings

    broker = EmbeddedBroker(port=args.port).start()
    settings = Settings(bootstrap_servers=broker.bootstrap, partitions=args.partitions or Settings().partitions)
    epoch = ensure_topics(settings)
    print(f"broker ready on {broker.bootstrap} (log epoch {epoch}); Ctrl-C stops it", flush=True)
    _wait_for_signal()
    broker.stop()
    return 0


def _wait_for_signal() -> None:
    stop = {"flag": False}

    def handler(signum: int, frame: object) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    while not stop["flag"]:
        time.sleep(0.2)


def _cmd_worker(args: argparse.Namespace) -> int:
    from streams.errors import StateMismatch
    from streams.worker import StreamWorker, reset_state

    settings = _settings(args)
    if args.reset_state:
        reset_state(settings)
    # The worker allocates millions of short-lived, acyclic objects per second while holding
    # a large heap of cached states; with the default thresholds (700, 10, 10) the cyclic
    # collector rescanned that heap so often that it cost ~30% of the worker's CPU. Collect
    # rarely instead (reference counting still frees everything at once). A young generation
    # of 50k objects still cost ~11%: a 5,000-event batch holds ~10 container objects per event
    # alive until it ends, so it crossed 50k every batch and each collection walked them all
    # (75 collections, 1.5 s of 11 s). At 500k a collection comes every few seconds at full
    # rate (0.2-0.5 s in all over the same run; one pause of up to ~0.2 s).
    gc.set_threshold(500_000, 20, 1_000)
    worker = StreamWorker(settings)
    log.info("per-event modules: %s", _compiled.build())

    def handler(signum: int, frame: object) -> None:
        worker.stop()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGUSR1, lambda signum, frame: worker.stats.reset_freshness())
    try:
        worker.run(max_seconds=args.max_seconds)
    except StateMismatch as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    return 0


def _cmd_produce(args: argparse.Namespace) -> int:
    from streams.producer import run_produce

    return run_produce(args, _settings(args))


def _cmd_inspect(args: argparse.Namespace) -> int:
    from streams.inspect import run_inspect

    return run_inspect(args, _settings(args))


def _cmd_demo(args: argparse.Namespace) -> int:
    from streams.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser."""
    parser = argparse.ArgumentParser(prog="freshrec", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("broker", help="run the embedded Tansu broker and create the topics")
    p.add_argument("--port", type=int, default=9092)
    p.add_argument("--partitions", type=int)
    p.set_defaults(func=_cmd_broker)

    p = sub.add_parser("worker", help="run a stream worker")
    _add_common(p)
    p.add_argument("--group-id", dest="group_id")
    p.add_argument("--stats-path", dest="stats_path", help="write a JSON stats snapshot here every second")
    p.add_argument("--reset-state", action="store_true", help="delete local shards first")
    p.add_argument("--max-seconds", type=float, default=None)
    p.set_defaults(func=_cmd_worker)

    p = sub.add_parser("produce", help="produce events from a file or a synthetic generator")
    _add_common(p)
    from streams.producer import add_arguments as add_produce

    add_produce(p)
    p.set_defaults(func=_cmd_produce)

    p = sub.add_parser("inspect", help="read user/item state from the local stores")
    _add_common(p)
    from streams.inspect import add_arguments as add_inspect

    add_inspect(p)
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("demo", help="broker + worker + API + demo event stream, all on 127.0.0.1")
    from streams.demo import add_arguments as add_demo

    add_demo(p)
    p.set_defaults(func=_cmd_demo)

    for module in ("replay.cli", "serving.cli"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``freshrec`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
