"""Live stacks shared by the whole suite (one per session): the API and a Celery worker as
real processes, on PostgreSQL + Redis and on the embedded default."""

import pytest

from tests.e2e.stack import ServiceStack


@pytest.fixture(scope="session")
def pg_stack(tmp_path_factory):
    stack = ServiceStack.postgres_redis(tmp_path_factory.mktemp("pg-redis"))
    with stack:
        yield stack


@pytest.fixture(scope="session")
def embedded_stack(tmp_path_factory):
    stack = ServiceStack.embedded(tmp_path_factory.mktemp("embedded"))
    with stack:
        yield stack


@pytest.fixture(params=["pg_stack", "embedded_stack"])
def stack(request):
    """Each test that takes ``stack`` runs once on PostgreSQL + Redis, once embedded."""
    return request.getfixturevalue(request.param)
