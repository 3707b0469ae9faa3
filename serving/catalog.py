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
from streams.core.state import B5_US, B60_US, CoreConfig, ItemState, Vec, item_features

__all__ = ["ItemCatalog"]


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
    ctr = (clk_24h + cfg.ctr_prior_clicks) / (imp_24h + cfg.ctr_prior_impressions)
    return ctr, popularity, (pos_1h + 1.0) / (pos_24h / 24.0 + 1.0)


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
        for name in ("eligible", "ctr", "popularity", "trending", "last_ts", "vectors"):
            old = getattr(self, name)
            new = np.zeros((n, *old.shape[1:]), dtype=old.dtype)
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

    def hot_scores(self, now_us: int) -> npt.NDArray[np.float32]:
        """Decayed popularity as of ``now_us`` for every row (ineligible rows get -inf)."""
        n = len(self._ids)
        lam = math.log(2) / self.cfg.trend_half_life_us
        age = np.maximum(0, now_us - self.last_ts[:n]).astype(np.float64)
        score = (self.popularity[:n] * np.exp(-lam * age)).astype(np.float32)
        score[~self.eligible[:n]] = -np.inf
        return score

    def refresh_trending(self, now_us: int, size: int) -> None:
        """Recompute the trending list (the cold-start fallback) as of ``now_us``."""
        n = len(self._ids)
        if n == 0:
            return
        score = self.hot_scores(now_us)
        m = min(size, n)
        top = np.argpartition(-score, m - 1)[:m] if m < n else np.arange(n)
        # ties broken by id for a deterministic list
        ids = self._ids
        order = sorted(top.tolist(), key=lambda r: (-float(score[r]), ids[r]))
        self._trending_ids = [ids[r] for r in order if score[r] > -np.inf]
        self.trending_computed_at_us = now_us

    @property
    def trending_ids(self) -> list[str]:
        """The latest trending list, best first (eligible items only)."""
        return self._trending_ids
