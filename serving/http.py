"""uvicorn's httptools protocol with one socket write per response.

uvicorn writes a response in (at least) two ``transport.write`` calls: the status line and
headers when the app sends ``http.response.start``, then the body. With ``TCP_NODELAY`` each
is its own ``send`` syscall and its own packet, so every response costs the server two trips
through the kernel's TCP stack and wakes the client twice (once for the headers, once for the
body). :class:`CoalescingHttpToolsProtocol` hands uvicorn a transport proxy that buffers writes
and flushes them in one ``write`` when the response is complete (``on_response_complete``),
before the transport closes, or at the latest on the next event-loop iteration (streaming
bodies, error paths), so nothing is held back longer than the current loop step.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["CoalescingHttpToolsProtocol", "CoalescingTransport"]


class CoalescingTransport:
    """Delegates to ``transport``; ``write`` buffers until :meth:`flush` (scheduled at the latest
    for the next loop iteration)."""

    __slots__ = ("_transport", "_loop", "_buf", "_scheduled")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._buf: list[bytes] = []
        self._scheduled = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer ``data`` (flushed by :meth:`flush`, at the latest on the next loop iteration)."""
        if not data:
            return
        self._buf.append(bytes(data))
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write everything buffered in one ``transport.write``."""
        self._scheduled = False
        buf = self._buf
        if not buf:
            return
        data = buf[0] if len(buf) == 1 else b"".join(buf)
        buf.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def writelines(self, lines: Any) -> None:
        """Buffer each of ``lines``."""
        for line in lines:
            self.write(line)

    def close(self) -> None:
        """Flush, then close."""
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        """Flush, then half-close."""
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        """Drop the buffer and abort the connection."""
        self._buf.clear()
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        """Bytes buffered here and in the real transport."""
        return sum(map(len, self._buf)) + self._transport.get_write_buffer_size()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """:class:`HttpToolsProtocol` writing each complete response with one ``send`` syscall."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Wrap ``transport`` in a :class:`CoalescingTransport`."""
        proxy = CoalescingTransport(transport, self.loop)
        super().connection_made(proxy)  # type: ignore[arg-type]

    def on_response_complete(self) -> None:
        """Flush the response before uvicorn's bookkeeping (keep-alive, pipelining)."""
        transport = self.transport
        if isinstance(transport, CoalescingTransport):
            transport.flush()
        super().on_response_complete()
