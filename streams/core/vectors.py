"""In-memory item vectors: the user stage's read side of the item embeddings (pure, no I/O).

Live, it is fed from the item changelog; in replay, from the replayer's own item
states. Both implement :class:`streams.core.state.ItemVectorSource`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from streams.core.state import CoreConfig, Vec, _intps, _joined, init_matrix

__all__ = ["ItemReplica"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX = np.uint64(0xBF58476D1CE4E5B9)
_pack = struct.pack


def _row_indexes(rows: dict[str, int], keys: Sequence[str]) -> npt.NDArray[np.intp]:
    """Each key's row in ``rows``, or -1, as an intp array.

    A dict lookup each (a C loop in the compiled build), packed by ``struct`` in one C loop: a third
    of ``np.fromiter(map(rows.get, ...))``, which converts item by item through numpy's scalars.
    """
    found = [rows.get(k, -1) for k in keys]
    return np.frombuffer(_pack(f"{len(found)}n", *found), dtype=np.intp)


class ItemReplica:
    """Item id -> vector, stored as rows of one growing matrix."""

    def __init__(self, cfg: CoreConfig) -> None:
        self.cfg = cfg
        self._rows: dict[str, int] = {}
        self._mat: npt.NDArray[np.float32] = np.zeros((1024, cfg.dim), dtype=np.float32)

    def __len__(self) -> int:
        return len(self._rows)

    def put(self, item_id: str, vector: Vec) -> None:
        """Insert or replace one item's vector."""
        row = self._rows.get(item_id)
        if row is None:
            row = len(self._rows)
            if row >= len(self._mat):
                self._fit(row + 1)
            self._rows[item_id] = row
        self._mat[row] = vector

    def _fit(self, n: int) -> None:
        """Grow the matrix (doubling it) until it has at least ``n`` rows."""
        while n > len(self._mat):
            self._mat = np.concatenate([self._mat, np.zeros_like(self._mat)])

    def put_many(self, item_ids: Sequence[str], vectors: list[Vec]) -> None:
        """:meth:`put` of each item's vector, in order, with one row scatter for them all.

        The item stage puts a batch's item vectors at once: a ``put`` each (a numpy row assignment) cost
        ~3.4k instructions an item. Vectors that are not all contiguous float32 arrays of ``dim``, or an id
        given twice (numpy does not say which of two writes to one row wins), take ``put`` one by one.
        """
        if len(item_ids) != len(vectors):
            raise ValueError("one vector per item id")
        try:
            M = _joined(vectors, self.cfg.dim)
        except (TypeError, ValueError, BufferError):  # a list, or a strided view (no contiguous buffer)
            M = None
        if M is None or len(set(item_ids)) != len(item_ids):
            for i in range(len(vectors)):
                self.put(item_ids[i], vectors[i])
            return
        rows = self._rows
        at: list[int] = []
        for item_id in item_ids:
            row = rows.get(item_id)
            if row is None:
                row = rows[item_id] = len(rows)
            at.append(row)
        self._fit(len(rows))
        self._mat[_intps(at)] = M

    def get(self, item_id: str) -> Vec | None:
        """The vector of ``item_id`` or None."""
        row = self._rows.get(item_id)
        return None if row is None else self._mat[row]

    def get_many(self, item_ids: Sequence[str]) -> npt.NDArray[np.float32]:
        """(n, dim) vectors; unknown items get their deterministic initial vector."""
        if not item_ids:
            return np.zeros((0, self.cfg.dim), dtype=np.float32)
        idx = _row_indexes(self._rows, item_ids)
        # ``take``: the rows ``self._mat[idx]`` gives (a -1 wraps alike), by a tighter copy loop than fancy indexing
        out = self._mat.take(idx, 0)
        unknown = np.flatnonzero(idx < 0)
        if len(unknown):
            out[unknown] = init_matrix([item_ids[n] for n in unknown.tolist()], self.cfg, "i")
        return out

    def sample_many(self, hashes: npt.NDArray[np.uint64], k: int) -> npt.NDArray[np.float32] | None:
        """(n, k, dim) item vectors picked by ``hashes`` (deterministic for a given replica)."""
        n = len(self._rows)
        if n == 0:
            return None
        with np.errstate(over="ignore"):
            j = np.arange(k, dtype=np.uint64)
            mixed = (hashes[:, None] ^ (j[None, :] * _GOLDEN)) * _MIX
            idx = ((mixed >> np.uint64(17)) % np.uint64(n)).astype(np.intp)
        return self._mat.take(idx, 0)  # ``self._mat[idx]``, by a tighter copy loop
