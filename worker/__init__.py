"""The Celery worker: ``celery -A worker.celery_app worker`` (see ``worker/celery_app.py``).

A worker never reaches the Hugging Face Hub: it loads uploaded checkpoints from local files
only. ``huggingface_hub`` and ``transformers`` read ``HF_HUB_OFFLINE`` once, when they are first
imported, and ``celery -A worker.celery_app`` imports this package before any module of it, so
offline mode is set here, first, whatever started the worker (``make worker``, a bare
``celery`` command, a container without the variable). It is forced, not defaulted: no setting
makes a worker go online.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
