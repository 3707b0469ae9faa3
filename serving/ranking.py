"""The ranking stage: one interface, a first blend ranker.

A :class:`Ranker` scores a :class:`CandidateSet` for one request. The torch ranker and the
bandit (later issues) implement the same protocol and plug into
:class:`serving.recommend.Recommender` unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from serving.catalog import ItemCatalog
from serving.settings import RankSettings

__all__ = ["CandidateSet", "RankContext", "Ranker", "BlendRanker"]


@dataclass(slots=True)
class CandidateSet:
    """De-duplicated, filtered candidates of one request, in source-priority order."""

    ids: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    #: user-vector . item-vector (0 where the user has no vector)
    dots: npt.NDArray[np.float32] = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    #: catalog rows of the candidates (-1: not in the catalog yet)
    rows: npt.NDArray[np.intp] = field(default_factory=lambda: np.zeros(0, dtype=np.intp))

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True, slots=True)
class RankContext:
    """What a ranker may know about the request besides the candidates."""

    user_id: str
    has_vector: bool
    now_us: int
    surface: str | None = None
    item_id: str | None = None


class Ranker(Protocol):
    """Scores candidates; higher is better."""

    version: str

    def score(self, ctx: RankContext, cands: CandidateSet) -> npt.NDArray[np.float32]:
        """One score per candidate."""


class BlendRanker:
    """``w_dot·dot + w_ctr·ctr_24h + w_trending·log1p(hot) + w_recency·2^(-age/half_life)``.

    ``hot`` is the catalog's decayed popularity as of the request's event-time watermark;
    ``age`` is the time since the item's newest event. A first, transparent baseline.
    """

    def __init__(self, catalog: ItemCatalog, cfg: RankSettings, version: str = "blend-v1") -> None:
        self.catalog = catalog
        self.cfg = cfg
        self.version = version

    def score(self, ctx: RankContext, cands: CandidateSet) -> npt.NDArray[np.float32]:
        """Blend scores (see the class docstring)."""
        cfg = self.cfg
        rows = cands.rows
        known = rows >= 0
        r = np.where(known, rows, 0)
        cat = self.catalog
        ctr = np.where(known, cat.ctr[r], 0.0)
        lam = math.log(2) / (cfg.recency_half_life_h * 3_600e6)
        age = np.maximum(0, ctx.now_us - cat.last_ts[r]).astype(np.float64)
        recency = np.where(known & (cat.last_ts[r] > 0), np.exp(-lam * age), 0.0)
        hot_lam = math.log(2) / cat.cfg.trend_half_life_us
        hot = np.where(known, cat.popularity[r] * np.exp(-hot_lam * age), 0.0)
        score = (
            cfg.w_dot * cands.dots
            + cfg.w_ctr * ctr
            + cfg.w_trending * np.log1p(np.maximum(hot, 0.0))
            + cfg.w_recency * recency
        )
        return score.astype(np.float32)
