"""The web client's files are served by the API itself, outside the OpenAPI document, and load
nothing from another origin. No browser needed."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path, PurePosixPath

import pytest
from fastapi.testclient import TestClient

WEB = Path(__file__).resolve().parents[2] / "app" / "web"


@pytest.fixture(scope="module")
def client(tmp_path_factory, monkeypatch_module):
    from app.main import create_app

    return TestClient(create_app())  # no lifespan: static files need no database


@pytest.fixture(scope="module")
def monkeypatch_module(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SQUEEZE_VAR_DIR", str(tmp_path_factory.mktemp("var")))
        yield patch


def test_root_redirects_to_the_client_and_files_are_served(client):
    assert client.get("/", follow_redirects=False).headers["location"].endswith("/ui/")
    assert client.get("/ui", follow_redirects=False).status_code in (301, 307, 308)
    page = client.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="app.js">' in page.text
    script = client.get("/ui/app.js")
    # Module scripts are refused by browsers unless served with a JavaScript MIME type.
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert client.get("/ui/style.css").headers["content-type"].startswith("text/css")
    assert client.get("/ui/app.js").headers["cache-control"] == "no-cache"
    assert client.get("/ui/missing.js").status_code == 404


def test_client_routes_are_not_in_the_openapi_document(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p == "/" or p.startswith("/ui")]


def test_every_module_the_client_imports_is_served_as_javascript(client):
    # The modules load one another by relative path; a misspelt or unshipped one breaks the page.
    seen, queue = set(), ["app.js"]
    while queue:
        name = queue.pop()
        if name in seen:
            continue
        seen.add(name)
        response = client.get(f"/ui/{name}")
        assert response.status_code == 200 and "javascript" in response.headers["content-type"], name
        for spec in re.findall(r"""^import\s[^;]*?from\s+["'](\.[^"']+)["']""", response.text, re.M):
            queue.append(str(PurePosixPath(name).parent / spec).removeprefix("./"))
    modules = {p.relative_to(WEB).as_posix() for p in WEB.rglob("*.js")}
    assert seen == modules  # and no module is left unused


def test_the_package_ships_every_client_file():
    patterns = tomllib.loads((WEB.parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["app"]
    # As setuptools reads them: a pattern is a glob relative to the package, "*" stops at "/".
    for path in WEB.rglob("*"):
        if path.is_file():
            relative = PurePosixPath(path.relative_to(WEB.parent).as_posix())
            assert any(len(relative.parts) == len(PurePosixPath(p).parts) and relative.match(p) for p in patterns), relative


def test_nothing_is_loaded_from_another_origin():
    for path in WEB.rglob("*"):
        if not path.is_file():
            continue
        text = path.read_text()
        # No CDN, no font service, no remote script or stylesheet: every URL is relative.
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), path.name
        assert not re.search(r"""@import\s+url\(\s*["']?(https?:)?//""", text), path.name
        assert not re.search(r"""\bimport\s[^;]*from\s+["'](https?:)?//""", text), path.name


@pytest.mark.parametrize("path", ["/ui/", "/ui/app.js", "/ui/style.css", "/healthz", "/v1/models", "/ui/missing.js"])
def test_every_answer_carries_the_browser_security_headers(client, path):
    # The page, its files, the API (here a 401 without a key) and a 404 alike.
    response = client.get(path)
    policy = {
        directive.split()[0]: directive.split()[1:]
        for directive in response.headers["content-security-policy"].split(";")
    }
    assert policy["default-src"] == ["'self'"] and policy["frame-ancestors"] == ["'none'"]
    # Nothing loosens the page's policy: no inline code, no other origin, no eval.
    assert not {"script-src", "style-src", "connect-src", "img-src"} & set(policy)
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"


def test_the_client_needs_no_inline_code():
    # The policy forbids inline scripts, inline styles and event-handler attributes; the page
    # would silently break if one crept in.
    page = (WEB / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", page), "inline <script>"
    assert "<style" not in page and not re.search(r"\sstyle\s*=", page)
    assert not re.search(r"\son[a-z]+\s*=", page), "inline event handler"
    for path in WEB.rglob("*.js"):
        text = path.read_text()
        assert not re.search(r"\beval\s*\(|new\s+Function\s*\(|setAttribute\(\s*[\"']style", text), path.name


def test_the_api_docs_pages_may_load_their_cdn_but_never_be_framed(client):
    policy = client.get("/docs").headers["content-security-policy"]
    assert "frame-ancestors 'none'" in policy and "https://cdn.jsdelivr.net" in policy
