"""Offline ranking metrics and bootstrap confidence intervals (pure, numpy only).

Every metric scores one *query*: a ranked list of recommended item ids against the
set of relevant (held-out) item ids, with binary relevance. Aggregates are means over
queries; :func:`bootstrap_ci` resamples the per-query values to give a percentile CI.

* ``hit_rate_at_k``: 1 if any relevant item is in the top ``k``, else 0.
* ``recall_at_k``: relevant items in the top ``k`` / number of relevant items.
* ``ndcg_at_k``: DCG with a ``log2(rank + 1)`` discount (rank 1 = top), divided by the
  ideal DCG of ``min(|relevant|, k)`` relevant items at the top.
* ``auc``: the probability that a random positive outranks a random negative
  (ties count one half), from scores and binary labels.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "MetricCI",
    "hit_rate_at_k",
    "recall_at_k",
    "ndcg_at_k",
    "auc",
    "bootstrap_ci",
]


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def hit_rate_at_k(ranked: Sequence[Hashable], relevant: Collection[Hashable], k: int) -> float:
    """1.0 if one of the first ``k`` of ``ranked`` is relevant, else 0.0 (0.0 when nothing is relevant)."""
    _check_k(k)
    return 1.0 if any(item in relevant for item in ranked[:k]) else 0.0


def recall_at_k(ranked: Sequence[Hashable], relevant: Collection[Hashable], k: int) -> float:
    """Share of the relevant items found in the first ``k`` of ``ranked`` (0.0 when nothing is relevant)."""
    _check_k(k)
    if not relevant:
        return 0.0
    hits = len(set(ranked[:k]) & set(relevant))
    return hits / len(relevant)


def ndcg_at_k(ranked: Sequence[Hashable], relevant: Collection[Hashable], k: int) -> float:
    """Binary-relevance NDCG@k: sum of ``1/log2(rank+1)`` over hits, over the ideal DCG of min(|relevant|, k)."""
    _check_k(k)
    if not relevant:
        return 0.0
    rel = set(relevant)
    seen: set[Hashable] = set()
    dcg = 0.0
    for rank, item in enumerate(ranked[:k], start=1):
        if item in rel and item not in seen:  # a duplicate in the list earns nothing twice
            dcg += 1.0 / float(np.log2(rank + 1))
        seen.add(item)
    ideal = sum(1.0 / float(np.log2(rank + 1)) for rank in range(1, min(len(rel), k) + 1))
    return dcg / ideal


def auc(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """ROC AUC via the Mann-Whitney U statistic with midranks for ties.

    Raises ``ValueError`` when ``labels`` holds only one class (AUC is undefined).
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError("scores and labels must be 1-d arrays of equal length")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs at least one positive and one negative label")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # midranks: every member of a run of equal scores gets the mean of the run's 1-based ranks
    start = 0
    while start < len(s):
        end = start
        while end + 1 < len(s) and sorted_s[end + 1] == sorted_s[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


@dataclass(frozen=True, slots=True)
class MetricCI:
    """A metric's mean over queries and its bootstrap percentile confidence interval."""

    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.4f} [{self.low:.4f}, {self.high:.4f}]"


def bootstrap_ci(values: npt.ArrayLike, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> MetricCI:
    """Mean of per-query ``values`` with a percentile bootstrap CI at level ``1 - alpha``.

    Resamples the queries with replacement ``n_boot`` times using ``numpy.random.default_rng(seed)``,
    so equal seeds give equal intervals. ``n_boot=0`` gives a degenerate interval at the mean.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError("values must be 1-d")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if len(v) == 0:
        return MetricCI(float("nan"), float("nan"), float("nan"), 0)
    mean = float(v.mean())
    if n_boot <= 0:
        return MetricCI(mean, mean, mean, len(v))
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot, dtype=np.float64)
    # chunked so a large n x n_boot index matrix never has to exist at once
    chunk = max(1, 2_000_000 // len(v))
    for lo in range(0, n_boot, chunk):
        hi = min(n_boot, lo + chunk)
        idx = rng.integers(0, len(v), size=(hi - lo, len(v)))
        means[lo:hi] = v[idx].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return MetricCI(mean, float(low), float(high), len(v))
