"""One contract, both stores (memory:// and rocksdb://)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.errors import StoreError
from streams.store import MemoryStore, RocksStore, Store, open_store


@pytest.fixture(params=["memory", "rocksdb"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    url = "memory://" if request.param == "memory" else f"rocksdb://{tmp_path}/db"
    s = open_store(url, "user", 0)
    yield s
    s.close()


def test_get_put_delete(store: Store) -> None:
    assert store.get(b"ka") is None
    store.write({b"ka": b"1", b"kb": b"2"})
    assert store.get(b"ka") == b"1"
    store.write({b"kc": b"3"}, deletes=[b"ka"])
    assert store.multi_get([b"ka", b"kb", b"kc"]) == [None, b"2", b"3"]


def test_scan_is_prefix_bounded_and_ordered(store: Store) -> None:
    store.write({b"kb": b"2", b"ka": b"1", b"\x00off:t:0": b"9", b"l": b"x"})
    assert list(store.scan(b"k")) == [(b"ka", b"1"), (b"kb", b"2")]
    assert list(store.scan(b"\x00")) == [(b"\x00off:t:0", b"9")]


def test_rocksdb_survives_reopen(tmp_path: Path) -> None:
    s = open_store(f"rocksdb://{tmp_path}/db", "item", 2)
    s.write({b"kx": b"v"}, sync=True)
    s.close()
    s = open_store(f"rocksdb://{tmp_path}/db", "item", 2, read_only=True)
    assert s.get(b"kx") == b"v"
    s.close()
    assert (tmp_path / "db" / "item-002").is_dir()


def test_unknown_url_is_a_clear_error() -> None:
    with pytest.raises(StoreError, match="unknown store URL"):
        open_store("redis://x", "user", 0)


# -- the RocksDB store against the dict oracle: its hash memtable must not change what reads see ---------

_KEYS = st.binary(min_size=0, max_size=6).map(lambda b: b"k" + b) | st.sampled_from(
    [b"\x00off:events:0", b"\x00off:events:10", b"\x00src:1", b"\x00src:65537", b"\x00epoch", b"l", b"kk"]
)
_BATCHES = st.lists(
    st.tuples(st.dictionaries(_KEYS, st.binary(max_size=40), max_size=12), st.lists(_KEYS, max_size=3)), max_size=8
)


def _agree(rocks: Store, memory: Store, keys: list[bytes]) -> None:
    assert rocks.multi_get(keys) == memory.multi_get(keys)
    assert [rocks.get(k) for k in keys] == [memory.get(k) for k in keys]
    for prefix in (b"", b"k", b"k\x00", b"\x00", b"\x00off:", b"\x00src:", b"kk", b"l", b"m"):
        assert list(rocks.scan(prefix)) == list(memory.scan(prefix)), prefix


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=_BATCHES, second=_BATCHES, flush=st.booleans())
def test_rocksdb_reads_as_a_dict_across_memtable_sst_and_reopen(
    tmp_path: Path, first: list[tuple[dict[bytes, bytes], list[bytes]]],
    second: list[tuple[dict[bytes, bytes], list[bytes]]], flush: bool,
) -> None:  # fmt: skip
    """Point reads and prefix scans equal a dict's, whether the values sit in the memtable, in an SST
    file (``flush``) or in the memtable rebuilt from the WAL on reopen, and across versions of a key."""
    path = tmp_path / f"db-{uuid.uuid4().hex}"
    memory = MemoryStore()
    rocks = RocksStore(path)
    try:
        for puts, deletes in first:
            rocks.write(puts, deletes)
            memory.write(puts, deletes)
        if flush:
            rocks._db.flush()  # (the memtable into an SST: reads then merge both)
        for puts, deletes in second:
            rocks.write(puts, deletes)
            memory.write(puts, deletes)
        keys = sorted({k for batch in (*first, *second) for k in (*batch[0], *batch[1])}) + [b"k", b"absent"]
        _agree(rocks, memory, keys)
    finally:
        rocks.close()
    rocks = RocksStore(path, read_only=True)  # the memtable replayed from the WAL
    try:
        _agree(rocks, memory, keys)
    finally:
        rocks.close()


def test_rocksdb_scan_sees_every_key_of_a_prefix_in_a_large_shard(tmp_path: Path) -> None:
    """Many keys, several versions each, in the memtable and in SST files: a scan returns each key once, the
    newest value, in key order (an iterator in prefix mode would see only the sought key's own bucket)."""
    rocks = RocksStore(tmp_path / "db")
    try:
        for version in range(3):
            rocks.write({b"ku%05d" % i: b"%d:%d" % (i, version) for i in range(0, 20000, 1 + version)})
            rocks.write({b"\x00src:%d" % s: b"%d" % version for s in range(5)})
            if version == 1:
                rocks._db.flush()
        got = list(rocks.scan(b"k"))
        newest = {i: 2 if i % 3 == 0 else 1 if i % 2 == 0 else 0 for i in range(20000)}
        assert got == [(b"ku%05d" % i, b"%d:%d" % (i, v)) for i, v in newest.items()]
        assert [k for k, _ in rocks.scan(b"\x00src:")] == [b"\x00src:%d" % s for s in range(5)]
        assert rocks.multi_get([b"ku00006", b"ku00001", b"ku99999"]) == [b"6:2", b"1:0", None]
    finally:
        rocks.close()
