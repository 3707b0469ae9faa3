"""``freshrec demo``: the whole system on 127.0.0.1 in one command.

Starts the embedded Tansu broker, creates the topics, starts a stream worker and
the recommendation API as subprocesses, then plays a synthetic event stream into
the ``events`` topic and prints the URL to open. Ctrl-C stops everything.

The embedded broker keeps its log in memory, so every demo starts a fresh log and
therefore resets the demo's local state (under ``.freshrec/demo``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from streams.broker import EmbeddedBroker, ensure_topics, free_port, wait_for_port
from streams.config import Settings
from streams.producer import make_producer, produce_records, slate_sessions

__all__ = ["add_arguments", "run_demo"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``freshrec demo``."""
    p.add_argument("--broker-port", type=int, default=9092)
    p.add_argument("--api-port", type=int, default=8000)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--rate", type=float, default=200.0, help="demo events per second")
    p.add_argument("--users", type=int, default=2_000)
    p.add_argument("--items", type=int, default=1_000)
    p.add_argument("--data-dir", default=".freshrec/demo")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo until Ctrl-C (or ``--duration``)."""
    broker_port = args.broker_port if _port_free(args.broker_port) else free_port()
    api_port = args.api_port if _port_free(args.api_port) else free_port()
    Path(args.data_dir).mkdir(parents=True, exist_ok=True)
    broker = EmbeddedBroker(port=broker_port, log_path=str(Path(args.data_dir) / "tansu.log")).start()
    settings = Settings(bootstrap_servers=broker.bootstrap, partitions=args.partitions, data_dir=args.data_dir)
    procs: list[subprocess.Popen[bytes]] = []
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    try:
        ensure_topics(settings)
        common = ["--bootstrap-servers", broker.bootstrap, "--partitions", str(args.partitions)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "streams.cli", "worker", *common, "--data-dir", args.data_dir,
                 "--reset-state", "--stats-path", str(Path(args.data_dir) / "worker-stats.json")],
                env=env,
            )
        )  # fmt: skip
        has_api = importlib.util.find_spec("serving.cli") is not None
        if has_api:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "streams.cli", "serve", *common, "--host", "127.0.0.1",
                     "--port", str(api_port)],
                    env=env,
                )
            )  # fmt: skip
        producer = make_producer(broker.bootstrap)

        def play() -> None:
            step = int(1_000_000 / args.rate)
            now_us = int(time.time() * 1_000_000)
            records = slate_sessions(10**9, args.users, args.items, seed=1, start_us=now_us, step_us=step)
            produce_records(producer, settings.topics.events, _until(records, stop), rate=args.rate)

        player = threading.Thread(target=play, name="demo-stream", daemon=True)
        player.start()
        base = f"http://127.0.0.1:{api_port}"
        if has_api:
            wait_for_port("127.0.0.1", api_port, 120)
        print("\n" + "=" * 72)
        print(f" freshrec demo is running: broker {broker.bootstrap}, {args.rate:.0f} events/s")
        if has_api:
            print(f" open  {base}/docs")
            print(f" try   {base}/v1/recommendations?user_id=u42&k=10")
        print(f" state .venv/bin/freshrec inspect --data-dir {args.data_dir} --user u42")
        print(" Ctrl-C stops everything")
        print("=" * 72 + "\n", flush=True)
        deadline = None if args.duration is None else time.monotonic() + args.duration
        while not stop.is_set():
            if deadline is not None and time.monotonic() > deadline:
                break
            for proc in procs:
                if proc.poll() is not None:
                    print(f"error: a demo process exited with code {proc.returncode}", file=sys.stderr)
                    return 1
            time.sleep(0.5)
        stop.set()
        player.join(10)
        return 0
    finally:
        stop.set()
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        broker.stop()


def _until(records, stop: threading.Event):  # type: ignore[no-untyped-def]
    for rec in records:
        if stop.is_set():
            return
        yield rec
