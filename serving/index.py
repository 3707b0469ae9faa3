"""Sharded HNSW retrieval (hnswlib, inner product) for the serving API.

One :class:`HnswShard` per item partition (``partition_for(item_id, partitions)``), the
same sharding as the stream workers' item stage. :class:`ShardedIndex` is what the API
holds:

* **Writes are staged.** ``upsert``/``remove`` only record the latest change per item in a
  coalescing buffer (last write wins, whether upsert or remove). ``apply_pending`` applies
  the buffer in bulk, per shard, from a background thread. Updating one hnswlib label costs
  about 1 ms at 1M items (DESIGN.md), so embedding updates at tens of thousands of events/s
  cannot each touch the graph; ``pending`` and ``oldest_pending_age_s()`` say how stale the
  index may be. With ``min_move`` > 0 a live item whose vector moved less than that fraction
  of its length (compared with the vector the graph holds) keeps its graph position and only
  its exact-score copy is replaced.
* **Reads scatter-gather.** ``search`` asks every shard for its share of ``k`` (``shard_k``)
  plus twice the excluded items that live there plus a margin (or for ``rerank`` candidates
  if that is more), takes a copy of the candidates' stored float32 vectors, then scores the
  candidates of all shards *exactly* in one ``einsum``, sorts them once and reads the sorted
  list skipping excluded ids. Scores are therefore exact dot products, never hnswlib's
  ``1 - distance`` rounding.
* **Inner product, two graph options** (``benchmarks/ann.py``, 1M x 64, 4 shards, M=16,
  recall@100 at ef=100 / 200 / 400 / 800). Default (``mips=False``): hnswlib's own
  inner-product graph. It is robust when vector norms vary widely (popularity-driven
  embedding norms: cluster norms 0.5-2x gave 0.92 / 0.94 / 0.96 / 0.97) and fine with moderate
  variation (0.8-1.25x: 0.97 / 0.98 / 0.99 / 0.997), but degrades on tight clusters of
  nearly equal norms, where the slightly longer vectors become hubs (100k x 64, 64 such
  clusters, 4 shards: 0.56 at ef=100, 0.71 at ef=400; one index over 1024 such clusters:
  0.84 / 0.91 / 0.96 at ef=100 / 200 / 400).
  ``mips=True`` applies the MIPS-to-NN reduction: each shard indexes
  ``(x, sqrt(R^2 - |x|^2))`` and queries ``(q, 0)``, so every indexed vector has norm ``R``
  and the graph is a cosine graph, while ``(q, 0) . (x, .) = q . x`` keeps the ranking exact.
  It wins when norms are similar (0.98 / 0.996 / 0.9997 with 0.8-1.25x; 0.99 / 0.999 /
  1.0 on the one-index equal-norm case above) but collapses when they vary widely (0.47 / 0.56 / 0.76 / 0.89 with
  0.5-2x): short vectors crowd near the pole. Choose it only for norm-controlled vectors.
  ``R`` is ``norm_headroom`` x the longest vector a shard has seen while small (see
  ``_ADAPT_LIVE``; normally the bulk ``build``) unless ``max_norm`` fixes it; longer vectors
  later get 0 (counted in ``norm_overflow``; still searchable and exactly scored).
* **Re-ranking.** hnswlib keeps exact float32 vectors, so its ``k`` results are already the
  exact best ``k`` of its ``max(ef, k)`` beam; ``rerank=R`` is therefore equivalent to
  ``ef=max(ef, R)``. It is kept as the knob for "candidates per shard".
* **Labels.** Each shard maps string ids to dense int labels ``0, 1, 2, ...``; a label is
  never given to another id. Removing an item marks its label deleted; re-adding the id
  updates the same label in place (hnswlib ``add_items`` on an existing label unmarks it and
  updates its vector and links; the index is created with ``allow_replace_deleted=False``,
  so deleted slots are never recycled for other ids and the label map stays valid).
  Memory therefore grows with the number of distinct ids ever indexed, not with live items.
* **Snapshots.** ``save(dir, watermark)`` writes every shard (hnswlib file, id list, vector
  copy, manifest with params, counts and the caller's watermark, e.g. item-changelog offsets
  per partition) to a temporary directory and renames it into place, so the caller can load
  the snapshot and replay only the changes after the watermark.

Thread safety. The API calls ``search`` from the event-loop thread and ``apply_pending``
from a background thread. hnswlib's ``resize_index`` is never safe concurrently with
queries, and ``add_items`` concurrent with ``knn_query`` on one index is not thread-safe
(hnswlib README: ``add_items`` is "thread-safe with other add_items calls, but not with
knn_query"; the maintainer confirmed it for 0.8 in nmslib/hnswlib#562), so each shard has a
``threading.Lock`` held around every hnswlib call and every write (the id list and the
id->label dict are only appended to and the liveness array is only replaced by a larger
copy, so ``label_of`` and ``id_of`` read them without it). ``apply_pending`` sizes its
``add_items`` chunks from the measured cost per update so that one lock hold lasts about
``IndexParams.apply_hold_ms`` (an update costs ~0.7 ms at 1M items, so a fixed chunk of 64
would block a query for ~45 ms), and yields between chunks. hnswlib releases the GIL inside
``add_items`` and ``knn_query``, so a running apply does not stall the event loop itself.
Applies, builds and saves are serialized by a separate lock; staging has its own lock and
never waits for an apply.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np
import numpy.typing as npt

from streams.core.partition import partition_for

__all__ = ["IndexParams", "HnswShard", "ShardedIndex", "brute_force_topk", "SNAPSHOT_FORMAT"]

Vec = npt.NDArray[np.float32]
Labels = npt.NDArray[np.int64]

#: version of the on-disk snapshot layout
SNAPSHOT_FORMAT = 1
#: extra candidates asked of each shard beyond ``k`` plus the excluded items it holds
_MARGIN = 8
#: with ``mips`` and no fixed ``max_norm``, the radius still follows the data up to this many live items
_ADAPT_LIVE = 2048


@dataclass(frozen=True, slots=True)
class IndexParams:
    """HNSW parameters, shared by every shard.

    ``M``, ``ef_construction`` and ``space`` are baked into the graph; ``ef`` and ``rerank``
    are query-time settings and can be changed when a snapshot is loaded.
    """

    dim: int
    space: str = "ip"
    M: int = 16
    ef_construction: int = 200
    #: query-time beam width (hnswlib uses ``max(ef, candidates)``)
    ef: int = 200
    #: initial capacity of each shard; doubled by ``resize_index`` when full
    max_elements: int = 1024
    #: fetch this many HNSW candidates per shard and re-rank them exactly (0 = off;
    #: only used when larger than the per-shard candidate count a search needs anyway)
    rerank: int = 0
    #: hnswlib threads for bulk builds (``build``); applies and queries use 1
    threads: int = 1
    #: at most this many upserts per shard-lock hold in ``apply_pending``
    apply_chunk: int = 64
    #: skip the graph update of a live item whose vector moved by at most ``min_move`` x its old
    #: length (0 = skip only unchanged vectors); its exact-score copy is still replaced, so
    #: scores and ``item_vector`` stay exact and only its position in the graph lags
    min_move: float = 0.0
    #: target duration of one shard-lock hold in ``apply_pending`` (bounds how long a search waits)
    apply_hold_ms: float = 2.0
    random_seed: int = 100
    #: the MIPS-to-NN reduction: index ``(x, sqrt(R^2 - |x|^2))``, query ``(q, 0)``; same ranking,
    #: better graphs when norms are similar, much worse when they vary widely (module docstring)
    mips: bool = False
    #: the reduction's radius ``R``; None = ``norm_headroom`` x the largest norm a shard has
    #: seen while it was small (a later vector longer than ``R`` gets 0 and is counted in
    #: ``norm_overflow``: still indexed and exactly scored, but searched less well)
    max_norm: float | None = None
    norm_headroom: float = 1.0

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")
        if self.space != "ip":
            raise ValueError(f"only space='ip' (inner product) is supported, got {self.space!r}")
        if self.M < 2 or self.ef_construction < 1 or self.ef < 1:
            raise ValueError("M must be >= 2, ef_construction and ef >= 1")
        if self.max_norm is not None and not self.max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {self.max_norm}")
        if self.norm_headroom < 1:
            raise ValueError(f"norm_headroom must be >= 1, got {self.norm_headroom}")
        if self.min_move < 0:
            raise ValueError(f"min_move must be >= 0, got {self.min_move}")
        if not self.apply_hold_ms > 0:
            raise ValueError(f"apply_hold_ms must be > 0, got {self.apply_hold_ms}")
        if self.max_elements < 1 or self.threads < 1 or self.apply_chunk < 1 or self.rerank < 0:
            raise ValueError("max_elements, threads, apply_chunk must be >= 1 and rerank >= 0")

    def to_dict(self) -> dict[str, Any]:
        """The parameters as a JSON-able dict (for manifests)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], **overrides: Any) -> IndexParams:
        """Parameters from a manifest dict, with query-time ``overrides`` (e.g. ``ef``)."""
        # snapshots written before the MIPS reduction existed were raw inner-product graphs
        merged = {"mips": False, **data, **{k: v for k, v in overrides.items() if v is not None}}
        return cls(**merged)


def brute_force_topk(matrix: npt.ArrayLike, query: npt.ArrayLike, k: int) -> tuple[Labels, Vec]:
    """Exact top-``k`` rows of ``matrix`` by inner product with ``query``: the recall oracle.

    ``query`` is ``(dim,)`` or ``(n, dim)``; returns ``(rows, scores)`` shaped ``(k,)`` or
    ``(n, k)`` (``k`` clamped to the number of rows), best first.
    """
    m = np.asarray(matrix, dtype=np.float32)
    q = np.asarray(query, dtype=np.float32)
    single = q.ndim == 1
    q2 = q[None, :] if single else q
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    kk = min(k, m.shape[0])
    if kk == 0:
        rows = np.zeros((q2.shape[0], 0), dtype=np.int64)
        out = np.zeros((q2.shape[0], 0), dtype=np.float32)
    else:
        scores = q2 @ m.T
        part = (
            np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
            if kk < m.shape[0]
            else np.tile(np.arange(m.shape[0]), (q2.shape[0], 1))
        )
        ps = np.take_along_axis(scores, part, axis=1)
        order = np.argsort(-ps, axis=1, kind="stable")
        rows = np.take_along_axis(part, order, axis=1).astype(np.int64)
        out = np.take_along_axis(ps, order, axis=1)
    return (rows[0], out[0]) if single else (rows, out)


def _as_matrix(vectors: npt.ArrayLike, dim: int) -> Vec:
    """``vectors`` as a C-contiguous float32 ``(n, dim)`` matrix (a 1-D vector is one row)."""
    a = np.ascontiguousarray(vectors, dtype=np.float32)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] != dim:
        raise ValueError(f"expected vectors of dimension {dim}, got shape {np.shape(vectors)}")
    return a


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


class HnswShard:
    """One hnswlib inner-product index for one item shard, keyed by string ids.

    Not thread-safe by itself except through :attr:`lock`, which every public method takes.
    """

    def __init__(self, params: IndexParams) -> None:
        self.params = params
        #: held around every hnswlib call and every read/write of the label map and vectors
        self.lock = threading.Lock()
        self._radius: float | None = params.max_norm
        self._overflow = 0
        self._skipped = 0
        self._index = hnswlib.Index(space=params.space, dim=_index_dim(params))
        self._index.init_index(
            max_elements=params.max_elements,
            M=params.M,
            ef_construction=params.ef_construction,
            random_seed=params.random_seed,
            allow_replace_deleted=False,
        )
        self._index.set_ef(params.ef)
        self._label_of: dict[str, int] = {}
        self._ids: list[str] = []
        self._vectors: Vec = np.zeros((params.max_elements, params.dim), dtype=np.float32)
        self._alive = np.zeros(params.max_elements, dtype=bool)
        self._live = 0

    def __len__(self) -> int:
        """Live (not deleted) items."""
        return self._live

    @property
    def labels_used(self) -> int:
        """Labels ever assigned (live plus deleted)."""
        return len(self._ids)

    def __contains__(self, item_id: object) -> bool:
        """Whether ``item_id`` is live in this shard."""
        return isinstance(item_id, str) and self.label_of(item_id) is not None

    def set_ef(self, ef: int) -> None:
        """Change the query-time beam width."""
        with self.lock:
            self._index.set_ef(ef)

    def _grow(self, needed: int) -> None:
        """Make room for ``needed`` labels (lock held): double until it fits."""
        cap = self._vectors.shape[0]
        if needed <= cap:
            return
        new_cap = cap
        while new_cap < needed:
            new_cap *= 2
        self._index.resize_index(new_cap)
        vecs = np.zeros((new_cap, self.params.dim), dtype=np.float32)
        vecs[:cap] = self._vectors
        alive = np.zeros(new_cap, dtype=bool)
        alive[:cap] = self._alive
        self._vectors, self._alive = vecs, alive

    def upsert_many(self, ids: Sequence[str], vectors: npt.ArrayLike, *, num_threads: int = 1) -> None:
        """Insert or replace the vectors of ``ids`` (a repeated id: its last row wins)."""
        mat = _as_matrix(vectors, self.params.dim)
        if len(ids) != mat.shape[0]:
            raise ValueError(f"{len(ids)} ids for {mat.shape[0]} vectors")
        if len(ids) == 0:
            return
        last = {item: row for row, item in enumerate(ids)}
        if len(last) != len(ids):
            rows = np.fromiter(last.values(), dtype=np.int64, count=len(last))
            mat = mat[rows]
            ids = list(last)
        with self.lock:
            labels = np.empty(len(ids), dtype=np.int64)
            for j, item in enumerate(ids):
                label = self._label_of.get(item)
                if label is None:
                    label = len(self._ids)
                    self._label_of[item] = label
                    self._ids.append(item)
                labels[j] = label
            self._grow(len(self._ids))
            move = self._needs_move(mat, labels)
            if not move.all():
                self._skipped += int(np.count_nonzero(~move))
                self._vectors[labels[~move]] = mat[~move]  # exact scores use the new vector
                mat, labels = mat[move], labels[move]
            if labels.size:
                # an existing label (deleted or not) is updated in place: add_items unmarks it
                self._index.add_items(self._augment(mat, labels), labels, num_threads=num_threads)
                self._vectors[labels] = mat
            self._live += int(len(labels) - np.count_nonzero(self._alive[labels]))
            self._alive[labels] = True

    def _needs_move(self, mat: Vec, labels: Labels) -> npt.NDArray[np.bool_]:
        """Which rows need a graph update (lock held): new items, re-added ones, and live items
        that moved by more than ``min_move`` x their old length."""
        live = self._alive[labels]
        move = np.ones(len(labels), dtype=bool)
        if live.any():
            # compare with the vector the *graph* holds, not the exact copy, so that small moves
            # cannot add up unseen (get_items costs ~2 us per label, an update ~1 ms)
            old = np.asarray(self._index.get_items(labels[live]), dtype=np.float32)[:, : self.params.dim]
            dist = np.linalg.norm(mat[live] - old, axis=1)
            move[live] = dist > self.params.min_move * np.linalg.norm(old, axis=1)
        return move

    @property
    def skipped_updates(self) -> int:
        """Upserts of live items that did not move enough to touch the graph (see ``min_move``)."""
        return self._skipped

    def remove_many(self, ids: Iterable[str]) -> int:
        """Mark ``ids`` deleted; unknown or already removed ids are ignored. Returns the number removed."""
        removed = 0
        with self.lock:
            for item in ids:
                label = self._label_of.get(item)
                if label is None or not self._alive[label]:
                    continue
                self._index.mark_deleted(label)
                self._alive[label] = False
                removed += 1
            self._live -= removed
        return removed

    def vectors(self, ids: Sequence[str], out: Vec, rows: Sequence[int]) -> list[bool]:
        """Copy the vectors of live ``ids`` into ``out[rows]``; returns which were found."""
        found = []
        with self.lock:
            for item, row in zip(ids, rows, strict=True):
                label = self._label_of.get(item)
                ok = label is not None and bool(self._alive[label])
                if ok:
                    out[row] = self._vectors[label]
                found.append(ok)
        return found

    def vector(self, item_id: str) -> Vec | None:
        """A copy of the indexed vector of ``item_id`` (None when absent or removed)."""
        with self.lock:
            label = self._label_of.get(item_id)
            if label is None or not self._alive[label]:
                return None
            out: Vec = self._vectors[label].copy()
            return out

    @property
    def norm_overflow(self) -> int:
        """Upserted vectors longer than the MIPS radius so far (0 without ``mips``)."""
        return self._overflow

    @property
    def radius(self) -> float | None:
        """The MIPS reduction's radius ``R`` (None before the first upsert or without ``mips``)."""
        return self._radius

    def _augment(self, mat: Vec, labels: Labels) -> Vec:
        """Rows as indexed (lock held): with ``mips``, ``(x, sqrt(R^2 - |x|^2))``, all of norm ``R``.

        Without a fixed ``max_norm``, ``R`` follows the longest vector while the shard holds at
        most ``_ADAPT_LIVE`` live items (re-indexing those, cheap while small), so an index that
        starts empty does not freeze ``R`` at its first item; then it stays fixed.
        """
        if not self.params.mips:
            return mat
        sq = np.einsum("nd,nd->n", mat, mat, dtype=np.float64)
        top = float(np.sqrt(sq.max()))
        grow = self.params.max_norm is None and self._live <= _ADAPT_LIVE and top > (self._radius or 0.0)
        if self._radius is None or grow:
            self._radius = self.params.norm_headroom * top or 1.0
            others = np.setdiff1d(np.flatnonzero(self._alive[: len(self._ids)]), labels)
            if others.size:
                self._index.add_items(self._lift(self._vectors[others]), others, num_threads=1)
        return self._lift(mat, sq)

    def _lift(self, mat: Vec, sq: npt.NDArray[np.float64] | None = None) -> Vec:
        """Append ``sqrt(R^2 - |x|^2)`` (0 for a vector longer than ``R``, counted)."""
        if sq is None:
            sq = np.einsum("nd,nd->n", mat, mat, dtype=np.float64)
        assert self._radius is not None
        extra = self._radius**2 - sq
        self._overflow += int(np.count_nonzero(extra < 0))
        out = np.empty((mat.shape[0], mat.shape[1] + 1), dtype=np.float32)
        out[:, :-1] = mat
        out[:, -1] = np.sqrt(np.maximum(extra, 0.0))
        return out

    def _knn(self, q: Vec, k: int) -> Labels:
        """hnswlib labels of up to ``k`` neighbours per row (lock held), never raising for too few.

        hnswlib raises RuntimeError when it cannot fill ``k`` results per row (k above the live
        count, or a graph thinned by deletions); retry with fewer.
        """
        k = min(k, self._live)
        if self.params.mips and k > 0:
            q = np.hstack([q, np.zeros((q.shape[0], 1), dtype=np.float32)])
        while k > 0:
            try:
                labels, _ = self._index.knn_query(q, k=k, num_threads=1)
                return np.asarray(labels, dtype=np.int64)
            except RuntimeError:
                k = k // 2 if k > 1 else 0
        return np.zeros((q.shape[0], 0), dtype=np.int64)

    def query(
        self, vectors: npt.ArrayLike, k: int, *, candidates: int | None = None
    ) -> tuple[list[str] | list[list[str]], Vec]:
        """Top-``k`` live items by inner product for ``vectors`` (``(dim,)`` or ``(n, dim)``).

        Fetches ``max(k, candidates)`` HNSW candidates and scores them exactly with the stored
        vectors (re-ranking when ``candidates > k``). Returns ``(ids, scores)``: for a 1-D query
        a list of ids and a ``(k',)`` array, for a batch a list of lists and a ``(n, k')`` array,
        best first; ``k'`` is smaller than ``k`` when fewer items are live.
        """
        single = np.ndim(vectors) == 1
        ids, scores = self.query_batch(_as_matrix(vectors, self.params.dim), k, candidates=candidates)
        return (ids[0], scores[0]) if single else (ids, scores)

    def query_batch(self, q: Vec, k: int, *, candidates: int | None = None) -> tuple[list[list[str]], Vec]:
        """:meth:`query` for an ``(n, dim)`` float32 matrix, always returning per-row lists."""
        labels, scores = self.query_labels(_as_matrix(q, self.params.dim), k, candidates=candidates)
        ids_of = self._ids
        return [[ids_of[lab] for lab in row] for row in labels.tolist()], scores

    def query_labels(
        self, q: Vec, k: int, *, candidates: int | None = None, exclude: Sequence[int] = ()
    ) -> tuple[Labels, Vec]:
        """Labels and exact scores ``(n, k')`` of the top-``k`` live items per row, best first.

        ``q`` must be a C-contiguous float32 ``(n, dim)`` matrix. Labels in ``exclude`` are
        skipped: the HNSW search asks for ``len(exclude)`` more, and an excluded label that
        still ranks gets score ``-inf`` (sorted last), so callers drop non-finite scores.
        """
        _check_k(k)
        fetch = max(k + len(exclude), candidates or 0)
        with self.lock:
            labels = self._knn(q, fetch)
            cand = self._vectors[labels]  # fancy indexing copies: safe to use after the lock
        scores = np.einsum("nkd,nd->nk", cand, q, optimize=False).astype(np.float32, copy=False)
        if exclude:
            scores[np.isin(labels, np.fromiter(exclude, dtype=np.int64, count=len(exclude)))] = -np.inf
        kk = min(k, labels.shape[1])
        if labels.shape[1] > kk:
            part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
            labels = np.take_along_axis(labels, part, axis=1)
            scores = np.take_along_axis(scores, part, axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")
        return np.take_along_axis(labels, order, axis=1), np.take_along_axis(scores, order, axis=1)

    def candidates(self, q: Vec, fetch: int) -> tuple[Labels, Vec]:
        """HNSW labels ``(n, f)`` of up to ``fetch`` live items per row and a copy of their vectors
        ``(n, f, dim)``, unsorted by exact score (``q``: a C-contiguous float32 ``(n, dim)`` matrix)."""
        with self.lock:
            labels = self._knn(q, fetch)
            return labels, self._vectors[labels]  # fancy indexing copies: safe to use after the lock

    @property
    def ids(self) -> list[str]:
        """Item ids by label (append-only; labels are never reassigned, so no lock is needed)."""
        return self._ids

    @property
    def label_map(self) -> Mapping[str, int]:
        """Item id -> label, removed items included (append-only, so no lock is needed to read it)."""
        return self._label_of

    def id_of(self, label: int) -> str:
        """The item id of ``label`` (labels are never reassigned, so no lock is needed)."""
        return self._ids[label]

    def label_of(self, item_id: str) -> int | None:
        """The label of ``item_id`` if it is live in this shard."""
        label = self._label_of.get(item_id)
        alive = self._alive  # lock-free read: a concurrent grow swaps the array, never shrinks it
        return label if label is not None and label < alive.shape[0] and alive[label] else None

    # -- snapshots -----------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str], watermark: Mapping[int, int] | None = None) -> None:
        """Write this shard into the directory ``path`` (created; see module docstring)."""
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        with self.lock:
            n = len(self._ids)
            self._index.save_index(str(d / "index.bin"))
            np.save(d / "vectors.npy", self._vectors[:n])
            np.save(d / "alive.npy", self._alive[:n])
            (d / "ids.json").write_text(json.dumps(self._ids))
            manifest = _manifest(
                self.params,
                live=self._live,
                labels=n,
                radius=self._radius,
                overflow=self._overflow,
                watermark=watermark,
            )
        (d / "manifest.json").write_text(json.dumps(manifest, indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, ef: int | None = None, rerank: int | None = None) -> HnswShard:
        """A shard read from a directory written by :meth:`save`, with optional new ``ef``/``rerank``."""
        d = Path(path)
        manifest = _read_manifest(d)
        params = IndexParams.from_dict(manifest["params"], ef=ef, rerank=rerank)
        shard = cls.__new__(cls)
        shard.params = params
        shard.lock = threading.Lock()
        ids: list[str] = json.loads((d / "ids.json").read_text())
        vectors = np.load(d / "vectors.npy")
        alive = np.load(d / "alive.npy")
        n = len(ids)
        if vectors.shape != (n, params.dim) or alive.shape != (n,) or manifest["labels"] != n:
            raise ValueError(f"inconsistent shard snapshot in {d}")
        cap = max(params.max_elements, n)
        index = hnswlib.Index(space=params.space, dim=_index_dim(params))
        index.load_index(str(d / "index.bin"), max_elements=cap, allow_replace_deleted=False)
        index.set_ef(params.ef)
        shard._index = index
        shard._ids = ids
        shard._label_of = {item: label for label, item in enumerate(ids)}
        shard._vectors = np.zeros((cap, params.dim), dtype=np.float32)
        shard._vectors[:n] = vectors
        shard._alive = np.zeros(cap, dtype=bool)
        shard._alive[:n] = alive
        shard._live = int(np.count_nonzero(alive))
        shard._radius = manifest.get("radius")
        shard._overflow = int(manifest.get("overflow", 0))
        shard._skipped = 0
        if shard._live != manifest["live"]:
            raise ValueError(f"inconsistent shard snapshot in {d}: live count")
        return shard


def _index_dim(params: IndexParams) -> int:
    """Dimension of the hnswlib vectors: one more with the MIPS reduction."""
    return params.dim + 1 if params.mips else params.dim


def _manifest(params: IndexParams, **extra: Any) -> dict[str, Any]:
    watermark = extra.pop("watermark", None)
    return {
        "format": SNAPSHOT_FORMAT,
        "hnswlib": getattr(hnswlib, "__version__", "unknown"),
        "params": params.to_dict(),
        # JSON object keys are strings: keep the (partition, offset) pairs as a list
        "watermark": sorted([int(p), int(o)] for p, o in (watermark or {}).items()),
        **extra,
    }


def _read_manifest(d: Path) -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads((d / "manifest.json").read_text())
    if manifest.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"unsupported index snapshot format {manifest.get('format')!r} in {d}")
    return manifest


class ShardedIndex:
    """The serving index: one :class:`HnswShard` per partition, staged writes, exact merge.

    ``clock`` (default ``time.monotonic``) timestamps staged changes for
    :meth:`oldest_pending_age_s`.
    """

    def __init__(
        self,
        params: IndexParams,
        partitions: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if partitions < 1:
            raise ValueError(f"partitions must be >= 1, got {partitions}")
        self.params = params
        self.partitions = partitions
        self.shards = [HnswShard(params) for _ in range(partitions)]
        self._clock = clock
        #: item id -> (vector or None for a removal, time first staged); insertion order = age order
        self._pending: dict[str, tuple[Vec | None, float]] = {}
        self._pending_lock = threading.Lock()
        self._apply_lock = threading.RLock()
        self._inflight_since: float | None = None
        #: moving average of one hnswlib update's cost, sizes the apply chunks
        self._update_cost_s = 1e-3
        self._version = 0
        #: watermark of the snapshot this index was loaded from (empty when built)
        self.watermark: dict[int, int] = {}
        self._pool: ThreadPoolExecutor | None = None
        #: ask every shard for the full k (see :meth:`shard_k`)
        self.shard_k_exact = False

    def shard_k(self, k: int, shards: int) -> int:
        """How many results to ask each of ``shards`` shards for, for a global top-``k``.

        Items are spread over shards by a hash of their id, independently of their vectors, so
        the number of the global top-``k`` held by one shard is Binomial(k, 1/shards): asking each
        shard for ``2k/shards + 10`` (at most ``k``) misses a global top-``k`` item only when one
        shard holds more than that many, which for k=100 over 4 shards is a > 5-sigma event.
        With ``shard_k_exact`` every shard returns ``k``.
        """
        if shards <= 1 or self.shard_k_exact:
            return k
        return min(k, math.ceil(2 * k / shards) + 10)

    def set_query_threads(self, threads: int) -> None:
        """Search the shards of one query on ``threads`` threads (1 = one after another).

        hnswlib releases the GIL while it searches, so on a multi-core host the shards of one
        request are searched in parallel while the calling thread waits.
        """
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
        if threads > 1 and self.partitions > 1:
            self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="freshrec-ann")

    # -- introspection -------------------------------------------------------------------

    @property
    def version(self) -> int:
        """Bumped by every apply or build that changed the index."""
        return self._version

    @property
    def size(self) -> int:
        """Live items over all shards."""
        return sum(len(s) for s in self.shards)

    def __len__(self) -> int:
        """Live items over all shards."""
        return self.size

    @property
    def pending(self) -> int:
        """Staged changes (one per item) not applied yet."""
        return len(self._pending)

    def oldest_pending_age_s(self) -> float:
        """Seconds since the oldest change not yet visible to searches was staged (0 when none).

        Includes changes being applied right now; a re-staged item keeps its first staging time.
        """
        with self._pending_lock:
            first = next(iter(self._pending.values()), None)
            times = [t for t in (self._inflight_since, first[1] if first else None) if t is not None]
        return max(0.0, self._clock() - min(times)) if times else 0.0

    @property
    def skipped_updates(self) -> int:
        """Applied upserts that left the graph alone because the vector barely moved (``min_move``)."""
        return sum(s.skipped_updates for s in self.shards)

    @property
    def norm_overflow(self) -> int:
        """Vectors applied so far that were longer than their shard's MIPS radius."""
        return sum(s.norm_overflow for s in self.shards)

    def shard_of(self, item_id: str) -> int:
        """The shard (partition) of ``item_id``: Kafka's murmur2 partitioner."""
        return partition_for(item_id, self.partitions)

    def item_vector(self, item_id: str) -> Vec | None:
        """A copy of the applied (searchable) vector of ``item_id``; None when not live."""
        return self.shards[self.shard_of(item_id)].vector(item_id)

    def item_vectors(self, item_ids: Sequence[str]) -> tuple[Vec, npt.NDArray[np.bool_]]:
        """Applied vectors of ``item_ids`` as an ``(n, dim)`` matrix (zero rows where not live) and
        a mask of which were found: one lock round per shard instead of one per item."""
        out = np.zeros((len(item_ids), self.params.dim), dtype=np.float32)
        found = np.zeros(len(item_ids), dtype=bool)
        per: dict[int, list[int]] = {}
        for row, item in enumerate(item_ids):
            per.setdefault(self.shard_of(item), []).append(row)
        for p, rows in per.items():
            found[rows] = self.shards[p].vectors([item_ids[r] for r in rows], out, rows)
        return out, found

    def set_ef(self, ef: int) -> None:
        """Change the query-time beam width of every shard (effective for the next search)."""
        if ef < 1:
            raise ValueError(f"ef must be >= 1, got {ef}")
        self.params = IndexParams.from_dict(self.params.to_dict(), ef=ef)
        for shard in self.shards:
            shard.params = self.params
            shard.set_ef(ef)

    # -- writes --------------------------------------------------------------------------

    def upsert(self, item_id: str, vector: npt.ArrayLike) -> None:
        """Stage a new vector for ``item_id`` (copied; replaces any staged change of it).

        Raises ValueError for a wrong dimension or non-finite values.
        """
        v = np.array(vector, dtype=np.float32, copy=True).reshape(-1)
        if v.shape[0] != self.params.dim:
            raise ValueError(f"vector of {item_id!r} has dimension {v.shape[0]}, expected {self.params.dim}")
        if not np.isfinite(v).all():
            raise ValueError(f"vector of {item_id!r} has non-finite values")
        self._stage(item_id, v)

    def remove(self, item_id: str) -> None:
        """Stage the removal of ``item_id`` (replaces any staged change of it)."""
        self._stage(item_id, None)

    def _stage(self, item_id: str, vector: Vec | None) -> None:
        with self._pending_lock:
            prev = self._pending.get(item_id)
            # assigning an existing key keeps its place (and first-staged time): order = age
            self._pending[item_id] = (vector, prev[1] if prev is not None else self._clock())

    def _take(self, max_items: int | None) -> list[tuple[str, Vec | None]]:
        with self._pending_lock:
            if max_items is None or max_items >= len(self._pending):
                taken, self._pending = self._pending, {}
            else:
                keys = [k for k, _ in zip(self._pending, range(max_items), strict=False)]
                taken = {k: self._pending.pop(k) for k in keys}
            if taken:
                self._inflight_since = next(iter(taken.values()))[1]
        return [(k, v) for k, (v, _) in taken.items()]

    def apply_pending(self, max_items: int | None = None) -> int:
        """Apply up to ``max_items`` staged changes (oldest first; all when None). Returns how many.

        Upserts go to each shard in chunks (one ``add_items`` per chunk, at most
        ``params.apply_chunk``), sized from the measured cost per update so that a chunk holds
        the shard lock for about ``params.apply_hold_ms``: a concurrent search waits at most
        about that long.
        """
        with self._apply_lock:
            changes = self._take(max_items)
            if not changes:
                return 0
            try:
                self._apply(changes)
            finally:
                with self._pending_lock:
                    self._inflight_since = None
            self._version += 1
            return len(changes)

    def _apply(self, changes: Iterable[tuple[str, Vec | None]]) -> None:
        ups: list[list[tuple[str, Vec]]] = [[] for _ in self.shards]
        rms: list[list[str]] = [[] for _ in self.shards]
        for item_id, vec in changes:
            s = self.shard_of(item_id)
            if vec is None:
                rms[s].append(item_id)
            else:
                ups[s].append((item_id, vec))
        target_s = self.params.apply_hold_ms / 1e3
        for shard, up, rm in zip(self.shards, ups, rms, strict=True):
            if rm:
                shard.remove_many(rm)
            i = 0
            while i < len(up):
                step = max(1, min(self.params.apply_chunk, int(target_s / self._update_cost_s)))
                part = up[i : i + step]
                ids = [p[0] for p in part]
                mat = np.stack([p[1] for p in part])
                t0 = time.perf_counter()  # a cost measurement, not event time
                shard.upsert_many(ids, mat)
                per = (time.perf_counter() - t0) / len(part)
                self._update_cost_s = 0.7 * self._update_cost_s + 0.3 * max(per, 1e-6)
                i += step
                time.sleep(0)  # let a search that waited on the shard lock take it

    def build(self, items: Iterable[tuple[str, npt.ArrayLike]]) -> int:
        """Bulk-load ``items`` (id, vector) directly, bypassing the buffer; returns how many.

        One ``add_items`` per shard with ``params.threads`` threads. A repeated id keeps its
        last vector. Works on a non-empty index too (upsert semantics).
        """
        ups: list[dict[str, npt.ArrayLike]] = [{} for _ in self.shards]
        for item_id, vec in items:
            ups[self.shard_of(item_id)][item_id] = vec
        n = 0
        with self._apply_lock:
            for shard, up in zip(self.shards, ups, strict=True):
                if up:
                    mat = _as_matrix(
                        np.stack([np.asarray(v, dtype=np.float32).reshape(-1) for v in up.values()]), self.params.dim
                    )
                    if not np.isfinite(mat).all():
                        raise ValueError("build: non-finite vector values")
                    shard.upsert_many(list(up), mat, num_threads=self.params.threads)
                    n += len(up)
            if n:
                self._version += 1
        return n

    # -- reads ---------------------------------------------------------------------------

    def search(
        self, vector: npt.ArrayLike, k: int, exclude: set[str] | frozenset[str] | None = None
    ) -> list[tuple[str, float]]:
        """Top-``k`` (item id, exact inner product) for one query vector, best first.

        Excluded ids never appear. Fewer than ``k`` results only when fewer eligible items are
        live. Raises ValueError for ``k < 1`` or a vector of the wrong dimension.
        """
        _check_k(k)
        q = _as_matrix(vector, self.params.dim)
        if q.shape[0] != 1:
            raise ValueError("search takes one vector; use search_many for a batch")
        return self.search_many(q, k, exclude)[0]

    def search_many(
        self, vectors: npt.ArrayLike, k: int, exclude: set[str] | frozenset[str] | None = None
    ) -> list[list[tuple[str, float]]]:
        """:meth:`search` for each row of ``vectors`` (``(n, dim)``), with one exclude set for all.

        One merge for all shards: each shard returns its HNSW candidates (labels and a copy of
        their exact vectors, under its lock); the candidates of every shard are scored with one
        ``einsum`` and sorted once, and the excluded ids are skipped while the sorted list is read.
        (The per-shard Python and numpy of scoring, trimming and sorting each shard's answer
        separately cost more than the four HNSW searches at ``ef=64``.)
        """
        _check_k(k)
        q = _as_matrix(vectors, self.params.dim)
        live = [shard for shard in self.shards if len(shard)]
        if not live:
            return [[] for _ in range(q.shape[0])]
        k_shard = self.shard_k(k, len(live))
        rerank = self.params.rerank

        # only excluded ids held by a shard can take a slot in its answer: count them per shard in
        # one pass (an id has one shard; a removed label still counts, which only asks for more)
        n_excl = [0] * len(live)
        if exclude:
            maps = [shard.label_map for shard in live]
            for e in exclude:
                for j, m in enumerate(maps):
                    if e in m:
                        n_excl[j] += 1
                        break

        def one(j: int) -> tuple[Labels, Vec]:
            need = k_shard + (2 * n_excl[j] + _MARGIN if n_excl[j] else 0)
            return live[j].candidates(q, max(need, rerank))

        if self._pool is not None and len(live) > 1:
            results = list(self._pool.map(one, range(len(live))))
        else:
            results = [one(j) for j in range(len(live))]
        labels = np.concatenate([lab for lab, _ in results], axis=1)
        cand = np.concatenate([vec for _, vec in results], axis=1)
        owner = np.concatenate([np.full(lab.shape[1], j, dtype=np.intp) for j, (lab, _) in enumerate(results)])
        scores = np.einsum("nkd,nd->nk", cand, q, optimize=False).astype(np.float32, copy=False)
        order = np.argsort(-scores, axis=1, kind="stable")
        id_lists = [shard.ids for shard in live]
        skip = exclude or ()
        out: list[list[tuple[str, float]]] = []
        for row in range(q.shape[0]):
            o = order[row]
            res: list[tuple[str, float]] = []
            for p, lab, sc in zip(owner[o].tolist(), labels[row, o].tolist(), scores[row, o].tolist(), strict=True):
                item = id_lists[p][lab]
                if item in skip:
                    continue
                res.append((item, sc))
                if len(res) == k:
                    break
            out.append(res)
        return out

    # -- snapshots -----------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str], watermark: Mapping[int, int] | None = None) -> None:
        """Snapshot every shard to the directory ``path``, atomically replacing an older one.

        Applies all staged changes first, so the snapshot holds every change staged before the
        call: pass the watermark (e.g. item-changelog offsets per partition) of what has been
        staged, and replay only records at or after it when loading.
        """
        final = Path(path)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        old = final.with_name(f".{final.name}.old")
        wm = dict(watermark or {})
        with self._apply_lock:
            self.apply_pending()
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            for p, shard in enumerate(self.shards):
                shard.save(tmp / f"shard-{p:04d}", wm)
            manifest = _manifest(
                self.params, partitions=self.partitions, live=self.size, version=self._version, watermark=wm
            )
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            _fsync_tree(tmp)
            if old.exists():
                shutil.rmtree(old)
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            with contextlib.suppress(OSError):
                shutil.rmtree(old)
            self.watermark = wm

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        ef: int | None = None,
        rerank: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> ShardedIndex:
        """An index read from a snapshot written by :meth:`save` (``.watermark`` set from it).

        ``ef`` and ``rerank`` override the saved query-time settings. If a crash left only the
        previous snapshot (renamed aside during :meth:`save`), that one is loaded.
        """
        d = Path(path)
        if not (d / "manifest.json").exists():
            old = d.with_name(f".{d.name}.old")
            if (old / "manifest.json").exists():
                d = old
            else:
                raise FileNotFoundError(f"no index snapshot in {path}")
        manifest = _read_manifest(d)
        params = IndexParams.from_dict(manifest["params"], ef=ef, rerank=rerank)
        index = cls(params, int(manifest["partitions"]), clock=clock)
        index.shards = [HnswShard.load(d / f"shard-{p:04d}", ef=ef, rerank=rerank) for p in range(index.partitions)]
        if index.size != manifest["live"]:
            raise ValueError(f"inconsistent index snapshot in {d}: live count")
        index._version = int(manifest["version"])
        index.watermark = {int(p): int(o) for p, o in manifest["watermark"]}
        return index


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root`` so the rename publishes complete data."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
