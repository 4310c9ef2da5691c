"""HTTP connections with limits (uvicorn's h11 protocol, bounded): a whole request (headers and body)
must arrive within a timeout of the connection's start or of the previous answer, and connections
beyond a maximum are answered 503 and closed at once. Idle keep-alive connections close after
uvicorn's keep-alive timeout; request headers are bounded by h11 (16 KiB).
"""
import asyncio
import json
from typing import Optional

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from llama.serve.protocol import APIError

_RECEIVED = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR)  # the client has sent its whole request


def _busy_response(max_connections: int) -> bytes:
    body = json.dumps(APIError(503, f"too many connections (--max_connections {max_connections}): retry shortly",
                               type="server_error", code="service_unavailable").body()).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "retry-after: 1\r\nconnection: close\r\n\r\n")
    return head.encode() + body


def bounded_protocol(request_timeout: float, max_connections: int) -> type:
    """An h11 protocol class for uvicorn.Config(http=...) that enforces the two limits."""
    busy = _busy_response(max_connections)

    class BoundedH11Protocol(H11Protocol):
        read_timer: Optional[asyncio.TimerHandle] = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(busy)
                transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state in _RECEIVED:
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():  # kept alive: the next request has its own time
                self._arm()

        def connection_lost(self, exc: Optional[Exception]) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self.read_timer = self.loop.call_later(request_timeout, self._timed_out)

        def _disarm(self) -> None:
            if self.read_timer is not None:
                self.read_timer.cancel()
                self.read_timer = None

        def _timed_out(self) -> None:
            self.read_timer = None
            if self.conn.their_state not in _RECEIVED and not self.transport.is_closing():
                self.transport.close()  # a handler waiting for the body sees the client leave

    return BoundedH11Protocol
