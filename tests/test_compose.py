"""docker-compose.yml and Dockerfile: valid Compose, real `streamrec` commands, real settings."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import typer.main
import yaml

from stream_app.cli import app
from stream_app.core.settings import Settings

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
SPEC = REPO.parent / "shared" / "compose-spec.json"  # CI: a fresh clone with a copy of shared/ beside it


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


COMPOSE = load_compose()
SERVICES: dict[str, dict] = COMPOSE["services"]
# Services built from our Dockerfile run streamrec; the rest (kafka, redis, topics) are stock images.
OURS = sorted(name for name, svc in SERVICES.items() if "build" in svc)


def command_of(service: dict) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def environment_of(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


REQUIRED = "required-value"  # what a `${VAR:?message}` stands for here (compose refuses to start without VAR)


def interpolate(value: str) -> str:
    """Compose-style `${VAR:-default}` / `${VAR-default}` with VAR unset, `${VAR:?message}` with VAR set
    to REQUIRED; `$$` is a literal `$`."""
    value = re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", value)
    value = re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:\?[^}]*\}", REQUIRED, value)
    return value.replace("$$", "$")


def test_compose_file_is_valid_against_the_compose_spec() -> None:
    assert SPEC.is_file(), f"{SPEC} is missing: the shared/ folder must sit beside the repository"
    schema = json.loads(SPEC.read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    errors = sorted(validator_class(schema).iter_errors(COMPOSE), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_the_expected_services_are_there() -> None:
    assert {"kafka", "redis", "worker", "api", "monitor"} <= set(SERVICES)
    assert {"worker", "api", "monitor"} <= set(OURS)
    assert command_of(SERVICES["worker"])[:2] == ["streamrec", "worker"]
    assert command_of(SERVICES["api"])[:2] == ["streamrec", "serve"]
    assert command_of(SERVICES["monitor"])[:2] == ["streamrec", "monitor"]


@pytest.mark.parametrize("name", OURS)
def test_service_command_is_a_real_streamrec_command(name: str) -> None:
    argv = command_of(SERVICES[name])
    assert argv and argv[0] == "streamrec", f"{name}: command must start with `streamrec`, got {argv}"
    group = typer.main.get_command(app)  # a click Group (typer may vendor its own click)
    assert len(argv) > 1 and argv[1] in group.commands, (
        f"{name}: `{' '.join(argv[:2])}` is not a streamrec command; it has {sorted(group.commands)}"
    )
    command = group.commands[argv[1]]
    known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    for token in argv[2:]:
        if token.startswith("--"):
            assert token.split("=", 1)[0] in known, (
                f"{name}: `streamrec {argv[1]}` has no option {token}; it has {sorted(known)}"
            )
    try:  # and click accepts the whole line (values convert, nothing left over)
        command.make_context(f"streamrec {argv[1]}", argv[2:])
    except Exception as exc:  # click's UsageError / BadParameter
        message = exc.format_message() if hasattr(exc, "format_message") else repr(exc)
        pytest.fail(f"{name}: `{' '.join(argv)}` is rejected: {message}")


def test_every_streamrec_variable_is_a_setting() -> None:
    seen = 0
    for name, service in SERVICES.items():
        env = {k: interpolate(v) for k, v in environment_of(service).items() if k.startswith("STREAMREC_")}
        fields = {k[len("STREAMREC_"):].lower(): v for k, v in env.items()}
        unknown = sorted(f"STREAMREC_{f.upper()}" for f in fields if f not in Settings.model_fields)
        assert not unknown, f"{name}: {unknown} are not Settings fields ({sorted(Settings.model_fields)})"
        Settings(**fields)  # and their values are valid
        seen += len(env)
    assert seen, "no STREAMREC_* variables at all"
    for name in OURS:
        env = environment_of(SERVICES[name])
        assert env.get("STREAMREC_KAFKA_BOOTSTRAP") == "kafka:9092", name
        assert interpolate(env.get("STREAMREC_REDIS_URL", "")) == f"redis://:{REQUIRED}@redis:6379/0", name


def test_dependencies_exist_and_wait_for_health() -> None:
    for name, service in SERVICES.items():
        depends = service.get("depends_on", {})
        targets = depends if isinstance(depends, list) else list(depends)
        for target in targets:
            assert target in SERVICES, f"{name} depends on unknown service {target}"
            if isinstance(depends, dict) and depends[target].get("condition") == "service_healthy":
                assert "healthcheck" in SERVICES[target], f"{name} waits for {target}'s health, which has no check"
    for name in OURS:
        depends = SERVICES[name]["depends_on"]
        assert depends["kafka"]["condition"] == "service_healthy", name
        assert depends["redis"]["condition"] == "service_healthy", name


def test_kafka_runs_kraft_and_redis_persists() -> None:
    kafka, redis = SERVICES["kafka"], SERVICES["redis"]
    assert kafka["image"].startswith("apache/kafka:")
    kafka_env = environment_of(kafka)
    assert "controller" in kafka_env["KAFKA_PROCESS_ROLES"] and "KAFKA_ZOOKEEPER_CONNECT" not in kafka_env
    assert "PLAINTEXT://kafka:9092" in kafka_env["KAFKA_ADVERTISED_LISTENERS"]
    assert any(v.endswith(":" + kafka_env["KAFKA_LOG_DIRS"]) for v in kafka.get("volumes", []))
    assert redis["image"].startswith("redis:7")
    argv = redis_argv()
    assert "--appendonly" in argv and argv[argv.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in redis.get("volumes", []))


def test_topics_service_creates_the_default_topics() -> None:
    init = SERVICES["topics"]
    script = interpolate(" ".join(command_of(init)))
    assert "kafka-topics.sh" in script and "--if-not-exists" in script
    defaults = Settings.model_fields
    for field in ("events_topic", "metrics_topic", "dlq_topic", "alerts_topic"):
        assert re.search(rf"\b{re.escape(defaults[field].default)}\b", script), field
    assert "streamrec up" not in script  # `up` starts embedded servers; not what production wants


def test_dockerfile_installs_cpu_torch_first() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    runs = [line for line in text.splitlines() if line.startswith("RUN ")]
    torch = next(i for i, line in enumerate(runs) if "pip install torch==2.13.0" in line)
    assert "download.pytorch.org/whl/cpu" in runs[torch]
    assert torch < next(i for i, line in enumerate(runs) if re.search(r"pip install \.( |$)", line))


def test_readme_configuration_table_lists_every_setting() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(STREAMREC_[A-Z_]+)` \|", section, re.M))
    assert documented == {f"STREAMREC_{name.upper()}" for name in Settings.model_fields}


def redis_argv() -> list[str]:
    """redis-server's arguments, also when the command is `sh -c "exec redis-server ..."`."""
    argv = command_of(SERVICES["redis"])
    if argv[:2] == ["sh", "-c"]:
        argv = shlex.split(argv[2])
        argv = argv[1:] if argv[0] == "exec" else argv
    assert argv[0] == "redis-server", argv
    return argv


def test_redis_requires_a_password_that_the_services_carry() -> None:
    redis = SERVICES["redis"]
    argv = redis_argv()
    assert "--requirepass" in argv, argv
    secret = argv[argv.index("--requirepass") + 1]
    assert secret.startswith("$"), "the password comes from the environment, not the file"
    variable = secret.strip("${}")
    password = environment_of(redis)[variable]
    assert re.fullmatch(r"\$\{REDIS_PASSWORD:\?[^}]+\}", password), "REDIS_PASSWORD must be required, no default"
    assert variable == "REDISCLI_AUTH"  # redis-cli (the health check) authenticates with it
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    for name in OURS:
        url = environment_of(SERVICES[name])["STREAMREC_REDIS_URL"]
        assert url.startswith("redis://:${REDIS_PASSWORD:?") and url.endswith("@redis:6379/0"), (name, url)
    assert "ports" not in redis  # reachable from the services' network only


def test_ports_are_published_on_loopback_only() -> None:
    published = 0
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
            published += 1
    assert published >= 3  # kafka, api, monitor


def test_the_api_health_check_is_readiness_and_its_keys_persist() -> None:
    api = SERVICES["api"]
    check = " ".join(api["healthcheck"]["test"])
    assert "/readyz" in check and "/healthz" not in check
    env = environment_of(api)
    keys = env["STREAMREC_API_KEYS_FILE"]
    assert any(keys.startswith(v.split(":", 1)[1] + "/") for v in api["volumes"]), "the keys file must be on a volume"
    assert env["STREAMREC_KAFKA_BOOTSTRAP"] == "kafka:9092"  # the shared environment is kept
