"""Serving benchmark: the API over live state vs a hello-world endpoint, same run, same stack.

    python benchmarks/serving.py [--items 1000000] [--users 100000] [--partitions 4]
                                 [--rate 300] [--duration 20] [--concurrency 8]

Everything real on 127.0.0.1: a fresh embedded Tansu broker, a ``freshrec worker`` process,
a ``freshrec serve`` process (one uvicorn worker, uvloop + httptools), and a baseline
``hello_app`` process on the same stack.

1. Catalog: ``--items`` seeded clustered vectors (64 Gaussian centers + noise, like trained
   embeddings) with Zipf popularity, written as item states to the item-state changelog
   (what the worker would publish), and ``--users`` user states with vectors and 5 recent
   items to the user-state changelog.
2. Index: a snapshot of the sharded HNSW index over exactly those records is built once and
   cached under ``.freshrec/bench-cache`` (a 1M x 64 build takes minutes); the API loads it
   and replays only the changelog records after its watermark (the documented start-up path).
3. Baseline: ``hello_*`` is a minimal FastAPI JSON route; max throughput (closed loop,
   ``--concurrency`` connections) and latency at ``--rate`` (open loop, latency from the
   scheduled send time).
4. API: the same two phases on ``/v1/recommendations`` for random known users (10% unknown
   users, 20% with an ``item_id``), k=20.
5. Freshness (during a second open-loop phase at ``--rate``): produce a click on the top
   item of a user's slate to ``events``; poll the API every 5 ms until that item has left
   the slate (the user state now lists it as consumed). Produce -> first such response.
6. ANN recall@100 of the index (same snapshot, same ef/rerank as the API) against exact
   brute force over all item vectors, for user-like query vectors.

Last line:
``serving: items= shards= qps= p50_ms= p99_ms= hello_qps= hello_p99_ms= ann_recall_at_100=
e2e_freshness_p50_ms= e2e_freshness_p99_ms=``  (qps: max throughput; p50/p99: at --rate)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import orjson

ROOT = Path(__file__).resolve().parents[1]
# this script is benchmarks/serving.py: drop its own folder from the path, or "serving" would be this file
sys.path = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

from confluent_kafka import Producer  # noqa: E402

from benchmarks.loadgen import Result, closed_loop, get, open_loop  # noqa: E402
from serving.index import IndexParams, ShardedIndex, brute_force_topk  # noqa: E402
from streams.broker import EmbeddedBroker, ensure_topics, free_port, wait_for_port  # noqa: E402
from streams.config import Settings  # noqa: E402
from streams.core import serde  # noqa: E402
from streams.core.partition import partition_for  # noqa: E402
from streams.core.state import B60_US, ItemState, UserState  # noqa: E402

HOST = "127.0.0.1"


def clustered(n: int, dim: int, seed: int, centers: int = 64, centers_seed: int = 0) -> npt.NDArray[np.float32]:
    """Embedding-like vectors: Gaussian clusters around random centers (``centers_seed``), members by ``seed``.

    Items, users and recall queries share the centers (users like items of the same tastes).
    """
    c = np.random.default_rng(centers_seed).standard_normal((centers, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    which = rng.integers(0, centers, n)
    out = c[which] + 0.35 * rng.standard_normal((n, dim)).astype(np.float32)
    out /= np.float32(np.sqrt(dim))
    return out.astype(np.float32)


def log(msg: str) -> None:
    """Progress on stderr (the last stdout line is the result)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def publish_state(settings: Settings, items: int, users: int, dim: int, seed: int, now_us: int) -> dict[int, int]:
    """Write the catalog and user population to the changelogs; returns item records per partition."""
    p = Producer({"bootstrap.servers": settings.bootstrap_servers, "linger.ms": 20, "batch.num.messages": 10000,
                  "queue.buffering.max.messages": 1_000_000, "queue.buffering.max.kbytes": 1_048_576,
                  "log_level": 3})  # fmt: skip
    vecs = clustered(items, dim, seed)
    rng = np.random.default_rng(seed + 1)
    pop = np.minimum(rng.zipf(1.3, items), 10_000)
    hour = now_us // B60_US
    per_part = dict.fromkeys(range(settings.partitions), 0)
    topic = settings.topics.item_changelog
    for i in range(items):
        iid = f"i{i}"
        n = int(pop[i])
        age = int(rng.integers(0, 3_600_000_000))
        st = ItemState(b60={hour: [n * 10, n, n]}, max_ts=now_us - age, vector=vecs[i], version=1)
        part = partition_for(iid, settings.partitions)
        per_part[part] += 1
        while True:
            try:
                p.produce(topic, serde.encode_item(st), iid.encode(), partition=part)
                break
            except BufferError:
                p.poll(0.05)
        if i % 100_000 == 0:
            log(f"  items produced: {i}")
    uvecs = clustered(users, dim, seed + 2)
    topic = settings.topics.user_changelog
    for u in range(users):
        uid = f"u{u}"
        recent = [(now_us - 60_000_000 * (j + 1), f"{uid}-h{j}", f"i{int(rng.integers(0, items))}", "click")
                  for j in range(5)]  # fmt: skip
        st_u = UserState(counts=[0, 5, 0, 0, 0, 0], recent=recent, max_ts=recent[0][0], vector=uvecs[u], steps=5,
                         version=5)  # fmt: skip
        while True:
            try:
                p.produce(
                    topic, serde.encode_user(st_u), uid.encode(), partition=partition_for(uid, settings.partitions)
                )
                break
            except BufferError:
                p.poll(0.05)
    left = p.flush(120)
    assert left == 0, f"{left} state records not delivered"
    return per_part


def index_snapshot(cache: Path, params: IndexParams, partitions: int, items: int, seed: int,
                   watermark: dict[int, int]) -> tuple[Path, float | None]:  # fmt: skip
    """The cached index snapshot of the catalog (built when missing). Returns (dir, build seconds)."""
    d = cache / f"serving-v2-{items}x{params.dim}-p{partitions}-M{params.M}-efc{params.ef_construction}-s{seed}"
    if (d / "manifest.json").exists():
        return d, None
    log(f"building the index snapshot ({items} x {params.dim}); cached for later runs in {d}")
    vecs = clustered(items, params.dim, seed)
    index = ShardedIndex(params, partitions)
    t0 = time.perf_counter()
    index.build((f"i{i}", vecs[i]) for i in range(items))
    build_s = time.perf_counter() - t0
    d.parent.mkdir(parents=True, exist_ok=True)
    index.save(d, watermark)
    return d, build_s


def ann_recall(snapshot: Path, ef: int, rerank: int, items: int, dim: int, seed: int, queries: int = 200) -> float:
    """Recall@100 of the snapshot index vs exact top-100, user-like queries."""
    index = ShardedIndex.load(snapshot, ef=ef, rerank=rerank)
    index.set_query_threads(2)
    vecs = clustered(items, dim, seed)
    qs = clustered(queries, dim, seed + 99)
    hits = 0
    for q in qs:
        exact_rows, _ = brute_force_topk(vecs, q, 100)
        exact = {f"i{r}" for r in np.asarray(exact_rows).reshape(-1).tolist()}
        got = {i for i, _ in index.search(q, 100)}
        hits += len(exact & got)
    return hits / (100 * queries)


def spawn(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """A child process with stderr to a log file."""
    f = open(log_path, "wb")  # noqa: SIM115  # closed by the child's exit
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=f, stderr=f)


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Poll /readyz until 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"API exited with {proc.returncode}")
        try:
            status, _ = asyncio.run(get(HOST, port, "/readyz"))
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit("API not ready in time")


def iso(ts: float) -> str:
    """ISO-8601 UTC."""
    return datetime.fromtimestamp(ts, UTC).isoformat()


async def freshness_probe(port: int, producer: Producer, topic: str, partitions: int, users: int,
                          trials: int, rng: np.random.Generator, out: list[float]) -> None:  # fmt: skip
    """Click the top item of a user's slate; time until a response no longer offers it."""
    for t in range(trials):
        uid = f"u{int(rng.integers(0, users))}"
        path = f"/v1/recommendations?user_id={uid}&k=20"
        _, body = await get(HOST, port, path)
        items = orjson.loads(body)["items"]
        if not items:
            continue
        target = items[0]["item_id"]
        ev = {"event_id": f"fresh-{t}-{uuid.uuid4().hex[:8]}", "type": "click", "user_id": uid, "item_id": target,
              "event_time": iso(time.time()), "schema_version": 1}  # fmt: skip
        t0 = time.perf_counter()
        producer.produce(topic, orjson.dumps(ev), uid.encode(), partition=partition_for(uid, partitions))
        producer.poll(0)
        producer.flush(0)
        while True:
            _, body = await get(HOST, port, path)
            if target not in {it["item_id"] for it in orjson.loads(body)["items"]}:
                out.append(time.perf_counter() - t0)
                break
            if time.perf_counter() - t0 > 10:
                out.append(float("inf"))
                break
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--rate", type=float, default=300.0)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--freshness-trials", type=int, default=40)
    ap.add_argument("--M", type=int, default=48)
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument("--ef", type=int, default=64)
    ap.add_argument("--rerank", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=str(ROOT / ".freshrec" / "bench-cache"))
    ap.add_argument("--background-nice", type=int, default=0,
                    help="niceness of the broker and the worker (the API, hello and the load generator stay at 0): "
                         "how a latency-critical service is deployed beside batch work on a shared host")  # fmt: skip
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="freshrec-serving-"))
    broker = EmbeddedBroker(port=free_port(), log_path=str(tmp / "tansu.log"))
    broker.start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        settings = Settings(bootstrap_servers=broker.bootstrap, partitions=args.partitions, data_dir=str(tmp / "data"))
        ensure_topics(settings)
        now_us = int(time.time() * 1e6)
        log(f"publishing {args.items} items and {args.users} users to the changelogs")
        t0 = time.perf_counter()
        per_part = publish_state(settings, args.items, args.users, args.dim, args.seed, now_us)
        log(f"  published in {time.perf_counter() - t0:.1f} s")
        params = IndexParams(dim=args.dim, M=args.M, ef_construction=args.ef_construction, ef=args.ef,
                             rerank=args.rerank, threads=2)  # fmt: skip
        snap, build_s = index_snapshot(Path(args.cache), params, args.partitions, args.items, args.seed, per_part)
        log(f"index snapshot {snap} ({'cached' if build_s is None else f'built in {build_s:.0f} s'})")

        env = {**os.environ, "PYTHONUNBUFFERED": "1", "FRESHREC_BOOTSTRAP_SERVERS": broker.bootstrap,
               "FRESHREC_PARTITIONS": str(args.partitions)}  # fmt: skip
        procs.append(spawn([sys.executable, "-m", "streams.cli", "worker", "--data-dir", settings.data_dir],
                           env, tmp / "worker.log"))  # fmt: skip
        if args.background_nice:
            for pid in (procs[-1].pid, broker._proc.pid if broker._proc is not None else None):
                if pid is not None:
                    os.setpriority(os.PRIO_PROCESS, pid, args.background_nice)
            log(f"broker and worker at nice {args.background_nice}")
        api_port, hello_port = free_port(), free_port()
        ix = "FRESHREC_SERVING__INDEX__"
        api_env = {**env, f"{ix}SNAPSHOT_DIR": str(snap), f"{ix}SAVE_ON_EXIT": "false", f"{ix}EF": str(args.ef),
                   f"{ix}RERANK": str(args.rerank)}  # fmt: skip
        api = spawn([sys.executable, "-m", "streams.cli", "serve", "--port", str(api_port)], api_env, tmp / "api.log")
        procs.append(api)
        procs.append(spawn([sys.executable, "-m", "uvicorn", "--app-dir", str(ROOT / "benchmarks"), "hello_app:app",
                            "--host", HOST, "--port", str(hello_port), "--loop", "uvloop", "--http", "httptools",
                            "--log-level", "warning", "--no-access-log"], env, tmp / "hello.log"))  # fmt: skip
        t0 = time.perf_counter()
        wait_ready(api_port, api, 1800)
        wait_for_port(HOST, hello_port, 30)
        log(f"API ready in {time.perf_counter() - t0:.1f} s (loaded snapshot + replayed the changelogs)")

        rng = np.random.default_rng(args.seed + 5)

        def api_path() -> str:
            r = rng.random()
            if r < 0.1:
                return f"/v1/recommendations?user_id=new{int(rng.integers(0, 10**9))}&k=20"
            uid = f"u{int(rng.integers(0, args.users))}"
            if r < 0.3:
                return f"/v1/recommendations?user_id={uid}&k=20&item_id=i{int(rng.integers(0, args.items))}"
            return f"/v1/recommendations?user_id={uid}&k=20"

        def hello_path() -> str:
            return "/hello"

        async def load() -> tuple[Result, Result, Result, Result, list[float]]:
            await closed_loop(HOST, hello_port, hello_path, args.concurrency, 2)  # warm-up
            hello_max = await closed_loop(HOST, hello_port, hello_path, args.concurrency, args.duration)
            hello_rate = await open_loop(HOST, hello_port, hello_path, args.rate, args.duration)
            await closed_loop(HOST, api_port, api_path, args.concurrency, 3)  # warm-up
            api_max = await closed_loop(HOST, api_port, api_path, args.concurrency, args.duration)
            api_rate = await open_loop(HOST, api_port, api_path, args.rate, args.duration)
            api_half = await open_loop(HOST, api_port, api_path, args.rate / 2, args.duration)
            log(f"api @rate/2: {api_half.qps:.0f} req/s p50 {api_half.pct_ms(50):.2f} ms "
                f"p99 {api_half.pct_ms(99):.2f} ms errors {api_half.errors()}")  # fmt: skip
            producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 0, "log_level": 3})
            fresh: list[float] = []
            await asyncio.gather(
                open_loop(HOST, api_port, api_path, args.rate, args.duration),
                freshness_probe(
                    api_port,
                    producer,
                    settings.topics.events,
                    args.partitions,
                    args.users,
                    args.freshness_trials,
                    np.random.default_rng(args.seed + 6),
                    fresh,
                ),  # fmt: skip
            )
            return hello_max, hello_rate, api_max, api_rate, fresh

        hello_max, hello_rate, api_max, api_rate, fresh = asyncio.run(load())
        for name, r in (("hello max", hello_max), ("hello @rate", hello_rate), ("api max", api_max),
                        ("api @rate", api_rate)):  # fmt: skip
            log(f"{name}: {r.qps:.0f} req/s p50 {r.pct_ms(50):.2f} ms p99 {r.pct_ms(99):.2f} ms "
                f"errors {r.errors()} statuses {r.statuses}")  # fmt: skip
        fresh_ms = np.array(fresh) * 1000
        log(f"freshness: {len(fresh)} trials, {int(np.isinf(fresh_ms).sum())} timed out (>10 s)")
        recall = ann_recall(snap, args.ef, args.rerank, args.items, args.dim, args.seed)
        print(
            f"serving: items={args.items} shards={args.partitions} qps={api_max.qps:.0f} "
            f"p50_ms={api_rate.pct_ms(50):.2f} p99_ms={api_rate.pct_ms(99):.2f} "
            f"hello_qps={hello_max.qps:.0f} hello_p99_ms={hello_rate.pct_ms(99):.2f} "
            f"ann_recall_at_100={recall:.4f} "
            f"e2e_freshness_p50_ms={np.percentile(fresh_ms, 50):.1f} "
            f"e2e_freshness_p99_ms={np.percentile(fresh_ms, 99):.1f}"
        )
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        broker.stop()


if __name__ == "__main__":
    main()
