"""CPU of buffered file writes on this machine: appending new pages against overwriting cached ones.

    python benchmarks/page_cache_writes.py [--seconds 60] [--mb-per-s 130]

A RocksDB shard's write-ahead log is written by the worker's loop thread (``write`` of each WriteBatch). On
the shared VMs here, a page-cache page the guest has not used lately costs far more CPU to fill than one that
is still cached, which is why the stores recycle their WAL files (``streams/store.py``, ``WAL_RECYCLE``). This
writes 700 KB chunks (a 1,000-event batch's user-shard WAL record) at ``--mb-per-s`` for ``--seconds``, twice:
appending to a growing file, then overwriting a 256 MB file in a cycle. It prints the writing thread's CPU
(``time.thread_time``) per MB every 5 s and, last, the steady figures (the second half of each run):
``page_cache_writes: append_ms_per_mb=<a> overwrite_ms_per_mb=<b> ratio=<a/b>``
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

CHUNK = 700_000
CYCLE = 256 << 20


def run(path: str, seconds: float, mb_per_s: float, overwrite: bool) -> float:
    """Write for ``seconds``; the CPU ms per MB over the second half."""
    buf = os.urandom(CHUNK)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    pace = CHUNK / (mb_per_s * 1e6)
    t0 = time.monotonic()
    mark, cpu0, n, off = t0, time.thread_time(), 0, 0
    half_cpu = half_n = 0.0
    try:
        while (now := time.monotonic()) - t0 < seconds:
            os.pwrite(fd, buf, off)
            off = (off + CHUNK) % CYCLE if overwrite else off + CHUNK
            n += 1
            if now - mark >= 5.0:
                cpu = time.thread_time()
                per_mb = 1000 * (cpu - cpu0) / (n * CHUNK / 1e6)
                kind = "overwrite" if overwrite else "append"
                print(f"{kind:>9} {now - t0:5.0f} s: {per_mb:5.2f} ms CPU a MB", flush=True)
                if now - t0 >= seconds / 2:
                    half_cpu += cpu - cpu0
                    half_n += n
                mark, cpu0, n = now, cpu, 0
            time.sleep(max(0.0, pace - (time.monotonic() - now)))
    finally:
        os.close(fd)
        os.unlink(path)
    return 1000 * half_cpu / max(1e-9, half_n * CHUNK / 1e6)


def main() -> None:
    """Append, then overwrite, and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--mb-per-s", type=float, default=130.0)
    ap.add_argument("--dir", default=None, help="where to write (default: the system temp dir)")
    args = ap.parse_args()
    path = os.path.join(args.dir or tempfile.gettempdir(), f"freshrec-pages-{os.getpid()}.bin")
    append = run(path, args.seconds, args.mb_per_s, overwrite=False)
    overwrite = run(path, args.seconds, args.mb_per_s, overwrite=True)
    print(
        f"page_cache_writes: append_ms_per_mb={append:.2f} overwrite_ms_per_mb={overwrite:.2f} "
        f"ratio={append / overwrite:.1f}"
    )


if __name__ == "__main__":
    main()
