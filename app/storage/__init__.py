"""Where files live: uploaded checkpoints, datasets and job artifacts.

One interface (``Storage`` in ``base.py``), two backends, chosen by ``SQUEEZE_STORAGE_URL``:

- unset: the local folder ``SQUEEZE_STORAGE_ROOT`` (``local.py``, the embedded default), shared
  by the API and the workers (one host, or a network mount);
- ``s3://bucket/prefix``: any S3-compatible store (``s3.py``); the API and the workers then
  share nothing but the database, the broker and the bucket, and ``SQUEEZE_STORAGE_ROOT`` is
  each process's own scratch folder (staging, and a worker's cache of recent models).
"""

from __future__ import annotations

from app.config import get_settings
from app.storage.base import CHUNK, LIVE_STAGING, ObjectInfo, Storage, object_key, sha256_file
from app.storage.local import LocalStore

__all__ = ["CHUNK", "LIVE_STAGING", "LocalStore", "ObjectInfo", "Storage", "get_store", "object_key",
           "sha256_file", "store_for"]

_cached: dict[tuple, Storage] = {}


def store_for(url: str | None, root, cache_max_bytes: int) -> Storage:
    if not url:
        return LocalStore(root)
    from app.storage.s3 import S3Store

    return S3Store(url, root, cache_max_bytes)


def get_store() -> Storage:
    """The configured backend (one boto3 client per process and setting: clients are thread-safe
    and costly to build)."""
    settings = get_settings()
    config = (settings.storage_url, settings.resolved_storage_root, settings.scratch_cache_max_bytes)
    if not settings.storage_url:
        return LocalStore(settings.resolved_storage_root)
    if config not in _cached:
        _cached[config] = store_for(*config)
    return _cached[config]
