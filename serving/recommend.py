"""The request path: candidates -> filters -> ranking -> slate, with provenance.

Routes stay thin (``serving/app.py``); everything a recommendation does is here, with the
live state, the index and the ranker passed in, so tests can drive it without HTTP.

Candidate sources, in priority order (a candidate found by two sources keeps the first):

1. ``ann``: HNSW top-N on the user's vector (skipped for users without one);
2. ``i2i``: HNSW top-N on the vector of the request's ``item_id``, and on the mean vector of
   the user's most recent items when the user has no vector yet (or ``i2i_recent_with_vector``);
   all in the same scatter-gather as ``ann``;
3. ``trending``: the catalog's decayed-popularity list, which is also the whole answer for
   an unknown user (the response is then flagged ``fallback``).

Filters: the user's consumed items (their recent items), the request's ``exclude`` list,
ineligible items, and the ``category`` filter.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from serving.catalog import ItemCatalog
from serving.ranking import CandidateSet, RankContext, Ranker
from serving.replica import LiveState
from serving.settings import ServingOptions
from streams.core.state import UserState

__all__ = ["ItemIndex", "Request", "Slate", "SlateItem", "Recommender", "SOURCES"]

SOURCES = ("ann", "i2i", "trending")


class ItemIndex(Protocol):
    """What the request path needs from the sharded HNSW index."""

    @property
    def version(self) -> int:
        """Bumped by every applied batch of changes."""

    @property
    def size(self) -> int:
        """Live items in the index."""

    @property
    def pending(self) -> int:
        """Staged changes not applied yet."""

    def oldest_pending_age_s(self) -> float:
        """Age of the oldest staged change (0 when none)."""

    def search_many(
        self, vectors: npt.NDArray[np.float32], k: int, exclude: set[str] | None = None
    ) -> list[list[tuple[str, float]]]:
        """Top-``k`` (item id, inner product) per query row, best first."""


@dataclass(frozen=True, slots=True)
class Request:
    """A validated recommendation request."""

    user_id: str
    k: int
    item_id: str | None = None
    surface: str | None = None
    exclude: frozenset[str] = frozenset()
    category: str | None = None


@dataclass(frozen=True, slots=True)
class SlateItem:
    """One recommended item."""

    item_id: str
    score: float
    source: str


@dataclass(slots=True)
class Slate:
    """A ranked slate plus everything needed to audit it."""

    request_id: str
    user_id: str
    items: list[SlateItem]
    fallback: bool
    fallback_reason: str | None
    provenance: dict[str, Any]
    candidates: dict[str, int] = field(default_factory=dict)
    user_version: int | None = None
    user_last_event_us: int | None = None


class Recommender:
    """Turns a :class:`Request` into a :class:`Slate` against the live state."""

    def __init__(
        self,
        options: ServingOptions,
        state: LiveState,
        catalog: ItemCatalog,
        index: ItemIndex,
        ranker: Ranker,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.options = options
        self.state = state
        self.catalog = catalog
        self.index = index
        self.ranker = ranker
        self.clock = clock

    def _now_us(self) -> int:
        # ranking time is the state's event-time watermark: features then mean the same
        # thing live and in replay; wall time only when the state is empty
        wm = self.state.event_watermark_us
        return wm if wm > 0 else int(self.clock() * 1e6)

    def recommend(self, req: Request) -> Slate:
        """Build the slate for ``req``."""
        opts = self.options
        user = self.state.user(req.user_id)
        consumed = {r[2] for r in user.recent} if user is not None else set()
        blocked = consumed | req.exclude
        fallback_reason: str | None = None
        if user is None:
            fallback_reason = "unknown_user"
        elif user.vector is None:
            fallback_reason = "no_user_embedding"

        ids: list[str] = []
        sources: list[str] = []
        seen: set[str] = set(blocked)

        def take(found: Sequence[str], source: str) -> None:
            for item in found:
                if item not in seen:
                    seen.add(item)
                    ids.append(item)
                    sources.append(source)

        uvec = user.vector if user is not None else None
        # one scatter-gather for the user vector and every item-to-item seed (one hnswlib call per shard)
        # i2i: the viewed item's vector, and the mean vector of the recent items (one query for all)
        seeds = self._seeds(req, user)
        cat = self.catalog
        i2i_queries = []
        if req.item_id is not None and (r := cat.row(req.item_id)) >= 0:
            i2i_queries.append(cat.vectors[r])
        # the user vector is trained on exactly these recent items, so with a vector their mean
        # adds little beyond ANN and would double the HNSW work (docs/SERVING.md, measured)
        recent_rows = [r for r in (cat.row(sd) for sd in seeds if sd != req.item_id) if r >= 0]
        if recent_rows and (uvec is None or opts.i2i_recent_with_vector):
            i2i_queries.append(cat.vectors[recent_rows].mean(axis=0))
        queries = ([uvec] if uvec is not None else []) + i2i_queries
        if queries:
            n = max(opts.ann_candidates if uvec is not None else 0, opts.i2i_candidates if i2i_queries else 0)
            found = self.index.search_many(np.stack(queries), n, blocked | set(seeds))
            if uvec is not None:
                take([i for i, _ in found[0][: opts.ann_candidates]], "ann")
                found = found[1:]
            for row in found:
                take([i for i, _ in row[: opts.i2i_candidates]], "i2i")
        take(cat.trending_ids[: opts.trending_candidates + len(blocked)], "trending")

        cands = self._filter(ids, sources, req)
        if uvec is not None and len(cands):
            known = cands.rows >= 0
            cands.dots = np.where(known, cat.vectors[np.where(known, cands.rows, 0)] @ uvec, 0.0).astype(np.float32)
        now_us = self._now_us()
        ctx = RankContext(req.user_id, uvec is not None, now_us, req.surface, req.item_id)
        scores = self.ranker.score(ctx, cands) if len(cands) else np.zeros(0, dtype=np.float32)
        k = min(req.k, len(cands))
        if k:
            top = np.argpartition(-scores, k - 1)[:k] if k < len(cands) else np.arange(len(cands))
            top = top[np.lexsort((top, -scores[top]))]
        else:
            top = np.zeros(0, dtype=np.intp)
        items = [SlateItem(cands.ids[j], float(scores[j]), cands.sources[j]) for j in top.tolist()]
        counts = {s: 0 for s in SOURCES}
        for s in cands.sources:
            counts[s] += 1
        return Slate(
            request_id=uuid.uuid4().hex,
            user_id=req.user_id,
            items=items,
            fallback=fallback_reason is not None,
            fallback_reason=fallback_reason,
            provenance=self.provenance(),
            candidates=counts,
            user_version=user.version if user is not None else None,
            user_last_event_us=user.max_ts if user is not None else None,
        )

    def _seeds(self, req: Request, user: UserState | None) -> list[str]:
        """The request's item and the user's most recent items (never searched for themselves)."""
        seeds = [req.item_id] if req.item_id else []
        if user is not None:
            for entry in user.recent[: self.options.i2i_seeds]:
                if entry[2] not in seeds:
                    seeds.append(entry[2])
        return seeds

    def _filter(self, ids: list[str], sources: list[str], req: Request) -> CandidateSet:
        rows = self.catalog.rows(ids)
        known = rows >= 0
        r = np.where(known, rows, 0)
        keep = ~known | self.catalog.eligible[r]  # items not in the catalog yet: the index vouched for them
        if req.category is not None:
            cats = self.catalog.category
            keep &= np.array([rows[j] >= 0 and cats[rows[j]] == req.category for j in range(len(ids))], dtype=bool)
        idx = np.flatnonzero(keep)
        return CandidateSet(
            ids=[ids[j] for j in idx],
            sources=[sources[j] for j in idx],
            dots=np.zeros(len(idx), dtype=np.float32),
            rows=rows[idx],
        )

    def provenance(self) -> dict[str, Any]:
        """State watermark, index version/staleness and model version of a response."""
        ix = self.index
        return {
            "state": self.state.provenance(),
            "index": {
                "version": ix.version,
                "size": ix.size,
                "pending": ix.pending,
                "max_staleness_s": ix.oldest_pending_age_s(),
            },
            "model_version": self.ranker.version,
        }
