"""Bytes-level state stores, one per (stage, shard), chosen by URL.

``memory://`` is for tests and replay; ``rocksdb:///path`` is the live default.
Typed encoding sits above this layer (:mod:`streams.core.serde`), the way Faust
splits ``SerializedStore`` from its drivers.

Layout inside one shard store:

* ``b"k" + key``: a state value (user or item, per the shard's stage).
* ``b"\\x00off:" + topic:partition``: the next input offset to read; written in
  the same atomic batch as the states it produced, which is what makes restarts
  exactly-once without broker transactions.
* ``b"\\x00src:" + partition``: (item stage) the highest source offset applied
  per user-stage partition, to drop forwards re-sent after a user-stage crash.
* ``b"\\x00cluster"``: the broker cluster/log identity the shard was built from.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from streams.errors import StoreError

__all__ = ["Store", "MemoryStore", "RocksStore", "open_store", "STATE_PREFIX", "META_PREFIX", "shard_path"]

STATE_PREFIX = b"k"
META_PREFIX = b"\x00"

#: hash buckets of a RocksDB memtable (8 bytes each: 512 KiB a shard; a shard holds ~users / partitions keys)
MEMTABLE_BUCKETS = 1 << 16

#: old WAL files a shard keeps for reuse (RocksDB ``recycle_log_file_num``; see ``RocksStore.__init__``)
WAL_RECYCLE = 2


class Store(Protocol):
    """What a shard store offers. Writes are atomic per call to :meth:`write`."""

    def get(self, key: bytes) -> bytes | None:
        """One value, or None."""

    def multi_get(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Many values, in order."""

    def write(self, puts: Mapping[bytes, bytes], deletes: Sequence[bytes] = (), sync: bool = False) -> None:
        """Apply ``puts`` and ``deletes`` atomically."""

    def scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """All (key, value) pairs whose key starts with ``prefix``, in key order."""

    def close(self) -> None:
        """Release the store."""


class MemoryStore:
    """A dict-backed store for tests and replay."""

    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}

    def get(self, key: bytes) -> bytes | None:
        """One value, or None."""
        return self._data.get(key)

    def multi_get(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Many values, in order."""
        data = self._data
        return [data.get(k) for k in keys]

    def write(self, puts: Mapping[bytes, bytes], deletes: Sequence[bytes] = (), sync: bool = False) -> None:
        """Apply ``puts`` and ``deletes`` (atomic: nothing else runs in between)."""
        self._data.update(puts)
        for key in deletes:
            self._data.pop(key, None)

    def scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """All (key, value) pairs under ``prefix``, in key order."""
        for key in sorted(k for k in self._data if k.startswith(prefix)):
            yield key, self._data[key]

    def close(self) -> None:
        """Nothing to release."""


class RocksStore:
    """A RocksDB shard (rocksdict in raw-bytes mode: the pickle mode is 10x slower)."""

    def __init__(self, path: str | os.PathLike[str], read_only: bool = False) -> None:
        import rocksdict  # imported here so replay and unit tests never need it

        self._rocksdict = rocksdict
        Path(path).mkdir(parents=True, exist_ok=True)
        opts = rocksdict.Options(raw_mode=True)
        opts.create_if_missing(True)
        opts.increase_parallelism(2)
        # The memtable is a hash table of short sorted lists, one bucket per whole key (the no-op prefix
        # extractor), not one skiplist: a put costs a hash and a list insert instead of a search of the
        # whole skiplist (~30 key comparisons at 50k entries). Counted with callgrind: a put 11.1k -> 6.5k
        # instructions, a multi_get key 8.4k -> 4.4k, a scanned key 5.0k -> 10.6k (every total-order
        # iterator sorts a copy of the memtable: scans run when a shard opens, in inspect and snapshots,
        # and the flush's sort runs on RocksDB's thread, not the worker's). A bucket past 256 entries
        # (a key rewritten that often before a flush) becomes a skiplist by itself. Durability and
        # atomicity are untouched: the same WAL record per WriteBatch, the same sequence-number
        # visibility. Hash memtables take no concurrent inserts; a shard has one writer anyway.
        opts.set_allow_concurrent_memtable_write(False)
        # Reuse old WAL files instead of creating new ones: on these VMs a page-cache page that is new to
        # the guest costs ~16x the CPU of overwriting one still cached (benchmarks/page_cache_writes.py:
        # appends 4.06 ms of CPU a MB once ~2 GB are written, overwrites 0.25), and the WAL write runs on
        # the worker's loop thread. Measured with strace during ingest's live phase: WAL appends at ~150 MB/s
        # into a fresh file, ~1.9 GB/s into recycled ones. Point-in-time recovery (the default) is kept.
        opts.set_recycle_log_file_num(WAL_RECYCLE)
        opts.set_prefix_extractor(rocksdict.SliceTransform.create_noop())
        opts.set_memtable_factory(rocksdict.MemtableFactory.hash_link_list(MEMTABLE_BUCKETS))  # type: ignore[call-arg]  # its stub omits the argument
        # With a prefix extractor, an iterator defaults to prefix mode, where a seek sees only the keys
        # of the sought key's prefix (here: that one key): every iterator must ask for total order.
        self._total_order = rocksdict.ReadOptions()
        self._total_order.set_total_order_seek(True)
        try:
            if read_only:
                self._db = rocksdict.Rdict(str(path), options=opts, access_type=rocksdict.AccessType.read_only())
            else:
                self._db = rocksdict.Rdict(str(path), options=opts)
        except Exception as exc:  # rocksdict raises plain Exception subclasses
            raise StoreError(f"cannot open RocksDB store at {path}: {exc}") from exc
        self.path = str(path)

    def get(self, key: bytes) -> bytes | None:
        """One value, or None."""
        value: bytes | None = self._db.get(key)
        return value

    def multi_get(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Many values, in order (one RocksDB MultiGet)."""
        if not keys:
            return []
        values: list[bytes | None] = self._db.get(list(keys))  # type: ignore[assignment]  # rocksdict is untyped
        return values

    def write(self, puts: Mapping[bytes, bytes], deletes: Sequence[bytes] = (), sync: bool = False) -> None:
        """Apply ``puts`` and ``deletes`` in one WriteBatch (atomic, one WAL write)."""
        wb = self._rocksdict.WriteBatch(raw_mode=True)
        put = wb.put  # (bound once: ~1.5 puts an event)
        for key, value in puts.items():
            put(key, value)
        for key in deletes:
            wb.delete(key)
        wo = self._rocksdict.WriteOptions()
        wo.sync = sync
        self._db.write(wb, wo)

    def scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """All (key, value) pairs under ``prefix``, in key order."""
        it = self._db.iter(self._total_order)  # (not prefix mode: see __init__)
        it.seek(prefix)
        while it.valid():
            key = it.key()
            if not key.startswith(prefix):
                break
            yield key, it.value()
            it.next()
        del it

    def close(self) -> None:
        """Flush and close the database."""
        self._db.close()


def shard_path(root: str | os.PathLike[str], stage: str, partition: int) -> Path:
    """Directory of one shard store."""
    return Path(root) / f"{stage}-{partition:03d}"


def open_store(url: str, stage: str, partition: int, read_only: bool = False) -> Store:
    """Open the store of ``(stage, partition)`` under ``url`` (``memory://`` or ``rocksdb:///dir``)."""
    parsed = urlparse(url)
    if parsed.scheme == "memory":
        return MemoryStore()
    if parsed.scheme == "rocksdb":
        root = (parsed.netloc + parsed.path) or "."
        return RocksStore(shard_path(root, stage, partition), read_only=read_only)
    raise StoreError(f"unknown store URL {url!r}: use memory:// or rocksdb:///path")
