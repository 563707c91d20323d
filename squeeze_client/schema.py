"""Which fields of a job spec name another object, read from the server's OpenAPI document.

The server marks every such field with ``"x-squeeze-ref": "model"`` or ``"dataset"`` on the
id's string schema (``app/specs.py``: ``ModelRef``, ``DatasetRef``), so the client never keeps its
own list of them. For a spec that leaves its ids out::

    >>> openapi = client.openapi()
    >>> spec = {"stages": [{"type": "distill", "method": "kd", "steps": 100}], "evaluation": {}}
    >>> [(slot.path, slot.kind) for slot in required_references(spec, openapi)]
    [('model_id', 'model'), ('stages.0.dataset_id', 'dataset'), ('evaluation.dataset_id', 'dataset')]

Only required references are slots: an optional one (a distillation teacher) means something
when left out.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

REFERENCE_KEY = "x-squeeze-ref"
JOBS_PATH = "/v1/jobs"


@dataclass
class Slot:
    """A required reference field of one object in the spec: ``holder[key]`` is the id."""

    path: str  # "stages.0.dataset_id", as the server's error ``param`` names it
    kind: str  # "model" | "dataset"
    holder: dict
    key: str


def job_spec_schema(openapi: dict) -> dict:
    """The request body schema of ``POST /v1/jobs``."""
    return openapi["paths"][JOBS_PATH]["post"]["requestBody"]["content"]["application/json"]["schema"]


def required_references(spec: dict, openapi: dict) -> Iterator[Slot]:
    """The required reference fields of ``spec``, in the schema's field order. An optional
    section written with no value (``evaluation:`` in YAML) is made an empty mapping when it
    holds such a field, so that it can be filled."""
    yield from _walk(spec, job_spec_schema(openapi), (), openapi)


def _resolve(schema: dict, root: dict) -> dict:
    while "$ref" in schema:  # "#/components/schemas/JobSpec"
        node: Any = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def _kind(schema: dict, root: dict) -> str | None:
    """The reference kind of a property: on its schema, or on a branch of ``X | None``."""
    schema = _resolve(schema, root)
    if REFERENCE_KEY in schema:
        return schema[REFERENCE_KEY]
    for branch in schema.get("anyOf", []) + schema.get("oneOf", []):
        if kind := _kind(branch, root):
            return kind
    return None


def _object_branch(schema: dict, value: dict, root: dict) -> dict | None:
    """The object schema that ``value`` is an instance of: among union branches, the one whose
    constants (a stage's ``type`` and ``method``) it matches."""
    schema = _resolve(schema, root)
    branches = schema.get("anyOf") or schema.get("oneOf")
    if not branches:
        return schema if "properties" in schema else None
    for branch in branches:
        branch = _object_branch(branch, value, root)
        if branch is not None and all(value.get(name) == prop["const"]
                                      for name, prop in branch["properties"].items() if "const" in prop):
            return branch
    return None


def _walk(value: Any, schema: dict, path: tuple[str, ...], root: dict) -> Iterator[Slot]:
    if isinstance(value, list):
        items = _resolve(schema, root).get("items", {})
        for index, item in enumerate(value):
            yield from _walk(item, items, (*path, str(index)), root)
        return
    if not isinstance(value, dict) or (schema := _object_branch(schema, value, root)) is None:
        return
    required = set(schema.get("required", []))
    for name, prop in schema["properties"].items():
        where = (*path, name)
        kind = _kind(prop, root)
        if kind is not None:
            if name in required:
                yield Slot(".".join(where), kind, value, name)
        elif name in value and value[name] is None:
            section: dict = {}
            slots = list(_walk(section, prop, where, root))
            if slots:
                value[name] = section
                yield from slots
        elif name in value:
            yield from _walk(value[name], prop, where, root)
