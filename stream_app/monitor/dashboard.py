"""The monitor's web dashboard: one page, a JSON snapshot and a Server-Sent Events stream."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse

from stream_app.monitor.state import MonitorState

PAGE = Path(__file__).parent / "static" / "dashboard.html"


def create_app(state: MonitorState, poll: float = 0.25) -> FastAPI:
    """The dashboard's routes: the page, `/api/state` (a snapshot) and `/events` (SSE of the state's changes)."""
    app = FastAPI(title="streamrec monitor")

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return PAGE.read_text(encoding="utf-8")

    @app.get("/api/state")
    def snapshot() -> Response:
        return Response(orjson.dumps(state.snapshot()), media_type="application/json")

    @app.get("/events")
    async def events(request: Request, since: int = 0) -> StreamingResponse:
        async def stream():
            seq = since
            last_beat = time.monotonic()
            yield "retry: 1000\n\n"
            while not await request.is_disconnected():
                batch = state.events_since(seq)
                for event in batch:
                    seq = max(seq, event["seq"])
                    yield f"data: {orjson.dumps(event).decode()}\n\n"
                if not batch and time.monotonic() - last_beat > 10:
                    yield ": keep-alive\n\n"
                    last_beat = time.monotonic()
                await asyncio.sleep(poll)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def serve_in_thread(state: MonitorState, host: str = "127.0.0.1", port: int = 8050, timeout: float = 10.0):
    """Start uvicorn in a daemon thread; (server, thread) once it is accepting connections."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(state), host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, name="dashboard", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"dashboard did not start on {host}:{port}")
        time.sleep(0.05)
    return server, thread
