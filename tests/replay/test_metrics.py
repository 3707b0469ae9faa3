"""Ranking metrics against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from replay.metrics import MetricCI, auc, bootstrap_ci, hit_rate_at_k, ndcg_at_k, recall_at_k

RANKED = ["a", "b", "c", "d", "e"]


def test_hit_rate() -> None:
    # "c" is at rank 3: inside the top 3, outside the top 2
    assert hit_rate_at_k(RANKED, {"c"}, 3) == 1.0
    assert hit_rate_at_k(RANKED, {"c"}, 2) == 0.0
    assert hit_rate_at_k(RANKED, {"z"}, 5) == 0.0
    assert hit_rate_at_k(RANKED, set(), 5) == 0.0


def test_recall() -> None:
    # relevant {b, e, z}: top-2 = {a, b} holds b -> 1/3; top-5 holds b, e -> 2/3
    assert recall_at_k(RANKED, {"b", "e", "z"}, 2) == pytest.approx(1 / 3)
    assert recall_at_k(RANKED, {"b", "e", "z"}, 5) == pytest.approx(2 / 3)
    assert recall_at_k(RANKED, set(), 5) == 0.0


def test_ndcg_single_relevant() -> None:
    # one relevant item at rank 2: DCG = 1/log2(3); ideal = 1/log2(2) = 1
    assert ndcg_at_k(RANKED, {"b"}, 5) == pytest.approx(1 / math.log2(3))
    # at rank 1 it is perfect
    assert ndcg_at_k(RANKED, {"a"}, 5) == pytest.approx(1.0)
    # beyond k it earns nothing
    assert ndcg_at_k(RANKED, {"d"}, 3) == 0.0


def test_ndcg_ideal_uses_min_of_relevant_and_k() -> None:
    # relevant {a, c, x, y}, k=2: hits at rank 1 only -> DCG = 1
    # ideal over min(4, 2) = 2 positions: 1 + 1/log2(3) = 1.6309...
    expected = 1.0 / (1.0 + 1.0 / math.log2(3))
    assert ndcg_at_k(RANKED, {"a", "c", "x", "y"}, 2) == pytest.approx(expected)
    # relevant {b, d}, k=5: DCG = 1/log2(3) + 1/log2(5) = 0.6309 + 0.4307 = 1.0616
    # ideal over 2 positions = 1 + 0.6309 = 1.6309 -> 0.6509
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    assert ndcg_at_k(RANKED, {"b", "d"}, 5) == pytest.approx(dcg / (1 + 1 / math.log2(3)))
    assert ndcg_at_k(RANKED, {"b", "d"}, 5) == pytest.approx(0.6509, abs=1e-4)


def test_k_must_be_positive() -> None:
    with pytest.raises(ValueError):
        recall_at_k(RANKED, {"a"}, 0)


def test_auc_hand_computed() -> None:
    # positives score 0.9 and 0.4, negatives 0.6 and 0.1.
    # pairs (pos, neg): (0.9>0.6) (0.9>0.1) (0.4<0.6) (0.4>0.1) -> 3 of 4 = 0.75
    assert auc([0.9, 0.6, 0.4, 0.1], [1, 0, 1, 0]) == pytest.approx(0.75)
    # a tie between a positive and a negative counts one half: (0.5 = 0.5) -> 0.5 of 1 pair
    assert auc([0.5, 0.5], [1, 0]) == pytest.approx(0.5)
    # positives 0.8, 0.5; negatives 0.5, 0.2 -> pairs: 1, 1, 0.5 (tie), 1 -> 3.5 / 4
    assert auc([0.8, 0.5, 0.5, 0.2], [1, 1, 0, 0]) == pytest.approx(0.875)
    assert auc([1.0, 2.0, 3.0], [0, 0, 1]) == pytest.approx(1.0)


def test_auc_needs_both_classes() -> None:
    with pytest.raises(ValueError):
        auc([0.1, 0.2], [1, 1])


def test_bootstrap_constant_values_have_zero_width() -> None:
    # every resample of [0.25]*50 has mean 0.25
    ci = bootstrap_ci([0.25] * 50, n_boot=200, seed=3)
    assert ci == MetricCI(0.25, 0.25, 0.25, 50)


def test_bootstrap_is_seeded_and_covers_the_mean() -> None:
    rng = np.random.default_rng(11)
    values = rng.random(400)
    a = bootstrap_ci(values, n_boot=500, seed=7)
    b = bootstrap_ci(values, n_boot=500, seed=7)
    c = bootstrap_ci(values, n_boot=500, seed=8)
    assert a == b
    assert a != c
    assert a.low < a.mean < a.high
    # uniform(0,1): sd = 0.2887, standard error over 400 = 0.0144; a 95% CI spans ~4 SE = 0.057
    assert 0.03 < a.high - a.low < 0.09
    assert a.mean == pytest.approx(float(values.mean()))


def test_bootstrap_empty_and_zero_resamples() -> None:
    assert bootstrap_ci([], n_boot=10).n == 0
    ci = bootstrap_ci([0.0, 1.0], n_boot=0)
    assert (ci.mean, ci.low, ci.high) == (0.5, 0.5, 0.5)
