"""One contract, both stores (memory:// and rocksdb://)."""

from __future__ import annotations

from pathlib import Path

import pytest

from streams.errors import StoreError
from streams.store import Store, open_store


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
