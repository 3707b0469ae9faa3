"""The serving process's item catalog: compact per-item features for ranking and fallbacks.

Decoding a full :class:`~streams.core.state.ItemState` costs tens of microseconds, far too
much for hundreds of candidates per request. The replica therefore decodes each item state
once, when its changelog record arrives, and keeps only what the request path needs in
numpy columns indexed by a dense row number.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from itertools import repeat

import numpy as np
import numpy.typing as npt

from streams.core import serde
from streams.core.state import B5_US, B60_US, CoreConfig, ItemState, Vec, ctr, item_features

__all__ = ["ItemCatalog"]

#: ``_hot_key`` of an eligible item with popularity 0: below every positive popularity, above ineligible
_ZERO_POP = -1e300


def _row_features(
    b5_rows: list[list[int]], b60_rows: list[list[int]], now: int, cfg: CoreConfig
) -> tuple[float, float, float]:
    """(ctr_24h, popularity, trending) of :func:`~streams.core.state.item_features`, from encoded rows."""
    lo1, hi1 = (now - 12 * B5_US) // B5_US, now // B5_US
    pos_1h = sum(r[3] for r in b5_rows if lo1 < r[0] <= hi1)
    lo24, hi24 = (now - 24 * B60_US) // B60_US, now // B60_US
    imp_24h = clk_24h = pos_24h = 0
    popularity = 0.0
    lam = math.log(2) / cfg.trend_half_life_us
    for idx, imp, clk, pos in b60_rows:
        if lo24 < idx <= hi24:
            imp_24h += imp
            clk_24h += clk
            pos_24h += pos
        end = (idx + 1) * B60_US
        if end - B60_US <= now:
            popularity += pos * math.exp(-lam * max(0, now - end))
    return ctr(clk_24h, imp_24h, cfg), popularity, (pos_1h + 1.0) / (pos_24h / 24.0 + 1.0)


class ItemCatalog:
    """Item id -> (eligible, category, ctr_24h, popularity, trending, last event time).

    ``update`` is called by the replica thread; readers (the request path) only read
    numpy columns and swap-in lists, so no lock is needed on the read side beyond the
    GIL: a row's columns may be read while it is being updated, which at worst mixes one
    item's old and new feature values in one response.
    """

    def __init__(self, cfg: CoreConfig, capacity: int = 1024) -> None:
        self.cfg = cfg
        #: item vectors by row (zeros when the item has none): one matrix product scores all candidates
        self.vectors = np.zeros((capacity, cfg.dim), dtype=np.float32)
        self._rows: dict[str, int] = {}
        self._ids: list[str] = []
        self.category: list[str | None] = []
        self.eligible = np.zeros(capacity, dtype=bool)
        self.ctr = np.zeros(capacity, dtype=np.float32)
        self.popularity = np.zeros(capacity, dtype=np.float32)
        self.trending = np.zeros(capacity, dtype=np.float32)
        self.last_ts = np.zeros(capacity, dtype=np.int64)
        self._lock = threading.Lock()  # writers only
        self._trending_ids: list[str] = []
        self.trending_computed_at_us = 0
        #: the decayed-popularity order key, ``log(popularity) + lam * last_ts``: at any time ``now``
        #: not before an item's last event, its hot score ``popularity * exp(-lam * (now - last_ts))``
        #: is ``exp(key - lam * now)``, so the trending order never changes while items do not
        #: (``_ZERO_POP`` for popularity 0, -inf for ineligible items)
        self._hot_key = np.full(capacity, -np.inf, dtype=np.float64)
        self._max_ts = 0
        #: rows written since the last trending refresh (the replica thread adds, the refresh swaps)
        self._dirty: set[int] = set()
        #: the last refresh's best rows by ``_hot_key`` (a few times the list size) and the floor:
        #: every other row's key was at most ``_top_floor`` (see ``refresh_trending``)
        self._top: npt.NDArray[np.intp] | None = None
        self._top_floor = -np.inf
        self._top_len = 0
        self._lam = math.log(2) / cfg.trend_half_life_us
        #: trending refreshes that scanned every row (the others looked at the kept and written rows)
        self.trending_full_passes = 0

    def __len__(self) -> int:
        return len(self._ids)

    def row(self, item_id: str) -> int:
        """The dense row of ``item_id``, or -1."""
        return self._rows.get(item_id, -1)

    def rows(self, item_ids: Sequence[str]) -> npt.NDArray[np.intp]:
        """Dense rows of ``item_ids`` (-1 for unknown ones)."""
        return np.array(list(map(self._rows.get, item_ids, repeat(-1))), dtype=np.intp)

    def _grow(self) -> None:
        n = len(self.eligible) * 2
        for name in ("eligible", "ctr", "popularity", "trending", "last_ts", "vectors", "_hot_key"):
            old = getattr(self, name)
            new = np.zeros((n, *old.shape[1:]), dtype=old.dtype) if name != "_hot_key" else np.full(n, -np.inf)
            new[: len(old)] = old
            setattr(self, name, new)

    def update(self, item_id: str, state: ItemState) -> None:
        """Record the features of ``state`` as of its own newest event time."""
        now = state.max_ts
        f = item_features(state, now, self.cfg) if now else None
        feats = (f["ctr_24h"], f["popularity"], f["trending"]) if f is not None else None
        self._set(item_id, state.eligible, state.category, now, state.vector, feats)

    def update_encoded(self, item_id: str, data: bytes) -> tuple[Vec | None, bool]:
        """:meth:`update` from an encoded item state (the changelog value); returns (vector, eligible).

        Reads only the fields it needs (3x cheaper than decoding the state and calling
        :func:`~streams.core.state.item_features`; equal results, tested).
        """
        vector, body = serde.item_summary(data)
        now, eligible, category = body[3], body[4], body[5]
        feats = _row_features(body[1], body[2], now, self.cfg) if now else None
        self._set(item_id, eligible, category, now, vector, feats)
        return vector, eligible

    def _set(
        self,
        item_id: str,
        eligible: bool,
        category: str | None,
        now: int,
        vector: Vec | None,
        feats: tuple[float, float, float] | None,
    ) -> None:
        with self._lock:
            r = self._rows.get(item_id)
            if r is None:
                r = len(self._ids)
                if r >= len(self.eligible):
                    self._grow()
                self._ids.append(item_id)
                self.category.append(None)
                self._rows[item_id] = r
            self.eligible[r] = eligible
            self.category[r] = category
            self.last_ts[r] = now
            if vector is not None and len(vector) == self.cfg.dim:
                self.vectors[r] = vector
            else:
                self.vectors[r] = 0.0
            if feats is not None:
                self.ctr[r], self.popularity[r], self.trending[r] = feats
            else:
                self.ctr[r] = self.cfg.ctr_prior_clicks / self.cfg.ctr_prior_impressions
            pop = float(self.popularity[r])
            if not eligible:
                self._hot_key[r] = -np.inf
            elif pop > 0:
                self._hot_key[r] = math.log(pop) + self._lam * now
            else:
                self._hot_key[r] = _ZERO_POP
            if now > self._max_ts:
                self._max_ts = now
            self._dirty.add(r)

    def hot_scores(self, now_us: int) -> npt.NDArray[np.float32]:
        """Decayed popularity as of ``now_us`` for every row (ineligible rows get -inf)."""
        return self._scores(slice(0, len(self._ids)), now_us)

    def _scores(self, rows: slice | npt.NDArray[np.intp], now_us: int) -> npt.NDArray[np.float32]:
        age = np.maximum(0, now_us - self.last_ts[rows]).astype(np.float64)
        score = (self.popularity[rows] * np.exp(-self._lam * age)).astype(np.float32)
        score[~self.eligible[rows]] = -np.inf
        return score

    def refresh_trending(self, now_us: int, size: int) -> None:
        """Recompute the trending list (the cold-start fallback) as of ``now_us``.

        The best ``size`` eligible items by :meth:`hot_scores`, ties by id. A full pass over a
        1M-item catalog costs ~20 ms of CPU, so when ``now_us`` is not before any item's last event
        the list comes from the previous refresh's best rows and the rows written since: their
        order key does not depend on ``now_us`` (``_hot_key``), and every other row was below the
        floor kept with them. A full pass runs when that cannot prove the answer exact.
        """
        with self._lock:
            n = len(self._ids)
            dirty, self._dirty = self._dirty, set()
            key = self._hot_key
            max_ts = self._max_ts
        if n == 0:
            return
        if now_us < max_ts:
            self._top = None  # an item's last event after now_us: its score is not exp(key - lam * now)
            self._refresh_full(now_us, size)
            return
        keep = min(n, 4 * size)
        incremental = self._top is not None and self._top_len == keep
        while True:
            if incremental and self._top is not None:
                cand = np.union1d(self._top, np.fromiter(dirty, dtype=np.intp, count=len(dirty)))
                floor = self._top_floor
            else:
                cand, floor = np.arange(n), -np.inf
                self.trending_full_passes += 1
            ck = key[cand]
            if len(cand) > keep:
                part = np.argpartition(-ck, keep)[: keep + 1]
                floor = max(floor, float(ck[part[keep]]))
                cand, ck = cand[part[:keep]], ck[part[:keep]]
            m = min(size, len(cand))
            best = np.argpartition(-ck, m - 1)[:m] if 0 < m < len(cand) else np.arange(m)
            # exact when every row left out is known to be below the list (a full pass is exact
            # up to ties at its cut, like any top-k)
            if floor == -np.inf or (m == size and float(ck[best].min()) > floor) or not incremental:
                break
            incremental = False
        self._top, self._top_floor, self._top_len = cand, floor, keep
        rows = cand[best]
        self._publish_trending(rows, self._scores(rows, now_us), now_us)

    def _refresh_full(self, now_us: int, size: int) -> None:
        """:meth:`refresh_trending` from the scores as of ``now_us`` of every row."""
        self.trending_full_passes += 1
        n = len(self._ids)
        score = self.hot_scores(now_us)
        m = min(size, n)
        top = np.argpartition(-score, m - 1)[:m] if m < n else np.arange(n)
        self._publish_trending(top, score[top], now_us)

    def _publish_trending(self, rows: npt.NDArray[np.intp], score: npt.NDArray[np.float32], now_us: int) -> None:
        """Set the trending list to ``rows`` by their float32 ``score`` as of ``now_us``, ties by id
        (a deterministic list), ineligible rows (score -inf) left out."""
        ids = self._ids
        order = sorted(range(len(rows)), key=lambda j: (-float(score[j]), ids[rows[j]]))
        self._trending_ids = [ids[rows[j]] for j in order if score[j] > -np.inf]
        self.trending_computed_at_us = now_us

    @property
    def trending_ids(self) -> list[str]:
        """The latest trending list, best first (eligible items only)."""
        return self._trending_ids
