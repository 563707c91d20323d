"""``squeeze jobs submit --model/--dataset``: which fields are filled comes from the server's
schema (``x-squeeze-ref``), here read from the app's own OpenAPI document, in-process."""

from __future__ import annotations

import pytest
import yaml

from app.main import create_app
from squeeze_client.cli import UsageError, fill_spec
from squeeze_client.schema import required_references
from tests.e2e.stack import ROOT

WANDA = {"type": "prune", "method": "wanda", "sparsity": 0.5}
DISTILL = {"type": "distill", "method": "kd", "steps": 10}


@pytest.fixture(scope="module")
def openapi() -> dict:
    return create_app().openapi()


def test_the_slots_are_the_required_references_of_the_sections_the_spec_has(openapi):
    spec = {"stages": [WANDA, DISTILL], "calibration": None, "evaluation": {}, "webhook": None}
    slots = [(slot.path, slot.kind) for slot in required_references(spec, openapi)]
    # A teacher or student is optional (the job's model, the pruned model): never filled.
    assert slots == [("model_id", "model"), ("stages.1.dataset_id", "dataset"),
                     ("calibration.dataset_id", "dataset"), ("evaluation.dataset_id", "dataset")]
    assert spec["calibration"] == {} and spec["webhook"] is None  # a null section that names nothing stays null


def test_model_and_dataset_fill_what_the_spec_leaves_empty(openapi):
    spec = {"stages": [WANDA, DISTILL, {"type": "quantize", "method": "rtn"}], "calibration": {"samples": 4},
            "evaluation": None}
    filled = fill_spec(spec, openapi, model="mdl_1", dataset="ds_1")
    assert filled == {"model_id": "mdl_1", "stages": [WANDA, {**DISTILL, "dataset_id": "ds_1"}, spec["stages"][2]],
                      "calibration": {"samples": 4, "dataset_id": "ds_1"}, "evaluation": {"dataset_id": "ds_1"}}
    assert spec["calibration"] == {"samples": 4}  # the caller's spec is left as it was


def test_the_example_spec_is_filled(openapi):
    spec = yaml.safe_load((ROOT / "examples" / "prune-quantize.yaml").read_text())
    filled = fill_spec(spec, openapi, model="mdl_1", dataset="ds_1")
    assert filled["model_id"] == "mdl_1" and filled["evaluation"]["dataset_id"] == "ds_1"


@pytest.mark.parametrize("spec, ids, message", [
    ({"stages": [WANDA]}, {}, "the spec has no model_id: add one or pass --model"),
    ({"stages": [DISTILL]}, {"model": "mdl_1"}, "the spec has no stages.0.dataset_id: add one or pass --dataset"),
    ({"model_id": "mdl_0", "stages": [WANDA]}, {"model": "mdl_1"},
     "the spec names model_id mdl_0; drop --model or the spec's model_id"),
    ({"model_id": "mdl_0", "stages": [WANDA], "evaluation": {"dataset_id": "ds_0"}}, {"dataset": "ds_1"},
     "the spec names evaluation.dataset_id ds_0; drop --dataset or the spec's dataset_id"),
])
def test_a_missing_or_conflicting_id_is_a_usage_error_naming_the_field(openapi, spec, ids, message):
    with pytest.raises(UsageError) as refused:
        fill_spec(spec, openapi, **ids)
    assert str(refused.value) == message


def test_an_id_the_spec_already_holds_is_kept_and_the_others_filled(openapi):
    spec = {"model_id": "mdl_1", "stages": [DISTILL], "evaluation": {"dataset_id": "ds_1"}}
    filled = fill_spec(spec, openapi, model="mdl_1", dataset="ds_1")
    assert filled["model_id"] == "mdl_1" and filled["stages"][0]["dataset_id"] == "ds_1"
    assert fill_spec({**spec, "stages": [WANDA]}, openapi) == {**spec, "stages": [WANDA]}
