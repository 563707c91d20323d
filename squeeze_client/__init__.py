"""A Python client and the ``squeeze`` command line for the Squeeze REST service.

>>> from squeeze_client import SqueezeClient
>>> client = SqueezeClient()                    # SQUEEZE_URL and SQUEEZE_API_KEY from the environment
>>> model = client.upload_model("var/tiny-gpt2")
>>> dataset = client.upload_dataset("var/corpus.txt")
>>> job = client.create_job({"model_id": model["id"],
...                          "stages": [{"type": "prune", "method": "magnitude", "sparsity": 0.5}],
...                          "evaluation": {"dataset_id": dataset["id"]}})
>>> job = client.wait(job["id"], on_event=lambda e: print(e["message"]))
>>> client.download_artifact(job["id"], "compressed.tar")
"""

from squeeze_client.client import DEFAULT_URL, DownloadResult, SqueezeClient, SqueezeError

__all__ = ["DEFAULT_URL", "DownloadResult", "SqueezeClient", "SqueezeError"]
