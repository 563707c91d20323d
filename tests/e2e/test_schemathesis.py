"""Schemathesis against the live API's OpenAPI document: every operation, its default checks
(no server errors, status codes, content types, headers and bodies all as documented).

Driven through Hypothesis directly, one pytest case per operation (schemathesis' own pytest
plugin does not support pytest 9 yet)."""

from __future__ import annotations

import pytest
import schemathesis
from schemathesis.checks import positive_data_acceptance
from hypothesis import HealthCheck, given, settings

from app.main import create_app

SCHEMA = schemathesis.openapi.from_dict(create_app().openapi())
OPERATIONS = {result.ok().label: result.ok() for result in SCHEMA.get_all_operations()}


@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_operation_conforms_to_the_schema(label, pg_stack):
    operation = OPERATIONS[label]
    headers = {"Authorization": f"Bearer {pg_stack.admin_key}"}

    @given(case=operation.as_strategy())
    @settings(max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(case):
        # Every default check but "schema-valid data must be accepted": what makes an upload or a
        # spec acceptable goes beyond JSON Schema (a checkpoint's bytes, N < M in "N:M", a
        # calibration section that data-aware methods need), and those answers are a 400/422
        # naming the field, which the other checks hold to the documented shapes.
        case.call_and_validate(base_url=pg_stack.url, headers=headers,
                               excluded_checks=[positive_data_acceptance])

    check()
