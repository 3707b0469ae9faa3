"""``freshrec inspect``: read user and item state straight from the local RocksDB shards.

Opens shards read-only, so it works while a worker is running (it sees the state
as of the moment it opened them).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import orjson

from streams.config import Settings
from streams.core import serde
from streams.core.partition import partition_for
from streams.core.state import item_features, user_features
from streams.store import META_PREFIX, STATE_PREFIX, open_store, shard_path

__all__ = ["read_user", "read_item", "shard_summary", "add_arguments", "run_inspect"]


def read_user(settings: Settings, user_id: str) -> dict[str, Any] | None:
    """The user's features and vector norm, or None if the user is unknown."""
    p = partition_for(user_id, settings.partitions)
    if not shard_path(settings.data_dir, "user", p).exists():
        return None
    store = open_store(settings.store_url, "user", p, read_only=True)
    try:
        raw = store.get(STATE_PREFIX + user_id.encode())
    finally:
        store.close()
    if raw is None:
        return None
    state = serde.decode_user(raw)
    out = user_features(state)
    out.update(shard=p, version=state.version, embedding_steps=state.steps,
               vector_norm=None if state.vector is None else float((state.vector**2).sum() ** 0.5))  # fmt: skip
    return out


def read_item(settings: Settings, item_id: str, now_us: int) -> dict[str, Any] | None:
    """The item's read-time features (as of ``now_us``), or None if unknown."""
    p = partition_for(item_id, settings.partitions)
    if not shard_path(settings.data_dir, "item", p).exists():
        return None
    store = open_store(settings.store_url, "item", p, read_only=True)
    try:
        raw = store.get(STATE_PREFIX + item_id.encode())
    finally:
        store.close()
    if raw is None:
        return None
    state = serde.decode_item(raw)
    out: dict[str, Any] = dict(item_features(state, now_us, settings.model.core()))
    out.update(shard=p, version=state.version, eligible=state.eligible, category=state.category,
               embedding_steps=state.steps)  # fmt: skip
    return out


def shard_summary(settings: Settings) -> list[dict[str, Any]]:
    """Per shard: number of keys and the stored input offsets."""
    rows = []
    for stage in ("user", "item"):
        for p in range(settings.partitions):
            if not shard_path(settings.data_dir, stage, p).exists():
                continue
            store = open_store(settings.store_url, stage, p, read_only=True)
            try:
                keys = sum(1 for _ in store.scan(STATE_PREFIX))
                meta = {k[1:].decode(): v.decode() for k, v in store.scan(META_PREFIX)}
            finally:
                store.close()
            rows.append({"stage": stage, "partition": p, "keys": keys, "meta": meta})
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``freshrec inspect``."""
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--user", help="a user id")
    what.add_argument("--item", help="an item id")
    what.add_argument("--shards", action="store_true", help="summarise every local shard")


def run_inspect(args: argparse.Namespace, settings: Settings) -> int:
    """Run ``freshrec inspect``; prints JSON. Exit code 1 when the key is unknown."""
    result: Any
    if args.shards:
        result = shard_summary(settings)
    elif args.user:
        result = read_user(settings, args.user)
    else:
        result = read_item(settings, args.item, int(time.time() * 1_000_000))
    if result is None:
        print(orjson.dumps({"error": "not found"}).decode())
        return 1
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    return 0
