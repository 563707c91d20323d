"""Through HTTP: a model that an unfinished job names only as its distillation teacher cannot
be deleted from under it (409 naming the job and the field); once the job is over it can."""

from __future__ import annotations

from tests.e2e.client import upload_dataset, upload_model, wait_for
from tests.factories import make_checkpoint


def test_a_queued_or_running_jobs_teacher_is_not_deleted_until_the_job_ends(stack, tmp_path):
    client = stack.client
    source = upload_model(client, make_checkpoint(tmp_path / "source"))
    teacher = upload_model(client, make_checkpoint(tmp_path / "teacher", seed=1))
    dataset = upload_dataset(client)
    # Long enough to be queued or running while we ask; it ends when cancelled.
    created = client.post("/v1/jobs", json={
        "model_id": source["id"],
        "stages": [{"type": "distill", "method": "kd", "dataset_id": dataset["id"], "teacher_model_id": teacher["id"],
                    "steps": 1_000_000, "batch_size": 1, "seq_len": 16}]})
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]

    refused = client.delete(f"/v1/models/{teacher['id']}")
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert (error["type"], error["param"]) == ("conflict", "model_id")
    assert job_id in error["message"] and "stages.0.teacher_model_id" in error["message"]
    assert client.get(f"/v1/models/{teacher['id']}").status_code == 200
    refused = client.delete(f"/v1/datasets/{dataset['id']}")
    assert refused.status_code == 409 and refused.json()["error"]["param"] == "dataset_id"

    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    assert wait_for(client, job_id, timeout=120)["status"] == "cancelled"
    assert client.delete(f"/v1/models/{teacher['id']}").status_code == 200
    assert client.get(f"/v1/models/{teacher['id']}").status_code == 404
    assert client.delete(f"/v1/datasets/{dataset['id']}").status_code == 200
