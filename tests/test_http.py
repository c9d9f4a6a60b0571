"""The lookup API's HTTP protocol: one socket write per response, and every response still whole."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from stream_app.serving.http import Balancer, CoalescingHttpToolsProtocol
from tests.live_api import serving

BIG = bytes(range(256)) * 8192  # 2 MiB: more than a socket takes at once


async def app(scope: dict, receive: Any, send: Any) -> None:
    """/parts answers in three body parts, /big with 2 MiB, /none with 204, anything else with its path."""
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/none":
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    body = BIG if path == "/big" else path.encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/octet-stream")]
                + ([] if path == "/parts" else [(b"content-length", str(len(body)).encode())])})
    if path == "/parts":
        for part in (b"one,", b"two,"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
            await asyncio.sleep(0.01)  # a later turn of the loop: another write
        await send({"type": "http.response.body", "body": b"three"})
        return
    await send({"type": "http.response.body", "body": body})


WRITES: list[bytes] = []  # what the protocol handed the socket's transport, write by write


class _Recording:
    """The real transport, with its writes recorded in WRITES."""

    def __init__(self, transport: asyncio.Transport):
        self._transport = transport

    def write(self, data: bytes) -> None:
        WRITES.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class RecordingProtocol(CoalescingHttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_Recording(transport))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    with serving(app, http=RecordingProtocol, lifespan="off") as url:
        yield url


def test_a_response_reaches_the_socket_in_one_write(base: str) -> None:
    with httpx.Client(base_url=base) as client:
        WRITES.clear()
        assert client.get("/hello").content == b"/hello"
        assert len(WRITES) == 1, WRITES  # head and body together
        head, _, body = WRITES[0].partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and body == b"/hello"


def test_parts_sent_in_later_turns_are_written_then(base: str) -> None:
    with httpx.Client(base_url=base) as client:
        WRITES.clear()
        assert client.get("/parts").content == b"one,two,three"
        assert len(WRITES) == 3, WRITES  # head with the first part, then one write per later turn


def test_large_empty_and_pipelined_responses_stay_whole(base: str) -> None:
    with httpx.Client(base_url=base) as client:
        assert client.get("/big").content == BIG
        answer = client.get("/none")
        assert answer.status_code == 204 and answer.content == b""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:  # three requests in one packet
        sock.sendall(b"".join(f"GET /r{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for i in range(3))
                     + b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    bodies = [part.split(b"\r\n\r\n", 1)[1][: len(f"/r{i}")] for i, part in enumerate(data.split(b"HTTP/1.1 200")[1:])]
    assert bodies[:3] == [b"/r0", b"/r1", b"/r2"] and data.endswith(b"/last")


def _hold(counts: Any, held: Any) -> None:
    counts.get_lock().acquire()
    held.set()
    time.sleep(60)


def test_worker_processes_stop_balancing_when_one_dies_holding_their_lock() -> None:
    """`Balancer`: a process killed (kill -9) inside the shared lock leaves it held for good; the others
    then keep the connections the kernel gives them, after one short wait, instead of hanging."""
    balancer = Balancer(2)
    balancer.join()
    context = multiprocessing.get_context("spawn")
    held = context.Event()
    holder = context.Process(target=_hold, args=(balancer.counts, held), daemon=True)
    holder.start()
    try:
        assert held.wait(30)
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)
        started = time.monotonic()
        balancer.closed()
        balancer.closed()
        assert balancer.broken and time.monotonic() - started < 2 * Balancer.LOCK_WAIT + 0.5
    finally:
        holder.kill()
