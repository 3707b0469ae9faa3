"""Settings of one API process (pydantic-settings; environment prefix ``FRESHREC_``).

The broker, partitions, topics and model fields are the same names (and the same
environment variables) as the stream worker's :class:`streams.config.Settings`, so one
environment configures both. Serving-only fields live under ``FRESHREC_SERVING__*``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from streams.config import ModelSettings, Topics

__all__ = ["IndexSettings", "RankSettings", "ServingOptions", "ServingSettings"]


class IndexSettings(BaseModel):
    """HNSW parameters (hnswlib, inner product), one index per item shard."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    M: int = Field(48, ge=4, le=128)
    ef_construction: int = Field(200, ge=10, le=2000)
    ef: int = Field(64, ge=10, le=5000)
    #: fetch this many HNSW candidates per shard and re-rank them exactly (0 = off)
    rerank: int = Field(0, ge=0, le=5000)
    #: directory of index snapshots (None = build from the replica at every start)
    snapshot_dir: str | None = None
    #: write a snapshot to ``snapshot_dir`` at shutdown
    save_on_exit: bool = True
    #: apply coalesced vector changes to the index at this cadence
    apply_interval_s: float = Field(0.05, gt=0)
    #: at most this many changes per apply round (one hnswlib update costs ~1 ms)
    apply_max: int = Field(2000, ge=1)
    threads: int = Field(2, ge=1, le=64)
    #: search the shards of one request on this many threads (hnswlib releases the GIL)
    query_threads: int = Field(1, ge=1, le=64)


class RankSettings(BaseModel):
    """Weights of the first-version blend ranker (see :class:`serving.ranking.BlendRanker`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    w_dot: float = 1.0
    w_ctr: float = 2.0
    w_trending: float = 0.2
    w_recency: float = 0.1
    #: half-life of the item-recency bonus, in hours of event time
    recency_half_life_h: float = Field(24.0, gt=0)


class ServingOptions(BaseModel):
    """Serving-only knobs (``FRESHREC_SERVING__<NAME>``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    default_k: int = Field(20, ge=1)
    max_k: int = Field(200, ge=1, le=1000)
    #: candidates requested per source
    ann_candidates: int = Field(50, ge=1, le=5000)
    i2i_candidates: int = Field(30, ge=1, le=1000)
    #: recent items used as item-to-item seeds
    i2i_seeds: int = Field(5, ge=0, le=50)
    #: also query the mean of the recent items for users who have a vector (one more HNSW query)
    i2i_recent_with_vector: bool = False
    trending_candidates: int = Field(50, ge=1, le=5000)
    #: recompute the trending list at this cadence (seconds)
    trending_interval_s: float = Field(1.0, gt=0)
    #: log served slates to the impressions topic
    log_impressions: bool = True
    #: the changelog replica's fetch: the broker answers when ``replica_fetch_min_bytes`` are there
    #: or after ``replica_fetch_wait_ms``. Each idle Tansu fetch costs the broker ~1 ms of CPU (one
    #: idle replica at 10 ms: ~18% of a core); 1 MB / 20 ms halves that when idle but measured no
    #: saving under load (BENCHMARKS.md) and adds up to 20 ms of freshness, hence the defaults
    replica_fetch_wait_ms: int = Field(10, ge=1, le=1000)
    replica_fetch_min_bytes: int = Field(1, ge=1)
    #: a replica is "caught up" after this long without new changelog records
    catch_up_quiet_s: float = Field(0.5, gt=0)
    #: the interpreter's GIL switch interval while the API runs (seconds; 0 = leave it as it is).
    #: The request path gives up the GIL several times per request (every HNSW search, socket
    #: writes); each time a background thread (changelog replica, index apply, impressions) may
    #: take it and keep it until the request thread has waited a full interval (Python's default:
    #: 5 ms). A short interval bounds that wait.
    gil_switch_interval_s: float = Field(0.0005, ge=0, le=0.1)
    #: ``gc.freeze()`` the heap once the replicas caught up (a full collection over the 1M-item
    #: catalog and index costs ~35 ms with the GIL held; see ``Runtime.freeze_heap``)
    gc_freeze: bool = True
    #: once the replicas caught up, ask the kernel for transparent huge pages on the large anonymous
    #: mappings (the HNSW shards, vector copies, catalog): fewer TLB misses per search (``serving/memory.py``)
    huge_pages: bool = True
    index: IndexSettings = IndexSettings()
    rank: RankSettings = RankSettings()
    model_version: str = "blend-v1"


class ServingSettings(BaseSettings):
    """Settings of one ``freshrec serve`` process."""

    model_config = SettingsConfigDict(env_prefix="FRESHREC_", env_nested_delimiter="__", extra="ignore")

    bootstrap_servers: str = "127.0.0.1:9092"
    partitions: int = Field(4, ge=1, le=1024)
    topics: Topics = Topics()
    model: ModelSettings = ModelSettings()
    session_timeout_ms: int = Field(6000, ge=1000)
    serving: ServingOptions = ServingOptions()
