"""``freshrec serve``: run the recommendation API (uvicorn, uvloop + httptools, one socket write per response)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

__all__ = ["register", "run_serve", "build_settings"]

log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    """Add the ``serve`` subcommand to the ``freshrec`` parser's subparsers."""
    p = sub.add_parser("serve", help="run the recommendation API over the live state")
    p.add_argument("--bootstrap-servers", help="Kafka bootstrap servers (default: FRESHREC_BOOTSTRAP_SERVERS)")
    p.add_argument("--partitions", type=int, help="partitions of the changelog topics")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--snapshot-dir", help="load/save HNSW index snapshots here")
    p.add_argument("--no-impressions", action="store_true", help="do not log served slates to the impressions topic")
    p.set_defaults(func=run_serve)


def build_settings(args: argparse.Namespace) -> Any:
    """ServingSettings from the environment, overridden by command-line flags."""
    from serving.settings import ServingSettings

    base = ServingSettings()
    top: dict[str, Any] = {}
    if args.bootstrap_servers:
        top["bootstrap_servers"] = args.bootstrap_servers
    if args.partitions:
        top["partitions"] = args.partitions
    serving: dict[str, Any] = {}
    if args.host:
        serving["host"] = args.host
    if args.port is not None:
        serving["port"] = args.port
    if args.no_impressions:
        serving["log_impressions"] = False
    if args.snapshot_dir:
        serving["index"] = base.serving.index.model_copy(update={"snapshot_dir": args.snapshot_dir})
    if serving:
        top["serving"] = base.serving.model_copy(update=serving)
    return base.model_copy(update=top)


def run_serve(args: argparse.Namespace) -> int:
    """Run the API until interrupted."""
    import uvicorn

    from serving.app import create_app
    from serving.http import CoalescingHttpToolsProtocol

    settings = build_settings(args)
    opts = settings.serving
    log.info("serving on http://%s:%d (broker %s)", opts.host, opts.port, settings.bootstrap_servers)
    uvicorn.run(
        create_app(settings),
        host=opts.host,
        port=opts.port,
        loop="uvloop",
        http=CoalescingHttpToolsProtocol,  # httptools, one socket write per response (serving/http.py)
        log_level="warning",
        access_log=False,
    )
    return 0
