"""The lookup API served for real (uvicorn on a free loopback port, in a thread), for the tests that
need a live server."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import uvicorn

from stream_app.core.settings import Settings
from stream_app.dev import embedded
from stream_app.serving.api import create_app


@contextlib.contextmanager
def live(settings: Settings) -> Iterator[str]:
    """A real uvicorn serving the API on a free loopback port, in a thread."""
    port = embedded.free_port("127.0.0.1")
    srv = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(20)
