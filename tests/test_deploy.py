"""Static checks of the deployment files: ``docker-compose.yml`` and ``Dockerfile``.

No Docker engine is needed: the files are parsed, and every module, attribute and path they
name is checked against the repository, so a rename in the code breaks this test rather than
the deployment.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
SERVICES = {"postgres", "redis", "migrate", "api", "worker"}
PROJECT_SERVICES = ("migrate", "api", "worker")

# The containers import from the project root (WORKDIR); so does this test. Without it, a bare
# `pytest` would find tests/app and tests/worker (folders without __init__.py) as namespace packages.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


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
    assert "8000:8000" in [str(p) for p in services["api"]["ports"]]


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
