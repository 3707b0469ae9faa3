"""Point-in-time-correct training sets from a recorded event log.

Each output row is one labelled example at ``label_ts_us`` with the user's and the item's
features *as they were just before that time*: only events with ``ts_us < label_ts_us`` are
applied to the states the features are read from, and a feature group whose newest input is
older than its TTL is null. The state updates are the pure core's
(:func:`streams.core.state.apply_user_batch`, :func:`streams.core.state.apply_item_batch`) and
the features its readers (:func:`streams.core.state.user_features`,
:func:`streams.core.state.item_features`), so training and serving see the same numbers.

The build is a chain of small named steps, after Feast's dask point-in-time join
(``feast/infra/offline_stores/dask.py``)::

    read_events            JSONL (streams.codec) or MovieLens CSV -> time-ordered events
    label_impressions      impression slot -> clicked within the reward window? (1/0)
    label_positives        positive event -> 1, plus N sampled unseen items -> 0
    point_in_time_join     sweep labels and events in time order; features as of label_ts
    apply_ttl              null a feature group older than its TTL
    to_table               rows -> pyarrow Table (label_ts_us, *_feature_ts_us, features)
    check_leakage          every feature ts < its label ts, or raise LeakageError

:func:`build_training_set` runs the chain and always runs :func:`check_leakage`.
"""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from replay._apply import apply_batch
from streams.codec import decode
from streams.core.state import (
    TYPE_INDEX,
    CoreConfig,
    ItemState,
    UserState,
    item_features,
    user_features,
)
from streams.core.vectors import ItemReplica
from streams.errors import FreshrecError, InvalidEvent
from streams.events import POSITIVE_WEIGHTS, Event, EventType
from streams.producer import read_movielens

__all__ = [
    "LeakageError",
    "ReadResult",
    "Label",
    "TrainingSetConfig",
    "FEATURE_GROUPS",
    "read_events",
    "label_impressions",
    "label_positives",
    "point_in_time_join",
    "apply_ttl",
    "to_table",
    "check_leakage",
    "build_training_set",
    "write_parquet",
]

HOUR_US = 3_600 * 1_000_000

#: feature group -> its timestamp column and value columns (the TTL nulls a group as a whole)
FEATURE_GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "user": (
        "user_feature_ts_us",
        tuple(f"user_count_{t.value}" for t in TYPE_INDEX)
        + ("user_recent_count", "user_last_item", "user_session_id", "user_surface", "user_device"),
    ),
    "item": (
        "item_feature_ts_us",
        (
            "item_ctr_1h",
            "item_ctr_24h",
            "item_pos_1h",
            "item_pos_24h",
            "item_popularity",
            "item_trending",
            "item_impressions",
            "item_clicks",
        ),
    ),
}


class LeakageError(FreshrecError):
    """A training row carries a feature whose timestamp is not strictly before its label's."""


@dataclass(slots=True)
class ReadResult:
    """Events read from a log, time-ordered, and what was skipped."""

    events: list[Event]
    skipped: int = 0
    reasons: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True, slots=True)
class Label:
    """One labelled example: ``user_id`` x ``item_id`` at ``label_ts_us``."""

    label_ts_us: int
    user_id: str
    item_id: str
    label: int
    #: "impression", "positive" or "negative"
    source: str
    #: the event that produced the label
    event_id: str


@dataclass(frozen=True, slots=True)
class TrainingSetConfig:
    """How to label and featurize."""

    ttl_us: int = 24 * HOUR_US
    negatives: int = 4
    reward_window_us: int = HOUR_US // 2
    seed: int = 0
    core: CoreConfig = CoreConfig()


# --------------------------------------------------------------------------- read


def _read_jsonl(path: Path) -> ReadResult:
    out = ReadResult(events=[])
    with open(path, "rb") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                out.events.append(decode(line))
            except InvalidEvent as exc:
                out.skipped += 1
                out.reasons[exc.reason] += 1
    return out


def read_events(path: str | Path) -> ReadResult:
    """A log as time-ordered events: JSONL of raw events, or MovieLens ratings CSV (each rating a click).

    JSONL lines that fail :func:`streams.codec.decode` are skipped and counted by reason. Raises
    :class:`FreshrecError` for a missing file or an unknown format.
    """
    p = Path(path)
    if not p.is_file():
        raise FreshrecError(f"{p}: no such log file")
    if p.suffix.lower() == ".csv":
        with open(p, encoding="utf-8", errors="replace") as fh:
            header = fh.readline().strip().lower()
        if "movie_id" not in header and "movieid" not in header:
            raise FreshrecError(f"{p}: a CSV log must be MovieLens ratings (user_id,movie_id,rating,timestamp)")
        res = ReadResult(events=[])
        for rec in read_movielens(p):
            res.events.append(decode(rec.value))
    else:
        res = _read_jsonl(p)
    res.events.sort(key=lambda ev: ev.ts_us)  # stable: equal times keep the log's order
    return res


# --------------------------------------------------------------------------- labels


def label_impressions(events: Sequence[Event], reward_window_us: int) -> list[Label]:
    """One label per impression slot: 1 if the user clicked that item in ``(ts, ts + window]``."""
    clicks: dict[tuple[str, str], list[int]] = defaultdict(list)
    for ev in events:
        if ev.type is EventType.CLICK and ev.user_id is not None and ev.item_id is not None:
            clicks[(ev.user_id, ev.item_id)].append(ev.ts_us)
    for times in clicks.values():
        times.sort()
    labels = []
    for ev in events:
        if ev.type is not EventType.IMPRESSION or ev.user_id is None:
            continue
        for item in dict.fromkeys(ev.items):  # a slate listing an item twice is one example
            times = clicks.get((ev.user_id, item), [])
            j = bisect.bisect_right(times, ev.ts_us)  # first click strictly after the impression
            hit = j < len(times) and times[j] <= ev.ts_us + reward_window_us
            labels.append(Label(ev.ts_us, ev.user_id, item, int(hit), "impression", ev.event_id))
    return labels


def label_positives(events: Sequence[Event], negatives: int, seed: int) -> list[Label]:
    """Each positive event is a 1; ``negatives`` sampled items are 0s at the same time.

    Negatives come from the catalog *as of* the event (items that appeared strictly earlier) minus
    the items the user interacted with strictly earlier and the positive itself, drawn with
    ``numpy.random.default_rng(seed)`` in event order. ``negatives=0`` gives no examples.
    """
    if negatives <= 0:
        return []
    rng = np.random.default_rng(seed)
    catalog: list[str] = []
    in_catalog: set[str] = set()
    touched: dict[str, set[str]] = defaultdict(set)
    pending: list[Event] = []  # events at the current time: visible only to later times
    labels: list[Label] = []

    def flush() -> None:
        for old in pending:
            for item in (old.item_id, *old.items):
                if item is not None and item not in in_catalog:
                    in_catalog.add(item)
                    catalog.append(item)
            if old.user_id is not None and old.item_id is not None:
                touched[old.user_id].add(old.item_id)
        pending.clear()

    for ev in events:
        if pending and pending[0].ts_us < ev.ts_us:
            flush()
        pending.append(ev)
        if ev.type not in POSITIVE_WEIGHTS or ev.user_id is None or ev.item_id is None:
            continue
        labels.append(Label(ev.ts_us, ev.user_id, ev.item_id, 1, "positive", ev.event_id))
        excluded = touched[ev.user_id] | {ev.item_id}
        chosen: list[str] = []
        for _ in range(negatives * 10):  # bounded rejection sampling
            if len(chosen) == negatives or not catalog:
                break
            cand = catalog[int(rng.integers(len(catalog)))]
            if cand not in excluded and cand not in chosen:
                chosen.append(cand)
        labels.extend(Label(ev.ts_us, ev.user_id, c, 0, "negative", ev.event_id) for c in chosen)
    return labels


# --------------------------------------------------------------------------- join


class _States:
    """User and item states advanced through the pure core, plus the item replica."""

    def __init__(self, cfg: CoreConfig) -> None:
        self.cfg = cfg
        self.users: dict[str, UserState] = {}
        self.items: dict[str, ItemState] = {}
        #: newest input time applied per item (``ItemState.max_ts`` ignores upserts)
        self.item_ts: dict[str, int] = {}
        self.replica = ItemReplica(cfg)

    def apply(self, events: Sequence[Event]) -> None:
        """Apply one batch of events: user stage, then the item stage on its forwards."""
        for iid, fws, istate in apply_batch(events, self.cfg, self.users, self.items, self.replica):
            self.item_ts[iid] = max(self.item_ts.get(iid, fws[0].ts_us), *(fw.ts_us for fw in fws))
            if istate.vector is not None:
                self.replica.put(iid, istate.vector)


def _user_row(states: _States, user_id: str) -> dict[str, Any]:
    state = states.users.get(user_id)
    names = FEATURE_GROUPS["user"][1]
    if state is None or state.version == 0:
        return dict.fromkeys(("user_feature_ts_us", *names))
    f = user_features(state)
    counts: dict[str, int] = f["counts"]  # type: ignore[assignment]
    recent: list[str] = f["recent_items"]  # type: ignore[assignment]
    row: dict[str, Any] = {"user_feature_ts_us": state.max_ts}
    row.update({f"user_count_{k}": v for k, v in counts.items()})
    row["user_recent_count"] = len(recent)
    row["user_last_item"] = recent[0] if recent else None
    row["user_session_id"] = f["session_id"]
    row["user_surface"] = f["surface"]
    row["user_device"] = f["device"]
    return row


def _item_row(states: _States, item_id: str, now_us: int) -> dict[str, Any]:
    state = states.items.get(item_id)
    names = FEATURE_GROUPS["item"][1]
    if state is None:
        return dict.fromkeys(("item_feature_ts_us", *names))
    f = item_features(state, now_us, states.cfg)
    row: dict[str, Any] = {"item_feature_ts_us": states.item_ts[item_id]}
    row.update({f"item_{k}": v for k, v in f.items()})
    return row


def _score(states: _States, user_id: str, item_id: str) -> float | None:
    u = states.users.get(user_id)
    v = states.replica.get(item_id)
    if u is None or u.vector is None or v is None:
        return None
    return float(np.dot(u.vector, v))


def point_in_time_join(
    events: Sequence[Event], labels: Iterable[Label], cfg: CoreConfig, lookahead_us: int = 0
) -> list[dict[str, Any]]:
    """Features for every label as of just before its time: one sweep over time-ordered events.

    Before the labels at time ``t`` are read, every event with ``ts_us < t`` (strictly) has been
    applied, and nothing later. ``lookahead_us`` shifts that cutoff forward; it exists only so that
    tests can inject a leak and watch :func:`check_leakage` catch it. Rows come out ordered by
    ``label_ts_us`` (stable within a time).
    """
    ordered = sorted(events, key=lambda ev: ev.ts_us)
    states = _States(cfg)
    rows: list[dict[str, Any]] = []
    nxt = 0
    for lab in sorted(labels, key=lambda lab: lab.label_ts_us):
        cutoff = lab.label_ts_us + lookahead_us
        end = nxt
        while end < len(ordered) and ordered[end].ts_us < cutoff:
            end += 1
        if end > nxt:
            states.apply(ordered[nxt:end])
            nxt = end
        row: dict[str, Any] = {
            "label_ts_us": lab.label_ts_us,
            "user_id": lab.user_id,
            "item_id": lab.item_id,
            "label": lab.label,
            "source": lab.source,
            "event_id": lab.event_id,
        }
        row.update(_user_row(states, lab.user_id))
        row.update(_item_row(states, lab.item_id, lab.label_ts_us))
        row["user_item_score"] = _score(states, lab.user_id, lab.item_id)
        rows.append(row)
    return rows


def apply_ttl(rows: list[dict[str, Any]], ttl_us: int) -> list[dict[str, Any]]:
    """Null every feature group whose timestamp is more than ``ttl_us`` before its label (in place)."""
    for row in rows:
        stale = False
        for ts_col, names in FEATURE_GROUPS.values():
            ts = row.get(ts_col)
            if ts is not None and row["label_ts_us"] - ts > ttl_us:
                stale = True
                row[ts_col] = None
                for name in names:
                    row[name] = None
        if stale:
            row["user_item_score"] = None  # derived from both groups' state
    return rows


_STRING_COLS = {"user_id", "item_id", "source", "event_id", "user_last_item", "user_session_id", "user_surface"}
_STRING_COLS |= {"user_device"}
_INT_COLS = {"label_ts_us", "user_feature_ts_us", "item_feature_ts_us", "user_recent_count"}
_INT_COLS |= {f"user_count_{t.value}" for t in TYPE_INDEX}


def _schema() -> pa.Schema:
    cols = ["label_ts_us", "user_id", "item_id", "label", "source", "event_id"]
    for ts_col, names in FEATURE_GROUPS.values():
        cols += [ts_col, *names]
    cols.append("user_item_score")
    fields = []
    for c in cols:
        if c == "label":
            fields.append(pa.field(c, pa.int8(), nullable=False))
        elif c in _STRING_COLS:
            fields.append(pa.field(c, pa.string()))
        elif c in _INT_COLS:
            fields.append(pa.field(c, pa.int64()))
        else:
            fields.append(pa.field(c, pa.float64()))
    return pa.schema(fields)


def to_table(rows: Sequence[dict[str, Any]], metadata: dict[str, str] | None = None) -> pa.Table:
    """Rows -> a pyarrow Table with a fixed schema (``label_ts_us``, ``*_feature_ts_us``, features)."""
    schema = _schema()
    columns = {f.name: [row.get(f.name) for row in rows] for f in schema}
    table = pa.Table.from_pydict(columns, schema=schema)
    if metadata:
        table = table.replace_schema_metadata({k.encode(): v.encode() for k, v in metadata.items()})
    return table


def check_leakage(table: pa.Table) -> int:
    """Prove that every non-null ``*_feature_ts_us`` is strictly before its row's ``label_ts_us``.

    Returns the number of feature timestamps checked; raises :class:`LeakageError` naming the
    first offending row otherwise.
    """
    import pyarrow.compute as pc

    if "label_ts_us" not in table.column_names:
        raise LeakageError("the table has no label_ts_us column")
    label = table.column("label_ts_us")
    checked = 0
    ts_cols = [c for c in table.column_names if c.endswith("_feature_ts_us")]
    if not ts_cols:
        raise LeakageError("the table has no *_feature_ts_us column")
    for col in ts_cols:
        feat = table.column(col)
        bad = pc.fill_null(pc.greater_equal(feat, label), False)
        n_bad = pc.sum(bad).as_py() or 0
        if n_bad:
            row = pc.index(bad, True).as_py()
            raise LeakageError(
                f"{n_bad} row(s) join a feature from the label's time or later: {col}={feat[row].as_py()} "
                f">= label_ts_us={label[row].as_py()} (first at row {row})"
            )
        checked += len(feat) - feat.null_count
    return checked


def build_training_set(events: Sequence[Event], cfg: TrainingSetConfig) -> pa.Table:
    """Label, join point-in-time, apply the TTL, and check for leakage (always)."""
    ordered = sorted(events, key=lambda ev: ev.ts_us)
    labels = label_impressions(ordered, cfg.reward_window_us) + label_positives(ordered, cfg.negatives, cfg.seed)
    rows = apply_ttl(point_in_time_join(ordered, labels, cfg.core), cfg.ttl_us)
    table = to_table(
        rows,
        {
            "freshrec.ttl_us": str(cfg.ttl_us),
            "freshrec.negatives": str(cfg.negatives),
            "freshrec.reward_window_us": str(cfg.reward_window_us),
            "freshrec.seed": str(cfg.seed),
        },
    )
    check_leakage(table)
    return table


def write_parquet(table: pa.Table, path: str | Path) -> None:
    """Write ``table`` to ``path`` as Parquet (parent directories must exist)."""
    import pyarrow.parquet as pq

    pq.write_table(table, str(path))
