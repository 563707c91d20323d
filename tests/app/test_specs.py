"""The job spec: one definition, strict, with errors that name the field."""

import json
import re
from pathlib import Path

import pydantic
import pytest

from app.specs import (REFERENCE_KEY, STAGE_TAGS, JobSpec, PruneMagnitude, QuantizeRTN,
                       reference_fields, references, stage_name)


def _spec(*stages, **extra):
    return {"model_id": "mdl_x", "stages": list(stages), **extra}


def test_stages_parse_into_their_config_models():
    spec = JobSpec.model_validate(_spec({"type": "prune", "method": "magnitude", "sparsity": 0.5},
                                        {"type": "quantize", "method": "rtn", "bits": 4, "group_size": 128}))
    assert isinstance(spec.stages[0], PruneMagnitude) and spec.stages[0].scope == "layer"
    assert isinstance(spec.stages[1], QuantizeRTN) and spec.stages[1].group_size == 128
    assert [stage_name(s) for s in spec.stages] == ["prune.magnitude", "quantize.rtn"]
    # What the worker reads back from the database is the same.
    assert JobSpec.model_validate(spec.model_dump(mode="json")).stages == spec.stages


@pytest.mark.parametrize("stage, loc, error_type", [
    ({"type": "prune", "method": "magnitude", "sparsity": 1.5}, ("stages", 0, "prune.magnitude", "sparsity"), "less_than"),
    ({"type": "prune", "method": "magnitude", "sparsity": 1.0}, ("stages", 0, "prune.magnitude", "sparsity"), "less_than"),
    ({"type": "prune", "method": "magnitude", "sparsity": 0}, ("stages", 0, "prune.magnitude", "sparsity"), "greater_than"),
    ({"type": "prune", "method": "alchemy", "sparsity": 0.5}, ("stages", 0), "unknown_stage"),
    ({"type": "quantize", "method": "rtn", "bits": 3}, ("stages", 0, "quantize.rtn", "bits"), "literal_error"),
    ({"type": "quantize", "method": "rtn", "bitz": 8}, ("stages", 0, "quantize.rtn", "bitz"), "extra_forbidden"),
])
def test_bad_stages_are_rejected_with_their_location(stage, loc, error_type):
    with pytest.raises(pydantic.ValidationError) as info:
        JobSpec.model_validate(_spec(stage))
    error = info.value.errors()[0]
    assert error["loc"] == loc and error["type"] == error_type


@pytest.mark.parametrize("extra", [
    {"stages": []},
    {"calibration": {"dataset_id": "ds", "samples": 10**9}},
    {"evaluation": {"dataset_id": "ds", "seq_len": 64, "stride": 128}},
    {"output": {"format": "gguf"}},
])
def test_absurd_job_values_are_rejected(extra):
    body = _spec({"type": "quantize", "method": "rtn"})
    body.update(extra)
    with pytest.raises(pydantic.ValidationError):
        JobSpec.model_validate(body)


def test_data_aware_methods_need_calibration():
    body = _spec({"type": "prune", "method": "sparsegpt", "pattern": "2:4"})
    with pytest.raises(pydantic.ValidationError) as info:
        JobSpec.model_validate(body)
    assert info.value.errors()[0]["loc"] == ("calibration",)
    spec = JobSpec.model_validate({**body, "calibration": {"dataset_id": "ds"}})
    assert spec.stages[0].sparsity == 0.5 and spec.stages[0].n_m == (2, 4)


@pytest.mark.parametrize("stage", [
    {"type": "prune", "method": "wanda", "pattern": "4:2"},
    {"type": "prune", "method": "wanda", "pattern": "2:4", "sparsity": 0.7},
    {"type": "prune", "method": "wanda"},
    {"type": "prune", "method": "magnitude", "pattern": "2:4", "scope": "global"},
    {"type": "distill", "method": "kd", "dataset_id": "ds", "keep_layers": [0, 0]},
    {"type": "distill", "method": "kd", "dataset_id": "ds", "steps": -1},
])
def test_inconsistent_stage_fields_are_rejected(stage):
    with pytest.raises(pydantic.ValidationError):
        JobSpec.model_validate(_spec(stage, calibration={"dataset_id": "ds"}))


def test_compressed_output_needs_a_quantize_stage():
    with pytest.raises(pydantic.ValidationError) as info:
        JobSpec.model_validate(_spec({"type": "prune", "method": "magnitude", "sparsity": 0.5},
                                     output={"format": "compressed-tensors"}))
    assert info.value.errors()[0]["loc"] == ("output",)
    JobSpec.model_validate(_spec({"type": "quantize", "method": "rtn"}, output={"format": "compressed-tensors"}))


def test_every_job_spec_in_the_readme_validates():
    readme = Path(__file__).resolve().parents[2] / "README.md"
    blocks = [json.loads(block) for block in re.findall(r"```json\n(.*?)```", readme.read_text(), re.S)]
    specs = [block for block in blocks if "stages" in block]
    assert len(specs) >= 2
    for spec in specs:
        if "webhook" in spec:  # the README writes the secret as a placeholder
            spec["webhook"]["secret"] = "whsec_" + "A" * 32
        validated = JobSpec.model_validate(spec)
        assert [stage.type for stage in validated.stages] == [stage["type"] for stage in spec["stages"]]


# One stage of every (type, method): a new method is added here too (the first test says so).
ONE_OF_EACH_STAGE = {
    "prune.random": {"sparsity": 0.5},
    "prune.magnitude": {"sparsity": 0.5},
    "prune.wanda": {"sparsity": 0.5},
    "prune.sparsegpt": {"pattern": "2:4"},
    "prune.structured": {"sparsity": 0.25},
    "distill.kd": {"dataset_id": "ds_train", "teacher_model_id": "mdl_teacher", "student_model_id": "mdl_student"},
    "quantize.rtn": {},
    "quantize.gptq": {},
    "quantize.dynamic_int8": {},
}


def _every_stage_spec() -> JobSpec:
    stages = [{"type": tag.split(".")[0], "method": tag.split(".")[1], **fields}
              for tag, fields in ONE_OF_EACH_STAGE.items()]
    return JobSpec.model_validate(_spec(*stages, calibration={"dataset_id": "ds_calib"},
                                        evaluation={"dataset_id": "ds_eval"}))


def test_references_finds_every_named_object_in_a_spec_with_every_stage_kind():
    assert set(ONE_OF_EACH_STAGE) == STAGE_TAGS
    spec = _every_stage_spec()
    distill = list(ONE_OF_EACH_STAGE).index("distill.kd")

    assert [(ref.path, ref.kind, ref.id) for ref in reference_fields(spec)] == [
        ("model_id", "model", "mdl_x"),
        (f"stages.{distill}.dataset_id", "dataset", "ds_train"),
        (f"stages.{distill}.teacher_model_id", "model", "mdl_teacher"),
        (f"stages.{distill}.student_model_id", "model", "mdl_student"),
        ("calibration.dataset_id", "dataset", "ds_calib"),
        ("evaluation.dataset_id", "dataset", "ds_eval"),
    ]
    assert references(spec) == {"dataset": {"ds_train", "ds_calib", "ds_eval"},
                                "model": {"mdl_x", "mdl_teacher", "mdl_student"}}
    # Optional references left out are not references; every kind is still a key.
    bare = JobSpec.model_validate(_spec({"type": "quantize", "method": "rtn"}))
    assert references(bare) == {"dataset": set(), "model": {"mdl_x"}}


def test_the_json_schema_marks_exactly_the_reference_fields():
    """What the CLI and the web client read: ``x-squeeze-ref`` on the id's string schema."""
    schema = JobSpec.model_json_schema()

    def marked(node, path=()):
        if isinstance(node, dict):
            if REFERENCE_KEY in node:
                yield ".".join(p for p in path if p not in ("properties", "anyOf", "$defs") and not p.isdigit()), node[REFERENCE_KEY]
            for key, value in node.items():
                yield from marked(value, (*path, key))
        elif isinstance(node, list):
            for index, value in enumerate(node):
                yield from marked(value, (*path, str(index)))

    assert sorted(marked(schema)) == [
        ("CalibrationSpec.dataset_id", "dataset"),
        ("DistillKD.dataset_id", "dataset"),
        ("DistillKD.student_model_id", "model"),
        ("DistillKD.teacher_model_id", "model"),
        ("EvaluationSpec.dataset_id", "dataset"),
        ("model_id", "model"),
    ]
    assert schema["properties"]["model_id"] == {"type": "string", "minLength": 1, "maxLength": 64,
                                                "title": "Model Id", REFERENCE_KEY: "model"}
    teacher = schema["$defs"]["DistillKD"]["properties"]["teacher_model_id"]["anyOf"]
    assert {"type": "null"} in teacher and any(branch.get(REFERENCE_KEY) == "model" for branch in teacher)


@pytest.mark.parametrize("path", ["model_id", "calibration.dataset_id", "evaluation.dataset_id",
                                  "stages.0.teacher_model_id"])
@pytest.mark.parametrize("bad", ["", "x" * 65])
def test_an_empty_or_overlong_id_is_refused_naming_its_field(path, bad):
    body = _spec({"type": "distill", "method": "kd", "dataset_id": "ds"},
                 calibration={"dataset_id": "ds"}, evaluation={"dataset_id": "ds"})
    *parents, last = path.split(".")
    holder = body
    for part in parents:
        holder = holder[int(part)] if part.isdigit() else holder[part]
    holder[last] = bad
    with pytest.raises(pydantic.ValidationError) as info:
        JobSpec.model_validate(body)
    loc = [str(part) for part in info.value.errors()[0]["loc"] if part not in STAGE_TAGS]
    assert ".".join(loc) == path


def test_a_list_of_references_names_each_id_by_its_index():
    from app.specs import DatasetRef, RequestModel

    class Blend(RequestModel):
        dataset_ids: list[DatasetRef]
        weights: list[float]

    refs = [(ref.path, ref.kind, ref.id) for ref in reference_fields(Blend(dataset_ids=["ds_a", "ds_b"], weights=[1, 2]))]
    assert refs == [("dataset_ids.0", "dataset", "ds_a"), ("dataset_ids.1", "dataset", "ds_b")]
