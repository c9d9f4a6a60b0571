"""How the lookup API runs on uvicorn: one socket write per response, and worker processes that each
listen on a socket of their own.

uvicorn writes a response's head as soon as the app starts it and the body when the app sends it: two
writes, so two packets on a TCP_NODELAY socket and two wake-ups of the client per answer. Here the
writes made within one turn of the event loop leave as one (what that gains: README, Benchmarks).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _Coalesced:
    """A transport whose writes within one turn of the event loop reach the socket as one write (at the
    end of the turn, or before the transport closes). Everything else goes to the transport as is."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def writelines(self, lines: Iterable[bytes]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        """Write what this turn wrote, as one write (nothing once the transport is closing)."""
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's `HttpToolsProtocol` over a `_Coalesced` transport (`uvicorn.run(..., http=this)`)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_Coalesced(transport, self.loop))  # type: ignore[arg-type]


def bound_socket(host: str, port: int, shared: bool = False) -> socket.socket:
    """A socket bound to host:port, not yet listening (uvicorn listens on it). `shared`: with SO_REUSEPORT,
    so that this server's other processes bind the port too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class OwnSocketPerProcess:
    """host:port for uvicorn's worker processes (`uvicorn.supervisors.Multiprocess(config, sockets=[this])`),
    each of which listens on a socket of its own, so that the kernel spreads new connections over them.

    uvicorn binds one socket and shares it: whichever process wakes first accepts every connection of a
    burst, so eight connections opened at once may all land on one process while the other idles.
    This object is what uvicorn hands each worker process; unpickled there, it is a new socket bound with
    SO_REUSEPORT. The parent binds one too, without listening, so that a taken port fails at once: first
    without SO_REUSEPORT, so that a port another server's processes share fails as well.
    """

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        bound_socket(host, port).close()
        self._held = bound_socket(host, port, shared=True)

    def __reduce__(self) -> tuple[Any, tuple[str, int, bool]]:
        return bound_socket, (self.host, self.port, True)

    def close(self) -> None:
        self._held.close()
