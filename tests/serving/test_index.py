"""serving.index: recall against a brute-force oracle, staged updates, snapshots, edge cases.

Data is clustered and embedding-like (64 Gaussian centers plus noise), seeded; expected values
come from the oracle or from hand reasoning stated next to each assertion.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from serving.index import HnswShard, IndexParams, ShardedIndex, brute_force_topk
from streams.core.partition import partition_for

F32 = npt.NDArray[np.float32]


def clustered(n: int, dim: int, *, centers: int = 64, noise: float = 0.35, seed: int = 0) -> F32:
    """``n`` vectors around ``centers`` unit-norm Gaussian centers (embedding-like)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, dim))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = c[rng.integers(0, centers, n)] + noise * rng.standard_normal((n, dim)) / np.sqrt(dim)
    return x.astype(np.float32)


def ids_for(n: int) -> list[str]:
    return [f"item-{j}" for j in range(n)]


def built(x: F32, *, partitions: int = 4, **params: int) -> ShardedIndex:
    ix = ShardedIndex(IndexParams(dim=x.shape[1], **params), partitions)
    ix.build(zip(ids_for(len(x)), x, strict=True))
    return ix


def recall(ix: ShardedIndex, x: F32, queries: F32, k: int) -> float:
    ids = ids_for(len(x))
    rows, _ = brute_force_topk(x, queries, k)
    hits = 0
    for q, exact in zip(queries, rows, strict=True):
        got = {i for i, _ in ix.search(q, k)}
        hits += len(got & {ids[r] for r in exact})
    return hits / (k * len(queries))


@pytest.fixture(scope="module")
def data20k() -> tuple[F32, F32]:
    x = clustered(20_000, 32, seed=1)
    # user-like queries: drawn from the same clusters as the items
    q = clustered(200, 32, seed=2)
    return x, q


def test_brute_force_oracle_by_hand() -> None:
    m = np.array([[1, 0], [0, 1], [1, 1], [-1, 0]], dtype=np.float32)
    rows, scores = brute_force_topk(m, np.array([1, 2], dtype=np.float32), 3)
    # dots: 1, 2, 3, -1 -> best three are rows 2, 1, 0
    assert rows.tolist() == [2, 1, 0]
    assert scores.tolist() == [3.0, 2.0, 1.0]
    rows, _ = brute_force_topk(m, np.array([[1, 2], [-1, 0]], dtype=np.float32), 10)
    assert rows.shape == (2, 4)  # k clamped to the 4 rows
    assert rows[1, 0] == 3  # (-1, 0) . (-1, 0) = 1 is the only positive dot


@pytest.mark.parametrize(("mips", "plain_min", "reranked_min"), [(False, 0.88, 0.96), (True, 0.93, 0.98)])
def test_recall_at_100_against_brute_force(
    data20k: tuple[F32, F32], mips: bool, plain_min: float, reranked_min: float
) -> None:
    x, q = data20k
    # one build thread: hnswlib with a fixed seed is then deterministic
    ix = built(x, ef=100, rerank=0, threads=1, mips=mips)
    assert ix.size == len(x)
    # every shard holds exactly the items Kafka's partitioner sends it
    for p, shard in enumerate(ix.shards):
        assert len(shard) == sum(1 for i in ids_for(len(x)) if partition_for(i, 4) == p)
    plain = recall(ix, x, q, 100)
    ix.params = IndexParams(dim=32, ef=100, rerank=400, mips=mips)
    reranked = recall(ix, x, q, 100)
    # DESIGN.md measured 0.957 at ef=200 on 100k x 64 for one index. Here each of 4 shards
    # holds 5k items in 32 dims, and re-ranking 400 candidates per shard (1600 for k=100)
    # equals searching with ef=400. Measured on this seeded data: 0.92 plain / 0.985 re-ranked
    # for the raw inner-product graph, 0.97 / 0.9997 with the MIPS reduction (64 clusters of
    # nearly equal norms: its good case); a merge that loses one of the 4 shards gives ~0.75.
    # The thresholds leave 1.5-4 points of margin and still fail such a bug.
    assert plain >= plain_min
    assert reranked >= reranked_min
    assert reranked >= plain


@pytest.mark.parametrize("mips", [True, False])
def test_exhaustive_search_equals_oracle_with_and_without_mips(mips: bool) -> None:
    # norms vary 4x; with ef above the items per shard the HNSW search visits everything, so
    # both graphs must give the oracle's ranking: the reduction changes the graph, not the order
    rng = np.random.default_rng(20)
    x = (clustered(600, 16, seed=21) * rng.uniform(0.5, 2.0, size=(600, 1))).astype(np.float32)
    ix = built(x, partitions=2, ef=400, mips=mips)
    for q in clustered(20, 16, seed=22):
        rows, scores = brute_force_topk(x, q, 25)
        res = ix.search(q, 25)
        assert [i for i, _ in res] == [f"item-{r}" for r in rows]
        assert [s for _, s in res] == pytest.approx(scores.tolist(), rel=1e-5)


def test_mips_radius_follows_the_data_while_small_then_freezes() -> None:
    from serving import index as index_module

    ix = ShardedIndex(IndexParams(dim=4, mips=True), 1)
    shard = ix.shards[0]
    ix.upsert("first", np.array([1, 0, 0, 0], dtype=np.float32))
    ix.apply_pending()
    assert shard.radius == pytest.approx(1.0)  # headroom 1.0 x the only norm
    ix.upsert("longer", np.array([0, 3, 0, 0], dtype=np.float32))
    ix.apply_pending()
    # the shard is small: R follows the longer vector, nothing overflows, "first" re-indexed
    assert shard.radius == pytest.approx(3.0)
    assert ix.norm_overflow == 0
    assert ix.search(np.array([1, 0, 0, 0], dtype=np.float32), 1)[0][0] == "first"
    # fill past the adaptive limit with short vectors, then a longer one overflows
    rng = np.random.default_rng(23)
    filler = rng.standard_normal((index_module._ADAPT_LIVE, 4)).astype(np.float32)
    filler /= np.linalg.norm(filler, axis=1, keepdims=True)
    ix.build((f"f{j}", v) for j, v in enumerate(filler))
    ix.upsert("longest", np.array([0, 0, 5, 0], dtype=np.float32))
    ix.apply_pending()
    assert shard.radius == pytest.approx(3.0)
    assert ix.norm_overflow == 1
    # exact score 25 beats any other item's q . x <= 5 * 3
    assert ix.search(np.array([0, 0, 5, 0], dtype=np.float32), 1)[0] == ("longest", pytest.approx(25.0))


def test_vectors_longer_than_the_radius_are_counted_and_still_found() -> None:
    ix = ShardedIndex(IndexParams(dim=4, mips=True, max_norm=1.0), 1)
    rng = np.random.default_rng(21)
    small = rng.standard_normal((50, 4)).astype(np.float32)
    small /= 2 * np.linalg.norm(small, axis=1, keepdims=True)  # norm 0.5 < R = 1
    for j, v in enumerate(small):
        ix.upsert(f"s{j}", v)
    long = np.array([2.0, 0, 0, 0], dtype=np.float32)  # norm 2 > R
    ix.upsert("long", long)
    ix.apply_pending()
    assert ix.norm_overflow == 1
    assert ix.shards[0].radius == 1.0
    # exact score q . long = 2 . 2 = 4 beats every other q . s <= 2 * 0.5 = 1
    assert ix.search(long, 1) == [("long", pytest.approx(4.0))]


def test_scores_are_exact_inner_products_best_first(data20k: tuple[F32, F32]) -> None:
    x, q = data20k
    ix = built(x[:3000], ef=50)
    pos = {i: j for j, i in enumerate(ids_for(3000))}
    for v in q[:20]:
        res = ix.search(v, 30)
        assert len(res) == 30
        scores = [s for _, s in res]
        assert scores == sorted(scores, reverse=True)
        for item, s in res:
            assert s == pytest.approx(float(x[pos[item]] @ v), rel=1e-5, abs=1e-5)


def test_moved_vector_is_found_at_new_position_only() -> None:
    x = clustered(2000, 32, seed=3)
    ix = built(x)
    item, j = "item-5", 5
    old = x[j]
    maxnorm = float(np.linalg.norm(x, axis=1).max())
    # opposite direction, 10x any norm: q=new scores |new|^2 for item-5 and at most
    # |new| * maxnorm = |new|^2 / 10 for any other item, so item-5 must be top-1 for q=new;
    # and old . new < 0, while old's own cluster mates score > 0, so it drops out of old's top-10.
    new = (-old / np.linalg.norm(old) * 10 * maxnorm).astype(np.float32)
    assert item in {i for i, _ in ix.search(old, 10)}

    ix.upsert(item, new)
    assert ix.search(new, 1)[0][0] != item  # only staged, not visible yet
    assert ix.pending == 1
    v0 = ix.version
    assert ix.apply_pending() == 1
    assert ix.version == v0 + 1
    top_id, top_score = ix.search(new, 1)[0]
    assert top_id == item
    assert top_score == pytest.approx(float(new @ new), rel=1e-5)
    assert item not in {i for i, _ in ix.search(old, 10)}
    np.testing.assert_array_equal(ix.item_vector(item), new)
    assert ix.size == 2000
    mat, found = ix.item_vectors([item, "missing", "item-6"])
    assert found.tolist() == [True, False, True]
    np.testing.assert_array_equal(mat, np.stack([new, np.zeros(32, dtype=np.float32), x[6]]))


def test_removed_item_never_appears_and_can_be_re_added() -> None:
    x = clustered(2000, 32, seed=4)
    ix = built(x)
    item, j = "item-7", 7
    ix.remove(item)
    ix.remove("never-seen")  # unknown ids are ignored
    assert ix.apply_pending() == 2
    assert ix.size == 1999
    assert ix.item_vector(item) is None
    for k in (1, 10, 500):
        assert item not in {i for i, _ in ix.search(x[j], k)}
    # re-adding (same label, unmarked and replaced) makes it findable again
    ix.upsert(item, x[j] * 20)
    ix.apply_pending()
    assert ix.size == 2000
    assert ix.search(x[j], 1)[0][0] == item
    shard = ix.shards[ix.shard_of(item)]
    assert shard.labels_used == len(shard)  # no new label was taken


@pytest.mark.parametrize("mips", [False, True])
def test_min_move_skips_graph_updates_but_keeps_scores_exact(mips: bool) -> None:
    x = clustered(1000, 16, seed=18)
    ix = built(x, partitions=2, mips=mips, min_move=0.1)
    item, v = "item-9", x[9]
    ix.upsert(item, v)  # unchanged: never touches the graph
    ix.apply_pending()
    assert ix.skipped_updates == 1
    nudged = (v * 1.05).astype(np.float32)  # moved by 5% of its length < 10%
    ix.upsert(item, nudged)
    ix.apply_pending()
    assert ix.skipped_updates == 2
    np.testing.assert_array_equal(ix.item_vector(item), nudged)
    res = dict(ix.search(v, 5))
    assert res[item] == pytest.approx(float(nudged @ v), rel=1e-5)  # exact score of the new vector
    # a second 5% step is 10.25% away from what the graph holds: it must update the graph
    ix.upsert(item, (v * 1.1025).astype(np.float32))
    ix.apply_pending()
    assert ix.skipped_updates == 2
    # a removed item that comes back is always (re)indexed
    ix.remove(item)
    ix.apply_pending()
    ix.upsert(item, v)
    ix.apply_pending()
    assert ix.skipped_updates == 2 and ix.item_vector(item) is not None


def test_buffer_last_change_wins_both_ways() -> None:
    x = clustered(500, 16, seed=5)
    ix = built(x, partitions=2)
    ix.upsert("item-1", x[1] * 3)
    ix.remove("item-1")  # remove after upsert wins
    ix.remove("item-2")
    ix.upsert("item-2", x[2] * 30)  # upsert after remove wins
    assert ix.pending == 2
    ix.apply_pending()
    assert ix.item_vector("item-1") is None
    np.testing.assert_array_equal(ix.item_vector("item-2"), x[2] * 30)
    assert ix.size == 499


def test_staging_copies_the_vector() -> None:
    ix = ShardedIndex(IndexParams(dim=4), 1)
    v = np.ones(4, dtype=np.float32)
    ix.upsert("a", v)
    v[:] = 7  # the caller reuses its buffer
    ix.apply_pending()
    np.testing.assert_array_equal(ix.item_vector("a"), np.ones(4, dtype=np.float32))


def test_coalescing_and_staleness_with_fake_clock() -> None:
    now = [100.0]
    ix = ShardedIndex(IndexParams(dim=8, max_elements=4), 4, clock=lambda: now[0])
    rng = np.random.default_rng(6)
    vecs = rng.standard_normal((1000, 8)).astype(np.float32)
    assert ix.oldest_pending_age_s() == 0.0
    for v in vecs:
        ix.upsert("hot", v)
    assert ix.pending == 1
    now[0] = 105.0
    ix.upsert("cold", vecs[0])
    now[0] = 107.0
    ix.upsert("hot", vecs[-1])  # re-staging keeps the first staging time (100)
    now[0] = 110.0
    assert ix.oldest_pending_age_s() == pytest.approx(10.0)
    assert ix.apply_pending(max_items=1) == 1  # oldest first: "hot"
    assert ix.pending == 1
    assert ix.oldest_pending_age_s() == pytest.approx(5.0)  # "cold", staged at 105
    np.testing.assert_array_equal(ix.item_vector("hot"), vecs[-1])
    assert ix.item_vector("cold") is None
    hot_shard = ix.shards[ix.shard_of("hot")]
    assert hot_shard.labels_used == 1  # 1000 upserts became one applied change
    assert ix.apply_pending() == 1
    assert ix.pending == 0 and ix.oldest_pending_age_s() == 0.0
    assert ix.apply_pending() == 0
    assert ix.version == 2  # two applies changed something; the empty one did not bump


def test_shards_grow_by_doubling() -> None:
    x = clustered(300, 8, seed=7)
    ix = ShardedIndex(IndexParams(dim=8, max_elements=2), 1)
    for item, v in zip(ids_for(300), x, strict=True):
        ix.upsert(item, v)
    assert ix.apply_pending() == 300
    assert ix.size == 300
    assert ix.shards[0]._index.get_max_elements() == 512  # 2 doubled until >= 300
    for j in (0, 150, 299):
        assert ix.item_vector(f"item-{j}") is not None


def test_snapshot_round_trip(tmp_path: Path) -> None:
    x = clustered(3000, 16, seed=8)
    ix = built(x, rerank=50)
    ix.remove("item-3")
    ix.upsert("item-4", x[4] * 5)
    ix.upsert("brand-new", x[9])
    # save applies staged changes first, so the snapshot holds everything staged so far
    ix.save(tmp_path / "ix", {0: 10, 3: 42})
    assert ix.pending == 0
    # saving again replaces the snapshot atomically and leaves no temporary directories
    ix.save(tmp_path / "ix", {0: 11, 3: 42})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ix"]

    loaded = ShardedIndex.load(tmp_path / "ix")
    assert loaded.watermark == {0: 11, 3: 42}
    assert loaded.size == ix.size == 3000 - 1 + 1
    assert loaded.version == ix.version
    assert loaded.params == ix.params
    queries = clustered(50, 16, seed=9)
    for q in queries:
        assert loaded.search(q, 20) == ix.search(q, 20)
    assert loaded.item_vector("item-3") is None
    np.testing.assert_array_equal(loaded.item_vector("item-4"), x[4] * 5)
    # the loaded index keeps working: updates, re-adds and growth beyond the saved capacity
    # 10x any stored norm: top-1 for itself by Cauchy-Schwarz (see the moved-vector test)
    big = (x[3] / np.linalg.norm(x[3]) * 10 * float(np.linalg.norm(x, axis=1).max())).astype(np.float32)
    loaded.upsert("item-3", big)
    for j in range(2000):
        loaded.upsert(f"extra-{j}", x[j])
    loaded.apply_pending()
    assert loaded.size == 3000 + 1 + 2000
    assert loaded.search(big, 1)[0][0] == "item-3"


def test_load_overrides_query_settings_and_rejects_missing(tmp_path: Path) -> None:
    ix = built(clustered(200, 8, seed=10), partitions=2)
    ix.save(tmp_path / "s")
    loaded = ShardedIndex.load(tmp_path / "s", ef=33, rerank=7)
    assert (loaded.params.ef, loaded.params.rerank) == (33, 7)
    loaded.set_ef(64)
    assert loaded.params.ef == loaded.shards[1].params.ef == 64
    with pytest.raises(ValueError):
        loaded.set_ef(0)
    assert loaded.watermark == {}
    with pytest.raises(FileNotFoundError):
        ShardedIndex.load(tmp_path / "nothing")


def test_snapshot_without_mips_fields_loads_as_raw_inner_product(tmp_path: Path) -> None:
    import json

    x = clustered(300, 8, seed=16)
    ix = built(x, partitions=2, mips=False)
    ix.save(tmp_path / "old")
    # strip what snapshots written before the reduction existed did not have
    for manifest in (tmp_path / "old").rglob("manifest.json"):
        data = json.loads(manifest.read_text())
        for key in ("mips", "max_norm", "norm_headroom"):
            data["params"].pop(key)
        data.pop("radius", None)
        data.pop("overflow", None)
        manifest.write_text(json.dumps(data))
    loaded = ShardedIndex.load(tmp_path / "old")
    assert loaded.params.mips is False
    q = clustered(1, 8, seed=17)[0]
    assert loaded.search(q, 10) == ix.search(q, 10)


def test_shard_snapshot_round_trip(tmp_path: Path) -> None:
    x = clustered(400, 8, seed=11)
    shard = HnswShard(IndexParams(dim=8))
    shard.upsert_many(ids_for(400), x)
    shard.remove_many(["item-0"])
    shard.save(tmp_path / "one", {1: 5})
    back = HnswShard.load(tmp_path / "one")
    assert len(back) == 399
    assert back.query(x[1], 5)[0] == shard.query(x[1], 5)[0]


def test_k_larger_than_items_empty_index_and_bad_k() -> None:
    empty = ShardedIndex(IndexParams(dim=4), 3)
    assert empty.search(np.ones(4, dtype=np.float32), 10) == []
    x = clustered(5, 4, seed=12)
    ix = built(x, partitions=3)
    q = np.array([1, -1, 0.5, 2], dtype=np.float32)
    res = ix.search(q, 100)
    rows, scores = brute_force_topk(x, q, 5)
    # 5 items: all of them, in exact order
    assert [i for i, _ in res] == [f"item-{r}" for r in rows]
    assert [s for _, s in res] == pytest.approx(scores.tolist(), rel=1e-5)
    for bad in (0, -1):
        with pytest.raises(ValueError):
            ix.search(q, bad)
    with pytest.raises(ValueError):
        ix.search(np.ones(3, dtype=np.float32), 1)  # wrong dimension
    with pytest.raises(ValueError):
        ix.upsert("x", np.array([1, np.nan, 0, 0], dtype=np.float32))


def test_exclude_set() -> None:
    # 400 items over 4 shards with ef=200 > items per shard: the search is exhaustive here
    x = clustered(400, 16, seed=13)
    ix = built(x, ef=200)
    q = x[17]
    rows, _ = brute_force_topk(x, q, 400)
    ranked = [f"item-{r}" for r in rows]
    # excluding the exact top-50 must give exact ranks 51..60, even though the excluded
    # items are spread unevenly over the shards
    excl = set(ranked[:50])
    res = ix.search(q, 10, exclude=excl)
    assert [i for i, _ in res] == ranked[50:60]
    # excluding unknown ids changes nothing
    assert ix.search(q, 10, exclude={"nope"}) == ix.search(q, 10)
    # excluding everything but 3 items leaves those 3
    assert {i for i, _ in ix.search(q, 10, exclude=set(ranked[3:]))} == set(ranked[:3])


def test_heavily_deleted_shard_never_raises() -> None:
    x = clustered(3000, 16, seed=14)
    ix = built(x, partitions=1, M=4, ef=10)
    dead = ids_for(3000)[:2950]
    for item in dead:
        ix.remove(item)
    ix.apply_pending()
    assert ix.size == 50
    for q in x[:20]:
        res = ix.search(q, 50)
        assert len(res) <= 50
        assert not {i for i, _ in res} & set(dead)


def test_search_concurrent_with_apply() -> None:
    x = clustered(4000, 16, seed=15)
    ix = ShardedIndex(IndexParams(dim=16, max_elements=8, apply_chunk=16), 2)
    errors: list[BaseException] = []
    done = threading.Event()

    def writer() -> None:
        try:
            for start in range(0, 4000, 250):
                for j in range(start, start + 250):
                    ix.upsert(f"item-{j}", x[j])
                ix.apply_pending(max_items=100)  # leaves a backlog, applied next round
            while ix.pending:
                ix.apply_pending()
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread
            errors.append(exc)
        finally:
            done.set()

    t = threading.Thread(target=writer)
    t.start()
    searches = 0
    while not done.is_set() or searches < 50:
        for _, s in ix.search(x[searches % 4000], 10):
            assert np.isfinite(s)
        searches += 1
    t.join()
    assert not errors
    assert ix.size == 4000


def test_parallel_shard_search_and_per_shard_k_give_the_exact_sharded_answer(data20k: tuple[F32, F32]) -> None:
    x, queries = data20k
    ix = built(x)
    assert ix.shard_k(100, 4) == 60 and ix.shard_k(100, 1) == 100 and ix.shard_k(10, 4) == 10
    sequential = ix.search_many(queries[:20], 100)
    ix.shard_k_exact = True
    full = ix.search_many(queries[:20], 100)
    ix.shard_k_exact = False
    ix.set_query_threads(2)
    parallel = ix.search_many(queries[:20], 100)
    assert parallel == sequential  # the same shard answers, merged the same way
    # asking each shard for 60 instead of 100 changes nothing unless one shard holds > 60 of a
    # global top-100; with ids hashed over 4 shards that is a > 5-sigma event
    assert full == sequential
