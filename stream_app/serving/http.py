"""How the lookup API runs on uvicorn: one socket write per response, and worker processes that each
listen on a socket of their own and hold equal shares of the connections.

uvicorn writes a response's head as soon as the app starts it and the body when the app sends it: two
writes, so two packets on a TCP_NODELAY socket and two wake-ups of the client per answer. Here they
leave as one write (what that gains: README, Benchmarks), as soon as the body comes: answers ranked
together are each sent when made, not after the others.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import functools
import logging
import multiprocessing
import os
import secrets
import signal
import socket
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)


class _Coalesced:
    """A transport whose writes within one turn of the event loop reach the socket as one write: the first
    waits for a second (a response's body after its head), which sends both at once, or for the end of
    the turn, or for the transport closing. Everything else goes to the transport as is."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._end_of_turn: asyncio.Handle | None = None  # the flush due at the end of this turn, if any

    def write(self, data: bytes) -> None:
        self._pending.append(data)
        if len(self._pending) > 1:  # a response's head, now its body: both go at once, not after the turn's other work
            self.flush()
        else:
            self._end_of_turn = self._loop.call_soon(self.flush)

    def writelines(self, lines: Iterable[bytes]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        """Write what this turn wrote, as one write (nothing once the transport is closing)."""
        if self._end_of_turn is not None:
            self._end_of_turn.cancel()
            self._end_of_turn = None
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
    """uvicorn's `HttpToolsProtocol` over a `_Coalesced` transport (`uvicorn.run(..., http=this)`). In a worker
    process of several, a connection may go to another process at once (`Balancer`)."""

    adopted = False  # passed here by another worker process, which counted it for this one
    passed = False  # passed on to another worker process: never served here

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if _BALANCER is not None and not self.adopted and not _BALANCER.admit(transport):
            self.passed = True
            return
        super().connection_made(_Coalesced(transport, self.loop))  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.passed:
            return
        if _BALANCER is not None:
            _BALANCER.closed()
        super().connection_lost(exc)


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


class Balancer:
    """Keeps a server's worker processes holding equal numbers of connections.

    The kernel spreads connections over the processes' sockets by a hash of their addresses, which is
    fair over many clients but not over a few: eight keep-alive connections split 6/2 as often as 4/4, and
    the process holding six answers them in 50% more time while the other idles. So a process that
    accepts a connection while it holds more than another passes it on to the one holding fewest, before
    reading from it: the socket goes over a Unix datagram socket (SCM_RIGHTS) and that process serves it
    as its own. Counts and the slot of each process are shared (multiprocessing arrays, one lock); a
    process takes connections once it started (`start`), and a dead one's slot is taken by its successor.
    Should a process die holding the lock, the others stop balancing (`broken`) rather than wait for it.
    """

    LOCK_WAIT = 0.2  # seconds a process waits for the shared lock before it stops balancing

    def __init__(self, processes: int):
        self.token = secrets.token_hex(8)  # names this server's datagram sockets
        self.counts = multiprocessing.get_context("spawn").Array("i", processes)  # connections each slot holds
        self.pids = multiprocessing.get_context("spawn").Array("i", processes, lock=False)  # >0 taking, <0 not (yet)
        self.slot = -1
        self.broken = False  # the shared lock was not to be had: connections stay where the kernel put them
        self._inbox: socket.socket | None = None

    def _address(self, slot: int) -> bytes:
        return f"\0streamrec-{self.token}-{slot}".encode()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[bool]:
        """The shared lock held (True), or False when it was not to be had in `LOCK_WAIT` seconds."""
        lock = self.counts.get_lock()
        if self.broken or not lock.acquire(timeout=self.LOCK_WAIT):
            if not self.broken:
                log.warning("the worker processes' shared lock is held by a dead process: connections stay "
                            "where the kernel puts them until the server restarts")
            self.broken = True
            yield False
            return
        try:
            yield True
        finally:
            lock.release()

    def join(self) -> None:
        """In a worker process: take a free slot (or a dead process's) and open its datagram socket."""
        with self._locked() as held:
            if not held:
                return
            self.slot = next(i for i, pid in enumerate(self.pids) if pid == 0 or not _alive(abs(pid)))
            self.pids[self.slot], self.counts[self.slot] = -os.getpid(), 0
        self._inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._inbox.bind(self._address(self.slot))
        self._inbox.setblocking(False)

    def start(self, loop: asyncio.AbstractEventLoop, factory: Callable[[], CoalescingHttpToolsProtocol]) -> None:
        """Serve the connections other processes pass here with uvicorn's `factory`, from now on."""
        if self._inbox is None:  # joined without the lock: takes nothing
            return
        loop.add_reader(self._inbox.fileno(), self._adopt, loop, factory)
        self.pids[self.slot] = os.getpid()

    def stop(self) -> None:
        """Take no more connections from the other processes (this one is shutting down)."""
        if self.slot >= 0:
            self.pids[self.slot] = -os.getpid()

    def admit(self, transport: asyncio.Transport) -> bool:
        """Whether this process serves a connection it accepted; if not, it went to another process (and
        the transport is closed here)."""
        sock = transport.get_extra_info("socket")
        with self._locked() as held:
            if not held or self._inbox is None:
                return True
            mine = self.counts[self.slot]
            others = [i for i, pid in enumerate(self.pids) if pid > 0 and i != self.slot and _alive(pid)]
            target = min(others, key=self.counts.__getitem__, default=None)
            if target is None or self.counts[target] >= mine or sock is None:
                self.counts[self.slot] += 1
                return True
            self.counts[target] += 1
        fd = os.dup(sock.fileno())
        try:
            # sendmsg, not socket.send_fds: that one drops its address argument before Python 3.12
            self._inbox.sendmsg([b"c"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))], 0,
                                self._address(target))
        except OSError:  # that process just went away: serve it here after all
            with self._locked() as held:
                if held:
                    self.counts[target] -= 1
                    self.counts[self.slot] += 1
            return True
        finally:
            os.close(fd)
        transport.abort()  # this process's descriptor only: the connection lives on in the other one
        return False

    def closed(self) -> None:
        """A connection this process served has closed (or one passed here could not be taken)."""
        with self._locked() as held:
            if held and self.slot >= 0:
                self.counts[self.slot] -= 1

    def _adopt(self, loop: asyncio.AbstractEventLoop, factory: Callable[[], CoalescingHttpToolsProtocol]) -> None:
        assert self._inbox is not None
        try:
            _, fds, _, _ = socket.recv_fds(self._inbox, 1, 16)
        except BlockingIOError:
            return
        for fd in fds:
            task = loop.create_task(loop.connect_accepted_socket(functools.partial(_adopted, factory),
                                                                 socket.socket(fileno=fd)))
            task.add_done_callback(self._taken)

    def _taken(self, task: asyncio.Task) -> None:
        """A passed connection served here, or not (closed by its client meanwhile): then uncounted."""
        if task.cancelled() or task.exception() is not None:
            self.closed()


def _adopted(factory: Callable[[], CoalescingHttpToolsProtocol]) -> CoalescingHttpToolsProtocol:
    protocol = factory()
    protocol.adopted = True
    return protocol


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's (a pid reused)
        return True
    return True


_BALANCER: Balancer | None = None  # this process's, when it is one of a server's worker processes


def _worker_socket(host: str, port: int, balancer: Balancer) -> socket.socket:
    """A worker process's listening socket (see `OwnSocketPerProcess`), and its place in `balancer`."""
    global _BALANCER
    balancer.join()
    _BALANCER = balancer
    return bound_socket(host, port, shared=True)


def start_balancing() -> None:
    """In a worker process of several (`Balancer`): serve connections the others pass on, from now on.
    Called from the app's start-up, which runs inside uvicorn's `Server.serve`: its exit handler (installed
    with `signal.signal`) is the way to that server's protocol factory."""
    if _BALANCER is None:
        return
    server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    config, state, lifespan = (getattr(server, name, None) for name in ("config", "server_state", "lifespan"))
    if config is None or state is None or lifespan is None:
        log.warning("this uvicorn does not show its server to the app: connections stay where the kernel put them")
        return
    _BALANCER.start(asyncio.get_running_loop(), functools.partial(
        config.http_protocol_class, config=config, server_state=state, app_state=lifespan.state))


def stop_balancing() -> None:
    if _BALANCER is not None:
        _BALANCER.stop()


class OwnSocketPerProcess:
    """host:port for uvicorn's worker processes (`uvicorn.supervisors.Multiprocess(config, sockets=[this])`),
    each of which listens on a socket of its own, so that the kernel spreads new connections over them.

    uvicorn binds one socket and shares it: whichever process wakes first accepts every connection of a
    burst, so eight connections opened at once may all land on one process while the other idles.
    This object is what uvicorn hands each worker process; unpickled there, it is a new socket bound with
    SO_REUSEPORT. The parent binds one too, without listening, so that a taken port fails at once: first
    without SO_REUSEPORT, so that a port another server's processes share fails as well.
    """

    def __init__(self, host: str, port: int, processes: int):
        self.host, self.port = host, port
        bound_socket(host, port).close()
        self._held = bound_socket(host, port, shared=True)
        self.balancer = Balancer(processes)

    def __reduce__(self) -> tuple[Any, tuple[str, int, Balancer]]:
        return _worker_socket, (self.host, self.port, self.balancer)

    def close(self) -> None:
        self._held.close()
