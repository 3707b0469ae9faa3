"""The coalescing uvicorn protocol: one transport write per response, same bytes as uvicorn's."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from serving.http import CoalescingHttpToolsProtocol


class FakeTransport(asyncio.Transport):
    """Records every write; never blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = f"path={scope['path']}".encode()
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _serve(protocol_cls: type[HttpToolsProtocol], requests: bytes) -> FakeTransport:
    config = Config(_app, lifespan="off", log_level="warning")
    protocol = protocol_cls(config, ServerState(), {}, _loop=asyncio.get_running_loop())
    transport = FakeTransport()
    protocol.connection_made(transport)
    protocol.data_received(requests)
    for _ in range(20):  # let the request tasks run (and any deferred flush)
        await asyncio.sleep(0)
    return transport


REQ = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize("pipelined", [1, 2])
def test_one_write_per_response_with_the_same_bytes_as_uvicorn(pipelined: int) -> None:
    plain = asyncio.run(_serve(HttpToolsProtocol, REQ * pipelined))
    coalesced = asyncio.run(_serve(CoalescingHttpToolsProtocol, REQ * pipelined))
    assert len(plain.writes) == 2 * pipelined  # uvicorn itself: headers, then body
    assert len(coalesced.writes) == pipelined
    assert b"".join(coalesced.writes) == b"".join(plain.writes)
    assert coalesced.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert coalesced.writes[0].endswith(b"\r\n\r\npath=/a")


def test_a_connection_closed_after_the_response_still_gets_all_of_it() -> None:
    req = b"GET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    plain = asyncio.run(_serve(HttpToolsProtocol, req))
    coalesced = asyncio.run(_serve(CoalescingHttpToolsProtocol, req))
    assert coalesced.closed and plain.closed
    assert len(coalesced.writes) == 1
    assert b"".join(coalesced.writes) == b"".join(plain.writes)
    assert coalesced.writes[0].endswith(b"path=/b")


def test_a_bad_request_is_answered_before_the_close() -> None:
    coalesced = asyncio.run(_serve(CoalescingHttpToolsProtocol, b"NOT HTTP\r\n\r\n"))
    assert coalesced.closed
    assert b"".join(coalesced.writes).startswith(b"HTTP/1.1 400 ")
