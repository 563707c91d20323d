"""A worker never reaches the Hugging Face Hub, however it was started: a bare
``celery -A worker.celery_app worker`` with no ``HF_HUB_OFFLINE`` in its environment included.

``huggingface_hub`` reads the variable once, when first imported, so the test imports the worker
as Celery does, in a fresh interpreter whose environment lacks the variable (or says ``0``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# What `celery -A worker.celery_app worker` imports: the app (found the way Celery finds it),
# then the task modules it includes; then a model load's modules. Then: what do the Hub
# client and transformers believe?
_PROBE = """
import json
from celery.app.utils import find_app
app = find_app("worker.celery_app")
app.loader.import_default_modules()
import worker.engine.loading
import huggingface_hub.constants
import transformers.utils.hub
print(json.dumps({
    "hub_offline": huggingface_hub.constants.HF_HUB_OFFLINE,
    "transformers_offline": transformers.utils.hub.is_offline_mode(),
    "tasks_loaded": "squeeze.run_job" in app.tasks,
}))
"""


@pytest.mark.parametrize("setting", [None, "0"], ids=["unset", "zero"])
def test_a_bare_worker_start_is_offline(tmp_path, setting):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["SQUEEZE_VAR_DIR"] = str(tmp_path)
    if setting is not None:
        env["HF_HUB_OFFLINE"] = setting
    result = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen == {"hub_offline": True, "transformers_offline": True, "tasks_loaded": True}
