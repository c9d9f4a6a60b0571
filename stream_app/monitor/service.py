"""Running the monitor: the state (restored from Redis), the faust app in the main thread, a view aside.

The view is the web dashboard (uvicorn in a thread) or a live rich table in the terminal.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import faust
from rich.console import Console
from rich.live import Live

from stream_app.core.settings import redact
from stream_app.io import kafka
from stream_app.monitor.app import build_app
from stream_app.monitor.dashboard import serve_in_thread
from stream_app.monitor.history import RedisHistory
from stream_app.monitor.state import MonitorState
from stream_app.monitor.terminal import terminal_renderable
from stream_app.monitor.windows import check_windows

log = logging.getLogger("streamrec.monitor")


def make_state(settings, history: int = 2000, tumbling: float = 10.0, hopping: tuple[float, float] = (30.0, 10.0),
               lag_group: str | None = None, lag_topic: str | None = None) -> MonitorState:
    """A state with its history reloaded from Redis; without Redis it still runs, with no history kept."""
    store = None
    try:
        store = RedisHistory(settings.redis_url, settings.key_prefix, settings.metrics_topic, cap=history)
    except Exception as exc:
        log.warning("Redis at %s unavailable (%s): history will not survive a restart", redact(settings.redis_url), exc)
    state = MonitorState(tumbling=tumbling, hopping=hopping, history=history, store=store,
                         topic=settings.metrics_topic, lag_group=lag_group or settings.consumer_group,
                         lag_topic=lag_topic or settings.events_topic)
    n = state.restore()
    if n:
        log.info("restored %d history points from Redis", n)
    return state


def start_terminal_view(app: faust.App, state: MonitorState) -> Callable[[], None]:
    """A live rich table of the state, refreshed by a faust timer; returns its stop function."""
    live = Live(terminal_renderable(state), console=Console(), refresh_per_second=4)
    live.start()

    @app.timer(0.5)
    async def refresh():
        live.update(terminal_renderable(state))

    return live.stop


def start_dashboard(state: MonitorState, host: str, port: int, topic: str) -> Callable[[], None]:
    """The web dashboard in a thread; returns its stop function."""
    server, _ = serve_in_thread(state, host, port)
    print(f"streamrec monitor: dashboard on http://{host}:{port}/ (metrics topic {topic})", flush=True)
    return lambda: setattr(server, "should_exit", True)


def run(settings, host: str = "127.0.0.1", port: int = 8050, terminal: bool = False, tumbling: float = 10.0,
        hopping: tuple[float, float] = (30.0, 10.0), lag_interval: float = 2.0, lag_group: str | None = None,
        lag_topic: str | None = None) -> None:
    """Run the monitor until interrupted: faust in the main thread, dashboard or terminal view aside."""
    check_windows(tumbling, hopping)
    where = kafka.target(settings)
    kafka.wait_for_broker(where)
    kafka.ensure_topics(where, {settings.metrics_topic: 1, settings.alerts_topic: 1})
    state = make_state(settings, tumbling=tumbling, hopping=hopping, lag_group=lag_group, lag_topic=lag_topic)
    app = build_app(settings, state, lag_interval=lag_interval, lag_group=lag_group, lag_topic=lag_topic)
    if terminal:
        stop = start_terminal_view(app, state)
    else:
        stop = start_dashboard(state, host, port, settings.metrics_topic)
    try:
        worker = faust.Worker(app, loglevel=os.environ.get("STREAMREC_MONITOR_LOGLEVEL", "WARNING"), quiet=True,
                              redirect_stdouts=False)
        worker.spinner = None  # it would draw over the rich table
        worker.execute_from_commandline()
    finally:
        stop()
