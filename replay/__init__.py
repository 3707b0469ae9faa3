"""Offline replay: event logs through the same pure state logic as the live worker.

* :mod:`replay.readers`: JSONL, Parquet, MovieLens and Kafka offset ranges as ``LogRecord`` streams.
* :mod:`replay.replayer`: ``replay_records`` (no broker, no RocksDB).
* :mod:`replay.snapshot`: per-shard snapshots, feature checksums, the key-by-key verify.
* :mod:`replay.parity`: live worker vs replay on the same log.
* :mod:`replay.cli`: ``freshrec replay ...``.

Nothing is imported here, so ``import replay.x`` pulls in only what ``x`` needs.
"""

__all__: list[str] = []
