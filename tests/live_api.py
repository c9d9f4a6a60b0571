"""The lookup API served for real (uvicorn on a free loopback port, in a thread), for the tests that
need a live server."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn

from stream_app.core.settings import Settings
from stream_app.dev import embedded
from stream_app.serving.api import create_app
from stream_app.serving.http import CoalescingHttpToolsProtocol


@contextlib.contextmanager
def serving(app: Any, **config: Any) -> Iterator[str]:
    """A real uvicorn serving `app` on a free loopback port, in a thread, with the HTTP protocol of
    `streamrec serve` unless `config` names another (and any other uvicorn `Config` options)."""
    port = embedded.free_port("127.0.0.1")
    config = {"http": CoalescingHttpToolsProtocol, "log_level": "warning", **config}
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **config))
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


@contextlib.contextmanager
def live(settings: Settings) -> Iterator[str]:
    """The lookup API served for real, as `streamrec serve` serves it."""
    with serving(create_app(settings)) as base:
        yield base
