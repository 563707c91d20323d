"""The web client's files are served by the API itself, outside the OpenAPI document, and load
nothing from another origin. No browser needed."""

from __future__ import annotations

import re
from pathlib import Path

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


def test_nothing_is_loaded_from_another_origin():
    for path in WEB.iterdir():
        text = path.read_text()
        # No CDN, no font service, no remote script or stylesheet: every URL is relative.
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), path.name
        assert not re.search(r"""@import\s+url\(\s*["']?(https?:)?//""", text), path.name
        assert not re.search(r"""\bimport\s[^;]*from\s+["'](https?:)?//""", text), path.name
