"""Settings of the stream worker and the tools around it (pydantic-settings).

Every field can be set by an environment variable ``FRESHREC_<NAME>`` (for
example ``FRESHREC_BOOTSTRAP_SERVERS``) or by the matching CLI flag.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from streams.core.state import CoreConfig

__all__ = ["Topics", "ModelSettings", "Settings"]


class Topics(BaseModel):
    """Topic names. Input topics are co-partitioned by user id."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    events: str = "events"
    impressions: str = "impressions"
    by_item: str = "events.by-item"
    dlq: str = "events.dlq"
    user_changelog: str = "freshrec.user-state.changelog"
    item_changelog: str = "freshrec.item-state.changelog"
    meta: str = "freshrec.meta"

    @classmethod
    def tagged(cls, tag: str) -> Topics:
        """A private set of topics (``events-<tag>``, ...): tests and benchmarks never share state."""
        return cls(
            events=f"events-{tag}",
            impressions=f"impressions-{tag}",
            by_item=f"by-item-{tag}",
            dlq=f"dlq-{tag}",
            user_changelog=f"user-cl-{tag}",
            item_changelog=f"item-cl-{tag}",
            meta=f"meta-{tag}",
        )


class ModelSettings(BaseModel):
    """Hyperparameters of the online state logic (mirrors :class:`CoreConfig`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dim: int = Field(64, ge=2, le=1024)
    lr: float = Field(0.05, gt=0)
    reg: float = Field(0.002, ge=0)
    negatives: int = Field(4, ge=1, le=64)
    recent_n: int = Field(50, ge=1, le=1000)
    lateness_s: float = Field(3600.0, ge=0)
    seed: int = 0

    def core(self) -> CoreConfig:
        """The pure-logic config."""
        return CoreConfig(
            dim=self.dim,
            lr=self.lr,
            reg=self.reg,
            negatives=self.negatives,
            recent_n=self.recent_n,
            lateness_us=int(self.lateness_s * 1_000_000),
            seed=self.seed,
        )


class Settings(BaseSettings):
    """Settings of one freshrec stream worker / CLI invocation."""

    model_config = SettingsConfigDict(env_prefix="FRESHREC_", env_nested_delimiter="__", extra="forbid")

    bootstrap_servers: str = "127.0.0.1:9092"
    partitions: int = Field(4, ge=1, le=1024)
    data_dir: str = ".freshrec/data"
    group_id: str = "freshrec-worker"
    topics: Topics = Topics()
    model: ModelSettings = ModelSettings()
    batch_size: int = Field(5000, ge=1)
    poll_timeout_s: float = Field(0.005, gt=0)
    #: after a batch of fewer than ``batch_size // 2`` records, the next batch starts no sooner than
    #: this long after that one started. Under load batches are full and nothing waits; at a trickle
    #: the worker takes ~1/interval batches a second instead of one per fetch. Every batch costs the
    #: broker a produce request and a stored record batch per touched partition of the forward and
    #: changelog topics, and the embedded broker lists a partition's stored batches on every fetch of it
    #: (docs/ARCHITECTURE.md, "Tansu quirks"); 0 turns it off.
    min_batch_interval_s: float = Field(0.05, ge=0, le=5)
    #: after a batch of fewer than ``batch_size`` records, the worker applies the forwards that batch
    #: sent to its own item partitions in the same step, so that a click reaches the item store with
    #: the user store, not one batch later: from the packs' delivery reports where the partition's item
    #: stage is caught up (no wait), else by reading them back for up to this long. Under load (full
    #: batches) they ride with the next batch; 0 turns both off.
    forward_wait_s: float = Field(0.05, ge=0, le=5)
    session_timeout_ms: int = Field(6000, ge=1000)
    sync_writes: bool = False
    #: decoded user/item states kept in memory per worker process, write-through (0 disables it);
    #: shared by the shards the worker owns, each growing into what the others leave free (users
    #: usually need far more room than items; streams/worker.py ``_share_cache``). It saves the decode of a
    #: hot key's state (~15 us for a user with 50 recent items) in every batch: on
    #: benchmarks/ingest.py freshness p50 137-152 ms with it, 239-333 ms without (same throughput).
    state_cache_entries: int = Field(100_000, ge=0)
    stats_path: str | None = None
    stats_interval_s: float = Field(1.0, gt=0)

    @property
    def store_url(self) -> str:
        """URL of the live stores."""
        return f"rocksdb://{self.data_dir}"  # "rocksdb:///abs" or "rocksdb://relative"
