"""Snapshots of user/item state per shard, their checksums, and the key-by-key verify.

A snapshot directory holds, per stage and shard ``p`` (``partition_for(id, partitions)``),
a Parquet file ``user-000.parquet`` / ``item-000.parquet`` with columns ``key`` (the id)
and ``value`` (the :mod:`streams.core.serde` encoding, vectors included), plus
``first_touch.parquet`` (the first log record that touched each key, for "first
diverging event") and ``manifest.json``::

    {"format": 1, "partitions": 4, "config": {...CoreConfig...},
     "shards": {"user": [{"partition": 0, "count": 12, "sha256": "..."}, ...], "item": [...]},
     "checksum": "<sha256 over the shard checksums>", "events": ..., "dlq": {"bad_json": 3, ...}}

A shard's checksum is the sha256 over its keys in byte order, each contributing
``len(key) | key | len(digest) | digest`` where the digest is ``serde.user_digest`` /
``item_digest``: the deterministic features only (vectors and offsets excluded, see
ARCHITECTURE.md "Determinism"). The same log and config therefore give the same
checksums, and live and replay give the same checksums when they agree.

:func:`compare` is the verify: keys missing on either side, differing feature
digests, vectors outside a :class:`VectorTolerance`, and the first diverging
event (the earliest record in replay order that touched a differing key).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from replay.readers import ReplayInputError
from replay.replayer import FirstTouch, ReplayResult
from streams.core import serde
from streams.core.partition import partition_for
from streams.core.state import CoreConfig, ItemState, UserState, Vec
from streams.store import STATE_PREFIX, open_store, shard_path

__all__ = [
    "STAGES",
    "SNAPSHOT_FORMAT",
    "Snapshot",
    "VectorTolerance",
    "KeyDiff",
    "VerifyReport",
    "snapshot_from_result",
    "write_snapshot",
    "load_snapshot",
    "load_live_snapshot",
    "shard_checksum",
    "compare",
]

STAGES = ("user", "item")
SNAPSHOT_FORMAT = 1
_LEN = struct.Struct("<I")


@dataclass
class Snapshot:
    """Encoded states per stage and shard, with provenance.

    ``shards[stage][p]`` maps an id to its serde-encoded state value.
    """

    partitions: int
    config: dict[str, Any]
    shards: dict[str, list[dict[str, bytes]]]
    #: ("user"|"item", id) -> first record that touched it (empty for live snapshots)
    first_touch: dict[tuple[str, str], FirstTouch] = field(default_factory=dict)
    events: int | None = None
    dlq: dict[str, int] = field(default_factory=dict)
    source: str = ""

    def checksums(self) -> dict[str, list[str]]:
        """Per stage, the sha256 of every shard (see the module docs)."""
        return {stage: [shard_checksum(stage, shard) for shard in self.shards[stage]] for stage in STAGES}

    def checksum(self) -> str:
        """One sha256 over every shard checksum (stage by stage, shard by shard)."""
        h = hashlib.sha256()
        for stage, sums in self.checksums().items():
            for p, s in enumerate(sums):
                h.update(f"{stage}:{p}:{s}\n".encode())
        return h.hexdigest()

    def counts(self) -> dict[str, int]:
        """Number of keys per stage."""
        return {stage: sum(len(s) for s in self.shards[stage]) for stage in STAGES}

    def manifest(self) -> dict[str, Any]:
        """The JSON manifest of this snapshot."""
        sums = self.checksums()
        return {
            "format": SNAPSHOT_FORMAT,
            "partitions": self.partitions,
            "config": self.config,
            "source": self.source,
            "events": self.events,
            "dlq": dict(sorted(self.dlq.items())),
            "counts": self.counts(),
            "shards": {
                stage: [
                    {"partition": p, "count": len(self.shards[stage][p]), "sha256": sums[stage][p]}
                    for p in range(self.partitions)
                ]
                for stage in STAGES
            },
            "checksum": self.checksum(),
        }


def _digest(stage: str, value: bytes) -> bytes:
    if stage == "user":
        return serde.user_digest(serde.decode_user(value))
    return serde.item_digest(serde.decode_item(value))


def shard_checksum(stage: str, shard: Mapping[str, bytes]) -> str:
    """sha256 over the shard's (key, feature digest) pairs in key byte order."""
    h = hashlib.sha256()
    for key in sorted(shard, key=str.encode):
        k = key.encode()
        d = _digest(stage, shard[key])
        h.update(_LEN.pack(len(k)) + k + _LEN.pack(len(d)) + d)
    return h.hexdigest()


def _empty_shards(partitions: int) -> dict[str, list[dict[str, bytes]]]:
    return {stage: [{} for _ in range(partitions)] for stage in STAGES}


def snapshot_from_result(result: ReplayResult, cfg: CoreConfig, partitions: int, source: str = "") -> Snapshot:
    """Encode a replay's states into shards by ``partition_for(id, partitions)``."""
    shards = _empty_shards(partitions)
    states: tuple[tuple[str, Mapping[str, UserState] | Mapping[str, ItemState]], ...] = (
        ("user", result.users),
        ("item", result.items),
    )
    for stage, table in states:
        out = shards[stage]
        for key, state in table.items():
            value = serde.encode_user(state) if stage == "user" else serde.encode_item(state)  # type: ignore[arg-type]
            out[partition_for(key, partitions)][key] = value
    return Snapshot(
        partitions=partitions,
        config=dataclasses.asdict(cfg),
        shards=shards,
        first_touch=dict(result.first_touch),
        events=result.events,
        dlq=result.dlq_counts(),
        source=source,
    )


def write_snapshot(snap: Snapshot, out_dir: str | Path) -> dict[str, Any]:
    """Write ``snap`` under ``out_dir`` (created); returns the manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stage in STAGES:
        for p, shard in enumerate(snap.shards[stage]):
            keys = sorted(shard, key=str.encode)
            table = pa.table(
                {"key": pa.array(keys, pa.string()), "value": pa.array([shard[k] for k in keys], pa.binary())}
            )
            pq.write_table(table, out / f"{stage}-{p:03d}.parquet")
    touches = sorted(snap.first_touch.items(), key=lambda kv: kv[1].seq)
    pq.write_table(
        pa.table(
            {
                "stage": pa.array([k[0] for k, _ in touches], pa.string()),
                "key": pa.array([k[1] for k, _ in touches], pa.string()),
                "seq": pa.array([t.seq for _, t in touches], pa.int64()),
                "partition": pa.array([t.partition for _, t in touches], pa.int32()),
                "offset": pa.array([t.offset for _, t in touches], pa.int64()),
                "event_id": pa.array([t.event_id for _, t in touches], pa.string()),
            }
        ),
        out / "first_touch.parquet",
    )
    manifest = snap.manifest()
    (out / "manifest.json").write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2) + b"\n")
    return manifest


def load_snapshot(snap_dir: str | Path) -> Snapshot:
    """Read a snapshot written by :func:`write_snapshot`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(snap_dir)
    try:
        manifest = orjson.loads((root / "manifest.json").read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ReplayInputError(f"{root}: not a replay snapshot (no readable manifest.json): {exc}") from exc
    if manifest.get("format") != SNAPSHOT_FORMAT:
        raise ReplayInputError(f"{root}: snapshot format {manifest.get('format')} is not {SNAPSHOT_FORMAT}")
    partitions = int(manifest["partitions"])
    shards = _empty_shards(partitions)
    try:
        for stage in STAGES:
            for p in range(partitions):
                table = pq.read_table(root / f"{stage}-{p:03d}.parquet")
                keys, values = table.column("key").to_pylist(), table.column("value").to_pylist()
                shards[stage][p] = dict(zip(keys, values, strict=True))
        first: dict[tuple[str, str], FirstTouch] = {}
        path = root / "first_touch.parquet"
        if path.exists():
            for row in pq.read_table(path).to_pylist():
                touch = FirstTouch(row["seq"], row["partition"], row["offset"], row["event_id"])
                first[row["stage"], row["key"]] = touch
    except (pa.ArrowException, OSError, KeyError) as exc:
        raise ReplayInputError(f"{root}: unreadable snapshot shard: {exc}") from exc
    return Snapshot(
        partitions=partitions,
        config=manifest.get("config", {}),
        shards=shards,
        first_touch=first,
        events=manifest.get("events"),
        dlq=manifest.get("dlq", {}),
        source=manifest.get("source", ""),
    )


def load_live_snapshot(store_url: str, partitions: int, config: CoreConfig | None = None) -> Snapshot:
    """Read the live stores (``open_store(store_url, stage, p, read_only=True)`` per shard).

    Meta keys (``\\x00...``: offsets, source high-water marks, epoch) are skipped.
    """
    if store_url.startswith("rocksdb://"):
        root = store_url[len("rocksdb://") :] or "."
        for stage in STAGES:
            for p in range(partitions):
                if not shard_path(root, stage, p).is_dir():
                    raise ReplayInputError(f"{shard_path(root, stage, p)}: no live shard there (wrong --partitions?)")
            extra = shard_path(root, stage, partitions)
            if extra.is_dir():
                raise ReplayInputError(f"{extra}: the live stores have more than {partitions} shards; "
                                       "replay with the live partition count")  # fmt: skip
    shards = _empty_shards(partitions)
    for stage in STAGES:
        for p in range(partitions):
            store = open_store(store_url, stage, p, read_only=True)
            try:
                shards[stage][p] = {k[len(STATE_PREFIX) :].decode(): bytes(v) for k, v in store.scan(STATE_PREFIX)}
            finally:
                store.close()
    return Snapshot(
        partitions=partitions,
        config=dataclasses.asdict(config) if config is not None else {},
        shards=shards,
        source=store_url,
    )


@dataclass(frozen=True)
class VectorTolerance:
    """When two embeddings count as equal: cosine >= ``min_cosine`` and max |a-b| <= ``max_abs``.

    Embeddings are not bit-reproducible between live and replay (replica lag, damped
    steps depend on batch boundaries; ARCHITECTURE.md "Determinism"). The defaults come
    from the golden-log parity measurement documented in docs/REPLAY.md.
    """

    min_cosine: float = 0.95
    max_abs: float = 0.1

    def accepts(self, a: Vec | None, b: Vec | None) -> tuple[bool, float, float]:
        """(within tolerance, cosine, max abs difference) of two vectors (None = no vector)."""
        if a is None or b is None:
            same = a is None and b is None
            return same, 1.0 if same else 0.0, 0.0 if same else math.inf
        if a.shape != b.shape:
            return False, 0.0, math.inf
        if np.array_equal(a, b):
            return True, 1.0, 0.0
        x = a.astype(np.float64)
        y = b.astype(np.float64)
        max_abs = float(np.max(np.abs(x - y))) if len(x) else 0.0
        nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
        cos = 1.0 if nx == 0.0 and ny == 0.0 else (float(x @ y) / (nx * ny) if nx > 0 and ny > 0 else 0.0)
        return cos >= self.min_cosine and max_abs <= self.max_abs, cos, max_abs


@dataclass(frozen=True)
class KeyDiff:
    """One key that differs between the two sides."""

    stage: str
    key: str
    partition: int
    #: "only_left", "only_right", "features" or "vector"
    kind: str
    detail: str = ""


@dataclass
class VerifyReport:
    """The outcome of :func:`compare` (left = usually the replay, right = live or another snapshot)."""

    partitions: int
    checksums_left: dict[str, list[str]]
    checksums_right: dict[str, list[str]]
    counts_left: dict[str, int]
    counts_right: dict[str, int]
    diffs: list[KeyDiff] = field(default_factory=list)
    #: per stage: vectors compared, min cosine, max abs difference, mean abs difference
    vector_stats: dict[str, dict[str, float]] = field(default_factory=dict)
    first_diverging: tuple[str, str, FirstTouch] | None = None
    tolerance: VectorTolerance = field(default_factory=VectorTolerance)

    @property
    def checksums_equal(self) -> bool:
        """True when every shard's feature checksum is equal on both sides."""
        return self.checksums_left == self.checksums_right

    @property
    def ok(self) -> bool:
        """No missing keys, equal features, vectors within tolerance."""
        return not self.diffs and self.checksums_equal

    def by_kind(self) -> dict[str, int]:
        """Number of differing keys per kind."""
        out: dict[str, int] = {}
        for d in self.diffs:
            out[d.kind] = out.get(d.kind, 0) + 1
        return out

    def to_dict(self, max_diffs: int = 50) -> dict[str, Any]:
        """A JSON-able summary (at most ``max_diffs`` differing keys listed)."""
        first = None
        if self.first_diverging is not None:
            stage, key, t = self.first_diverging
            first = {"stage": stage, "key": key, "seq": t.seq, "partition": t.partition, "offset": t.offset,
                     "event_id": t.event_id}  # fmt: skip
        return {
            "ok": self.ok,
            "checksums_equal": self.checksums_equal,
            "partitions": self.partitions,
            "counts_left": self.counts_left,
            "counts_right": self.counts_right,
            "differences": self.by_kind(),
            "diffs": [dataclasses.asdict(d) for d in self.diffs[:max_diffs]],
            "vector_stats": self.vector_stats,
            "tolerance": dataclasses.asdict(self.tolerance),
            "first_diverging_event": first,
        }


def _decode(stage: str, value: bytes) -> UserState | ItemState:
    return serde.decode_user(value) if stage == "user" else serde.decode_item(value)


def compare(
    left: Snapshot,
    right: Snapshot,
    tolerance: VectorTolerance | None = None,
    first_touch: Mapping[tuple[str, str], FirstTouch] | None = None,
) -> VerifyReport:
    """Compare two snapshots key by key (see :class:`VerifyReport`).

    ``first_touch`` (default: the left snapshot's, then the right's) locates the
    first diverging event: the earliest-touched key among the differing ones.
    """
    tol = tolerance or VectorTolerance()
    if left.partitions != right.partitions:
        raise ReplayInputError(
            f"cannot compare {left.partitions} shards with {right.partitions}: replay with --partitions "
            f"{right.partitions}"
        )
    report = VerifyReport(
        partitions=left.partitions,
        checksums_left=left.checksums(),
        checksums_right=right.checksums(),
        counts_left=left.counts(),
        counts_right=right.counts(),
        tolerance=tol,
    )
    for stage in STAGES:
        cosines: list[float] = []
        abs_max: list[float] = []
        for p in range(left.partitions):
            a, b = left.shards[stage][p], right.shards[stage][p]
            for key in sorted(a.keys() | b.keys(), key=str.encode):
                va, vb = a.get(key), b.get(key)
                if vb is None:
                    report.diffs.append(KeyDiff(stage, key, p, "only_left"))
                    continue
                if va is None:
                    report.diffs.append(KeyDiff(stage, key, p, "only_right"))
                    continue
                sa, sb = _decode(stage, va), _decode(stage, vb)
                da = serde.user_digest(sa) if stage == "user" else serde.item_digest(sa)  # type: ignore[arg-type]
                db = serde.user_digest(sb) if stage == "user" else serde.item_digest(sb)  # type: ignore[arg-type]
                if da != db:
                    report.diffs.append(KeyDiff(stage, key, p, "features", _first_field_diff(stage, da, db)))
                    continue
                ok, cos, mabs = tol.accepts(sa.vector, sb.vector)
                if sa.vector is not None and sb.vector is not None:
                    cosines.append(cos)
                    abs_max.append(mabs)
                if not ok:
                    report.diffs.append(KeyDiff(stage, key, p, "vector", f"cosine {cos:.6f}, max |diff| {mabs:.6g}"))
        report.vector_stats[stage] = {
            "compared": float(len(cosines)),
            "min_cosine": min(cosines) if cosines else 1.0,
            "max_abs": max(abs_max) if abs_max else 0.0,
            "mean_max_abs": float(np.mean(abs_max)) if abs_max else 0.0,
        }
    touches = first_touch if first_touch is not None else (left.first_touch or right.first_touch)
    report.first_diverging = _first_diverging(report.diffs, touches)
    return report


_FIELDS = {
    "user": ("counts", "recent", "session", "seen", "max_ts", "steps", "version"),
    "item": ("counts", "b5", "b60", "max_ts", "eligible", "category", "steps", "version", "upsert_key"),
}


def _first_field_diff(stage: str, da: bytes, db: bytes) -> str:
    xa, xb = orjson.loads(da), orjson.loads(db)
    names = [n for n, a, b in zip(_FIELDS[stage], xa, xb, strict=False) if a != b]
    return "differs in " + ", ".join(names) if names else "digests differ"


def _first_diverging(
    diffs: Iterable[KeyDiff], touches: Mapping[tuple[str, str], FirstTouch]
) -> tuple[str, str, FirstTouch] | None:
    best: tuple[str, str, FirstTouch] | None = None
    for d in diffs:
        t = touches.get((d.stage, d.key))
        if t is not None and (best is None or t.seq < best[2].seq):
            best = (d.stage, d.key, t)
    return best
