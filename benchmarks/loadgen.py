"""A small HTTP/1.1 keep-alive load generator on raw asyncio sockets (127.0.0.1 only).

httpx costs ~0.5 ms of client CPU per request on this machine, which would measure the
client, not the server. This speaks just enough HTTP/1.1 (GET, Content-Length bodies) to
drive a server at thousands of requests/s from one core.

* ``closed_loop``: ``concurrency`` connections, each sending its next request as soon as
  the previous answer arrived, for ``duration`` seconds: the maximum throughput.
* ``open_loop``: requests *scheduled* at a fixed ``rate``; latency is measured from the
  scheduled time, so queueing behind a slow answer counts (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Result", "closed_loop", "open_loop", "get"]


@dataclass
class Result:
    """Latencies (seconds) and status counts of one load phase."""

    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def qps(self) -> float:
        """Completed requests per second."""
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def pct_ms(self, p: float) -> float:
        """The p-th percentile latency in milliseconds."""
        return float(np.percentile(self.latencies, p) * 1000) if self.latencies else float("nan")

    def errors(self) -> int:
        """Non-2xx answers."""
        return sum(n for s, n in self.statuses.items() if not 200 <= s < 300)


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, host: str, port: int) -> _Conn:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, host)

    async def get(self, path: str) -> tuple[int, bytes]:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        body = await self.reader.readexactly(length) if length else b""
        return status, body

    def close(self) -> None:
        self.writer.close()


async def get(host: str, port: int, path: str) -> tuple[int, bytes]:
    """One GET on a fresh connection."""
    conn = await _Conn.open(host, port)
    try:
        return await conn.get(path)
    finally:
        conn.close()


async def closed_loop(host: str, port: int, paths: Callable[[], str], concurrency: int, duration: float) -> Result:
    """Max-throughput phase (see module docs)."""
    res = Result()
    conns = [await _Conn.open(host, port) for _ in range(concurrency)]
    stop = time.perf_counter() + duration

    async def run(conn: _Conn) -> None:
        while time.perf_counter() < stop:
            t = time.perf_counter()
            status, _ = await conn.get(paths())
            res.latencies.append(time.perf_counter() - t)
            res.statuses[status] = res.statuses.get(status, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(run(c) for c in conns))
    res.seconds = time.perf_counter() - t0
    for c in conns:
        c.close()
    return res


async def open_loop(
    host: str, port: int, paths: Callable[[], str], rate: float, duration: float, connections: int = 32
) -> Result:
    """Fixed-rate phase (see module docs)."""
    res = Result()
    conns = [await _Conn.open(host, port) for _ in range(connections)]
    queue: asyncio.Queue[float | None] = asyncio.Queue()

    async def run(conn: _Conn) -> None:
        while True:
            scheduled = await queue.get()
            if scheduled is None:
                return
            status, _ = await conn.get(paths())
            res.latencies.append(time.perf_counter() - scheduled)
            res.statuses[status] = res.statuses.get(status, 0) + 1

    workers = [asyncio.create_task(run(c)) for c in conns]
    t0 = time.perf_counter()
    n = int(rate * duration)
    for i in range(n):
        at = t0 + i / rate
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        queue.put_nowait(at)
    for _ in conns:
        queue.put_nowait(None)
    await asyncio.gather(*workers)
    res.seconds = time.perf_counter() - t0
    for c in conns:
        c.close()
    return res
