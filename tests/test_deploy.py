"""Static checks of the deployment files: ``docker-compose.yml``, ``.env.example`` and
``Dockerfile``.

No Docker engine is needed: the files are parsed (the compose file with its ``${VAR}``
references filled in as compose fills them), and every module, attribute and path they name is
checked against the repository, so a rename in the code breaks this test rather than the
deployment. The Redis service's own command and health check are run against a real
redis-server.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
# What an operator's .env holds (made as .env.example says): the secrets compose requires.
SECRETS = {
    "POSTGRES_PASSWORD": "0f3c9a1be2d84c7a",
    "REDIS_PASSWORD": "9d2e7b4c1a6f8e03",
    "SQUEEZE_SECRET_KEY": "wtP7z+gAzCUjzqWELiSK/+ykXSxbzYRImUucE63d8b4=",
}
SERVICES = {"postgres", "redis", "migrate", "api", "worker"}
PROJECT_SERVICES = ("migrate", "api", "worker")

# The containers import from the project root (WORKDIR); so does this test. Without it, a bare
# `pytest` would find tests/app and tests/worker (folders without __init__.py) as namespace packages.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class MissingVariable(Exception):
    """What compose refuses to start with: a ``${NAME:?message}`` whose NAME is unset or empty."""


_REFERENCE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<bare>\w+))")


def interpolate(value, env: dict[str, str]):
    """Fill in ``${NAME}``, ``${NAME:-default}``, ``${NAME-default}``, ``${NAME:?message}``,
    ``${NAME?message}`` and ``$$`` in every string of a parsed compose file, as compose does."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def fill(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        name = match["name"] or match["bare"]
        found, op = env.get(name), match["op"]
        unset = not found if op and op.startswith(":") else found is None
        if op in (":?", "?") and unset:
            raise MissingVariable(f"{name}: {match['arg']}")
        if op in (":-", "-") and unset:
            return match["arg"]
        return found or ""

    return _REFERENCE.sub(fill, value)


def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def env_example() -> dict[str, str]:
    lines = [line.strip() for line in ENV_EXAMPLE.read_text().splitlines()]
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


@pytest.fixture(scope="module")
def compose() -> dict:
    return interpolate(raw_compose(), SECRETS)


def _argv(command) -> list[str]:
    return list(command) if isinstance(command, list) else shlex.split(command)


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _volume_mounts(service: dict) -> dict[str, str]:
    """target -> source for each volume mount of a service (short or long syntax)."""
    mounts = {}
    for vol in service.get("volumes") or []:
        if isinstance(vol, str):
            source, target = vol.split(":")[:2]
        else:
            source, target = vol.get("source"), vol["target"]
        mounts[target] = source
    return mounts


def _option(argv: list[str], *names: str) -> str | None:
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if name.startswith("--") and arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def check_command(argv: list[str]) -> None:
    """Assert that the modules/files a container command refers to really exist."""
    program = Path(argv[0]).name
    if program == "uvicorn":
        target = next(a for a in argv[1:] if not a.startswith("-"))
        module_name, _, attr = target.partition(":")
        assert attr, f"uvicorn target {target!r} is not MODULE:ATTR"
        module = importlib.import_module(module_name)
        assert hasattr(module, attr), f"{module_name} has no attribute {attr!r}"
        assert callable(getattr(module, attr)), f"{target} is not an ASGI app"
    elif program == "celery":
        from celery import Celery
        from celery.app.utils import find_app

        target = _option(argv, "-A", "--app")
        assert target, f"celery command without -A: {argv}"
        importlib.import_module(target.partition(":")[0])
        # find_app is what `celery -A` itself uses (it looks for `app`, then `celery`, ...).
        found = find_app(target)
        assert isinstance(found, Celery), f"celery -A {target} does not give a Celery app"
    elif program == "alembic":
        assert argv[1:] == ["upgrade", "head"], argv
        assert (ROOT / "alembic.ini").is_file(), "alembic.ini missing"
        assert (ROOT / "alembic" / "env.py").is_file(), "alembic/env.py missing"
    else:
        pytest.fail(f"unexpected container command {argv}")


# --------------------------------------------------------------------------- compose


def test_services_exist(compose):
    assert SERVICES <= set(compose["services"])


def test_project_services_use_the_project_image(compose):
    services = compose["services"]
    for name in PROJECT_SERVICES:
        build = services[name].get("build")
        assert build, f"{name} does not build the project image"
        context = build if isinstance(build, str) else build.get("context", ".")
        dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        assert (ROOT / context / dockerfile).resolve() == DOCKERFILE


@pytest.mark.parametrize("name", PROJECT_SERVICES)
def test_service_command_references_exist(compose, name):
    check_command(_argv(compose["services"][name]["command"]))


def test_expected_commands(compose):
    services = compose["services"]
    assert _argv(services["migrate"]["command"]) == ["alembic", "upgrade", "head"]
    assert _argv(services["api"]["command"])[:2] == ["uvicorn", "app.main:app"]
    worker = _argv(services["worker"]["command"])
    assert worker[:1] == ["celery"] and "worker" in worker
    assert _option(worker, "-A", "--app") == "worker.celery_app"
    assert _option(worker, "--concurrency", "-c") == "1"
    assert _option(worker, "--prefetch-multiplier") == "1"


def test_dependencies(compose):
    services = compose["services"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["redis"]["condition"] == "service_healthy"
    assert "pg_isready" in json.dumps(services["postgres"]["healthcheck"]["test"])
    assert "redis-cli" in json.dumps(services["redis"]["healthcheck"]["test"])
    assert [str(p) for p in services["api"]["ports"]] == ["127.0.0.1:8000:8000"]


def test_worker_reserves_a_gpu(compose):
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    args = worker["build"].get("args", {})
    assert "cuda" in args.get("BASE_IMAGE", "")
    assert re.search(r"/whl/cu\d+", args.get("TORCH_INDEX_URL", ""))


def test_api_and_worker_share_the_artifacts_volume(compose):
    services = compose["services"]
    sources = set()
    for name in ("api", "worker"):
        root = _env(services[name])["SQUEEZE_STORAGE_ROOT"]
        mounts = _volume_mounts(services[name])
        assert root in mounts, f"{name} does not mount a volume at SQUEEZE_STORAGE_ROOT={root}"
        sources.add(mounts[root])
    assert len(sources) == 1
    (volume,) = sources
    assert volume in (compose.get("volumes") or {}), f"{volume} is not a named volume"


@pytest.mark.parametrize("name", PROJECT_SERVICES)
def test_environment_points_at_the_services(compose, name):
    services = compose["services"]
    env = _env(services[name])
    db = urlsplit(env["SQUEEZE_DATABASE_URL"])
    assert db.scheme.startswith("postgresql") and db.hostname == "postgres"
    broker = urlsplit(env["SQUEEZE_BROKER_URL"])
    assert broker.scheme == "redis" and broker.hostname == "redis"
    assert db.hostname in services and broker.hostname in services
    pg_env = _env(services["postgres"])
    assert db.username == pg_env["POSTGRES_USER"]
    assert db.password == pg_env["POSTGRES_PASSWORD"]
    assert db.path.lstrip("/") == pg_env["POSTGRES_DB"]
    assert db.password == SECRETS["POSTGRES_PASSWORD"]
    assert broker.password == _env(services["redis"])["REDIS_PASSWORD"] == SECRETS["REDIS_PASSWORD"]
    assert env["SQUEEZE_SECRET_KEY"] == SECRETS["SQUEEZE_SECRET_KEY"]


# --------------------------------------------------------------------------- secrets and exposure


def _references(value) -> list[re.Match]:
    if isinstance(value, dict):
        return [m for item in value.values() for m in _references(item)]
    if isinstance(value, list):
        return [m for item in value for m in _references(item)]
    return list(_REFERENCE.finditer(value)) if isinstance(value, str) else []


def test_every_secret_is_required_and_has_no_default():
    raw = raw_compose()
    required = {m["name"] for m in _references(raw) if m["op"] == ":?"}
    assert required == set(SECRETS)
    for match in _references(raw):
        if match["name"] in SECRETS or match["bare"] in SECRETS:
            assert match["op"] == ":?", f"{match[0]} must be ${{NAME:?message}}: no default, never empty"
    # Without any one of them, compose refuses to start, and says which.
    for name in SECRETS:
        with pytest.raises(MissingVariable, match=f"^{name}: .*\\.env"):
            interpolate(raw, {k: v for k, v in SECRETS.items() if k != name})
        with pytest.raises(MissingVariable, match=f"^{name}"):
            interpolate(raw, {**SECRETS, name: ""})
    # No password is written in the file itself.
    for service in raw["services"].values():
        for key, value in _env(service).items():
            if "PASSWORD" in key or "SECRET" in key:
                assert value.startswith("${") and value.endswith("}"), f"{key} is written in the compose file"
        for value in _env(service).values():
            url = urlsplit(value) if "://" in value and "${" not in value else None
            assert url is None or url.password is None, f"a literal password in {value}"


def test_env_example_names_every_secret_with_an_empty_placeholder():
    example = env_example()
    assert set(SECRETS) <= set(example)
    # Copied unedited, it starts nothing: each secret must be filled in first.
    for name in SECRETS:
        assert example[name] == "", f"{name} has a value in .env.example"
    with pytest.raises(MissingVariable):
        interpolate(raw_compose(), example)
    assert example.get("SQUEEZE_PUBLISH") == "127.0.0.1"


def test_env_files_are_never_committed_or_sent_to_the_docker_build():
    for ignore in (".gitignore", ".dockerignore"):
        assert ".env" in (ROOT / ignore).read_text().split(), ignore


def test_only_the_api_is_published_and_on_loopback_unless_configured():
    raw = raw_compose()
    published = {name for name, service in raw["services"].items() if service.get("ports")}
    assert published == {"api"}
    ports = lambda env: interpolate(raw, {**SECRETS, **env})["services"]["api"]["ports"]  # noqa: E731
    assert ports({}) == ["127.0.0.1:8000:8000"]
    assert ports({"SQUEEZE_PUBLISH": ""}) == ["127.0.0.1:8000:8000"]
    assert ports({"SQUEEZE_PUBLISH": "0.0.0.0"}) == ["0.0.0.0:8000:8000"]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_redis_runs_with_the_password_and_its_health_check_and_the_urls_use_it(compose, tmp_path):
    # The service's own command and health check, as its container runs them (`sh -c` with the
    # service's environment), on a private port of this machine.
    import redis

    service = compose["services"]["redis"]
    env = {**os.environ, **_env(service)}
    port = _free_port()
    local = f" --port {port} --bind 127.0.0.1 --save '' --appendonly no --dir {tmp_path}"
    argv = _argv(service["command"])
    assert argv[:2] == ["sh", "-c"] and "--requirepass" in argv[2]
    server = subprocess.Popen([*argv[:2], argv[2] + local], env=env, stdout=subprocess.DEVNULL)
    try:
        check = service["healthcheck"]["test"]
        assert check[0] == "CMD-SHELL"
        healthy = lambda password: subprocess.run(  # noqa: E731
            ["sh", "-c", check[1].replace("redis-cli", f"redis-cli -p {port}")],
            env={**env, "REDIS_PASSWORD": password}, capture_output=True, timeout=30).returncode == 0
        deadline = time.monotonic() + 60
        while not healthy(SECRETS["REDIS_PASSWORD"]):
            assert server.poll() is None and time.monotonic() < deadline, "redis did not start"
            time.sleep(0.2)
        assert not healthy("wrong-password")
        # Without the password nothing is answered; with the services' URL everything is.
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port).ping()
        for name in PROJECT_SERVICES:
            url = urlsplit(_env(compose["services"][name])["SQUEEZE_BROKER_URL"])
            local_url = url._replace(netloc=f":{url.password}@127.0.0.1:{port}").geturl()
            assert redis.Redis.from_url(local_url).ping() is True
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_worker_queue_matches_settings(compose):
    worker = compose["services"]["worker"]
    queue = _option(_argv(worker["command"]), "-Q", "--queues")
    assert queue == _env(worker)["SQUEEZE_QUEUE_NAME"]
    api_queue = _env(compose["services"]["api"]).get("SQUEEZE_QUEUE_NAME")
    assert api_queue == queue, "the API would publish to a queue the worker does not consume"


# --------------------------------------------------------------------------- Dockerfile


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        if buf:
            keyword, _, rest = buf.partition(" ")
            out.append((keyword.upper(), rest.strip()))
        buf = ""
    return out


def test_dockerfile_base_image_is_a_build_arg():
    ins = _instructions()
    assert ("ARG", "BASE_IMAGE=python:3.11-slim") in ins
    froms = [rest for kw, rest in ins if kw == "FROM"]
    assert froms and froms[0].split()[0] in ("${BASE_IMAGE}", "$BASE_IMAGE")
    args = {rest.split("=")[0] for kw, rest in ins if kw == "ARG"}
    assert {"TORCH_INDEX_URL", "TORCH_VERSION"} <= args


def test_dockerfile_installs_torch_before_the_project():
    runs = [(i, rest) for i, (kw, rest) in enumerate(_instructions()) if kw == "RUN"]
    torch_at = next(
        (i for i, r in runs if re.search(r"pip install[^;&|]*TORCH_INDEX_URL[^;&|]*torch==", r)),
        None,
    )
    project_at = next(
        (i for i, r in runs if re.search(r"pip install(\s+-\S+)*\s+\.(\s|$)", r)), None
    )
    assert torch_at is not None, "no `pip install --index-url $TORCH_INDEX_URL torch==...`"
    assert project_at is not None, "no `pip install .`"
    assert torch_at < project_at


def test_dockerfile_copies_only_existing_paths():
    copied = []
    for kw, rest in _instructions():
        if kw not in ("COPY", "ADD"):
            continue
        parts = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
        parts = [p for p in parts if not p.startswith("--")]
        copied += parts[:-1]
    required = {"pyproject.toml", "app", "worker", "alembic", "alembic.ini"}
    assert required <= set(copied), f"not copied: {required - set(copied)}"
    missing = [p for p in copied if not (ROOT / p).exists()]
    assert not missing, f"Dockerfile COPYs paths missing from the repo: {missing}"
    # The build context must not drop what is copied.
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert not (set(copied) & ignored)


def test_dockerfile_runtime_settings():
    ins = _instructions()
    text = DOCKERFILE.read_text()
    assert ("WORKDIR", "/srv/squeeze") in ins
    users = [rest for kw, rest in ins if kw == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert "SQUEEZE_STORAGE_ROOT=/data/artifacts" in text
    assert "HF_HUB_OFFLINE=1" in text
    assert "PYTHONUNBUFFERED=1" in text
    assert ("EXPOSE", "8000") in ins
    health = [rest for kw, rest in ins if kw == "HEALTHCHECK"]
    assert health and "http://127.0.0.1:8000/healthz" in health[0] and "python" in health[0]
    cmd = json.loads(next(rest for kw, rest in ins if kw == "CMD"))
    assert cmd[:2] == ["sh", "-c"]
    assert cmd[2] == "alembic upgrade head && uvicorn app.main:app --host 0.0.0.0 --port 8000"


def test_dockerfile_default_command_references_exist():
    cmd = json.loads(next(rest for kw, rest in _instructions() if kw == "CMD"))
    for part in cmd[2].split("&&"):
        check_command(shlex.split(part))
