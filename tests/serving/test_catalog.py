"""The serving catalog: the encoded fast path equals the core's item_features; the trending list."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.catalog import ItemCatalog
from streams.core import serde
from streams.core.state import B5_US, B60_US, CoreConfig, ItemState

CFG = CoreConfig(dim=8)
NOW = 1_795_000_000 * 1_000_000

counts = st.lists(st.integers(0, 50), min_size=3, max_size=3)


@settings(max_examples=200, deadline=None)
@given(
    b5=st.dictionaries(st.integers(NOW // B5_US - 30, NOW // B5_US + 2), counts, max_size=30),
    b60=st.dictionaries(st.integers(NOW // B60_US - 60, NOW // B60_US + 2), counts, max_size=60),
    max_ts=st.integers(NOW - 3 * B60_US, NOW + B60_US),
    eligible=st.booleans(),
)
def test_encoded_fast_path_equals_item_features(
    b5: dict[int, list[int]], b60: dict[int, list[int]], max_ts: int, eligible: bool
) -> None:
    state = ItemState(b5=b5, b60=b60, max_ts=max_ts, eligible=eligible, category="c",
                      vector=np.arange(8, dtype=np.float32))  # fmt: skip
    slow, fast = ItemCatalog(CFG), ItemCatalog(CFG)
    slow.update("i1", state)
    vector, elig = fast.update_encoded("i1", serde.encode_item(state))
    assert elig is eligible and vector is not None and np.array_equal(vector, state.vector)  # type: ignore[arg-type]
    for col in ("ctr", "popularity", "trending", "last_ts", "eligible"):
        assert np.array_equal(getattr(slow, col)[:1], getattr(fast, col)[:1]), col
    assert np.array_equal(slow.vectors[:1], fast.vectors[:1]) and slow.category == fast.category


def test_trending_is_decayed_popularity_over_eligible_items() -> None:
    cat = ItemCatalog(CFG)
    t = (NOW // B60_US) * B60_US  # an hour boundary: the bucket of the hour before ends exactly at t
    h = t // B60_US
    cat.update("hot", ItemState(b60={h - 1: [0, 0, 8]}, max_ts=t))
    cat.update("warm", ItemState(b60={h - 1: [0, 0, 4]}, max_ts=t))
    cat.update("old", ItemState(b60={h - 11: [0, 0, 100]}, max_ts=t - 10 * B60_US))
    cat.update("banned", ItemState(b60={h - 1: [0, 0, 50]}, max_ts=t, eligible=False))
    cat.refresh_trending(t, 10)
    # hot 8 and warm 4 (no decay: their buckets end at t); old 100 at its last event, then
    # 10 half-lives (1 h each) older at t: 100 / 1024
    assert cat.trending_ids == ["hot", "warm", "old"]
    scores = cat.hot_scores(t)
    assert scores[cat.row("hot")] == 8.0 and scores[cat.row("warm")] == 4.0
    assert abs(scores[cat.row("old")] - 100 / 1024) < 1e-5
    assert scores[cat.row("banned")] == -np.inf
    assert cat.row("missing") == -1 and len(cat) == 4


def test_columns_grow_past_the_initial_capacity() -> None:
    cat = ItemCatalog(CFG, capacity=2)
    for n in range(5):
        cat.update(f"i{n}", ItemState(max_ts=NOW + n, vector=np.full(8, n, dtype=np.float32)))
    assert len(cat) == 5
    assert cat.vectors[cat.row("i4")][0] == 4.0 and cat.last_ts[cat.row("i3")] == NOW + 3
    assert list(cat.rows(["i1", "nope", "i4"])) == [1, -1, 4]


def test_incremental_trending_equals_a_full_pass_as_items_and_time_move() -> None:
    rng = np.random.default_rng(7)
    cat = ItemCatalog(CFG)
    t = (NOW // B60_US) * B60_US
    h = t // B60_US

    def write(item: str, now: int, top: int = 1000) -> None:
        b60 = {h - int(rng.integers(1, 6)): [0, 0, int(rng.integers(1, top))] for _ in range(2)}
        cat.update(item, ItemState(b60=b60, max_ts=now - int(rng.integers(0, 3 * B60_US)), eligible=rng.random() > 0.1))

    for i in range(400):
        write(f"i{i}", t)
    now, size = t, 10
    incremental = 0
    for _ in range(150):
        for _ in range(int(rng.integers(0, 30))):
            write(f"i{int(rng.integers(0, 450))}", now)  # changes, eligibility flips, new items
        for item in cat.trending_ids[: int(rng.integers(0, 8))]:
            write(item, now, top=50)  # the leaders fall back: rows from outside the kept set move up
        now += int(rng.integers(0, B60_US // 4))
        passes = cat.trending_full_passes
        cat.refresh_trending(now, size)
        incremental += cat.trending_full_passes == passes
        got = cat.trending_ids
        cat._refresh_full(now, size)  # the reference: every row's score as of now
        assert got == cat.trending_ids and len(got) == size
    assert incremental > 100  # most refreshes never scanned the whole catalog
