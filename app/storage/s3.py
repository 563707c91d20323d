"""The S3 backend: objects in any S3-compatible store (AWS S3, MinIO, Ceph, R2, ...).

``SQUEEZE_STORAGE_URL=s3://bucket/prefix``; the endpoint, credentials and region come from the
standard AWS settings (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_REGION``, or a profile / instance role), so nothing secret passes through Squeeze's own
settings. With an endpoint set (a non-AWS store) requests use path-style addressing, which
every S3-compatible server accepts.

Why boto3: it is the AWS-maintained client, released weekly, and the reference every
S3-compatible server tests against; its transfer manager (s3transfer) already does what this
module needs — multipart uploads in fixed-size parts with a bounded number in flight (flat
memory whatever the file size), retries with backoff, ranged GETs, presigned URLs — and it
reads the standard AWS environment and config files. obstore is faster but younger and adds a
Rust wheel; fsspec/s3fs adds an async layer (aiobotocore) pinning botocore versions. The API
and the worker are synchronous code in threads, which is what boto3 is built for.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from datetime import datetime, timedelta, timezone
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

from app.storage.base import CHUNK, LocalWork, ObjectInfo, object_key
from app.storage.cache import ScratchCache

# Parts of 16 MiB, 4 in flight: at most ~64 MiB of an upload in memory, whatever its size.
PART_BYTES = 16 * 1024 * 1024
CONCURRENCY = 4


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix/")`` (prefix may be empty)."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"SQUEEZE_STORAGE_URL must look like s3://bucket/prefix, not {url!r}")
    prefix = parts.path.strip("/")
    return parts.netloc, f"{prefix}/" if prefix else ""


def make_client():
    import boto3
    from botocore.config import Config

    # Path-style for an explicit endpoint: MinIO and most S3-compatible servers need it.
    style = "path" if os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") else "auto"
    return boto3.client("s3", config=Config(retries={"max_attempts": 5, "mode": "standard"},
                                            s3={"addressing_style": style}))


class S3Store(LocalWork):
    """Objects under ``s3://bucket/prefix``; ``root`` is this host's scratch folder only."""

    def __init__(self, url: str, root: Path, cache_max_bytes: int, client=None):
        from boto3.s3.transfer import TransferConfig

        self.bucket, self.prefix = parse_url(url)
        self.root = root
        self._make_work_dirs()
        self.client = client or make_client()
        self.transfer = TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES,
                                       max_concurrency=CONCURRENCY, io_chunksize=CHUNK)
        self.cache = ScratchCache(root / "cache", cache_max_bytes)

    def _key(self, key: str) -> str:
        kind, _, rest = key.partition("/")
        object_id, _, name = rest.partition("/")
        return self.prefix + object_key(kind, object_id, name)

    def _extra(self, sha256: str | None) -> dict:
        return {"Metadata": {"sha256": sha256}} if sha256 else {}

    # -- publishing ---------------------------------------------------------------------------

    def commit_dir(self, staging: Path, kind: str, object_id: str) -> None:
        """Upload every file of a fully validated staging folder, then drop the folder.

        Readers find a model or dataset through its database row, written after this returns,
        so nobody looks at the prefix while it is being filled."""
        try:
            for path in sorted(p for p in staging.rglob("*") if p.is_file()):
                self.put_file(object_key(kind, object_id, str(path.relative_to(staging))), path)
        except BaseException:
            self.delete(kind, object_id)
            raise
        self.discard(staging)

    def put_file(self, key: str, path: Path, sha256: str | None = None, move: bool = False) -> None:
        self.client.upload_file(str(path), self.bucket, self._key(key), ExtraArgs=self._extra(sha256),
                                Config=self.transfer)
        if move:
            path.unlink(missing_ok=True)

    def put_stream(self, key: str, stream: BinaryIO, sha256: str | None = None) -> None:
        """Multipart upload from a file-like object: ``PART_BYTES`` at a time, never whole."""
        self.client.upload_fileobj(stream, self.bucket, self._key(key), ExtraArgs=self._extra(sha256),
                                   Config=self.transfer)

    # -- reading ------------------------------------------------------------------------------

    def head(self, key: str) -> ObjectInfo | None:
        from botocore.exceptions import ClientError

        try:
            answer = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return ObjectInfo(size=answer["ContentLength"], etag=answer["ETag"],
                          sha256=answer.get("Metadata", {}).get("sha256"))

    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """The bytes ``start..end`` (inclusive) with one ranged GET, streamed in chunks."""
        ranged = {"Range": f"bytes={start}-{'' if end is None else end}"} if start or end is not None else {}
        body = self.client.get_object(Bucket=self.bucket, Key=self._key(key), **ranged)["Body"]
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    def read_bytes(self, key: str) -> bytes:
        return b"".join(self.open_range(key))

    def list(self, prefix: str) -> list[str]:
        keys = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                          Prefix=self.prefix + prefix):
            keys += [item["Key"][len(self.prefix):] for item in page.get("Contents", [])]
        return sorted(keys)

    def local_file(self, key: str) -> Path | None:
        return None  # served by streaming from the store (or a presigned URL)

    def presign(self, key: str, expires_s: int, filename: str) -> str | None:
        return self.client.generate_presigned_url(
            "get_object", ExpiresIn=expires_s,
            Params={"Bucket": self.bucket, "Key": self._key(key),
                    "ResponseContentDisposition": f'attachment; filename="{filename}"'})

    # -- deleting -----------------------------------------------------------------------------

    def delete_key(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self.prefix + key} for key in keys[start:start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        return len(keys)

    def delete(self, kind: str, object_id: str) -> None:
        self.delete_prefix(object_key(kind, object_id) + "/")
        self.cache.forget(kind, object_id)

    # -- the worker's copy --------------------------------------------------------------------

    @contextmanager
    def checkout(self, kind: str, object_id: str) -> Iterator[Path]:
        """The object's files in the scratch cache (downloaded once, kept while space allows)."""
        prefix = object_key(kind, object_id) + "/"

        def download(into: Path) -> None:
            keys = self.list(prefix)
            if not keys:
                raise FileNotFoundError(f"{kind}/{object_id} is missing from storage")
            for key in keys:
                target = into / key[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                self.client.download_file(self.bucket, self.prefix + key, str(target), Config=self.transfer)

        with self.cache.use(kind, object_id, download) as path:
            yield path

    # -- resumable uploads: one S3 multipart upload per upload, its parts numbered the same --

    min_part_bytes = 5 * 1024 * 1024  # S3's smallest part (all but the last)

    def _upload_key(self, upload_id: str) -> str:
        self.parts_dir(upload_id)  # validates the id
        return f"{self.prefix}uploads/{upload_id}"

    def _multipart_ids(self, upload_id: str) -> list[str]:
        key = self._upload_key(upload_id)
        answer = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=key)
        return [item["UploadId"] for item in answer.get("Uploads", []) if item["Key"] == key]

    def parts_begin(self, upload_id: str) -> None:
        self.parts_dir(upload_id).mkdir(parents=True)  # each part arrives here, then goes to the store
        self.client.create_multipart_upload(Bucket=self.bucket, Key=self._upload_key(upload_id))

    def parts_put(self, upload_id: str, number: int, path: Path) -> None:
        """Send the received part as part ``number`` of the multipart upload (a re-sent part
        replaces the old one, as S3 does), then drop the local copy."""
        ids = self._multipart_ids(upload_id)
        if not ids:
            raise FileNotFoundError(f"upload {upload_id} has no multipart upload in the store")
        try:
            with path.open("rb") as body:
                self.client.upload_part(Bucket=self.bucket, Key=self._upload_key(upload_id), UploadId=ids[0],
                                        PartNumber=number, Body=body)
        finally:
            path.unlink(missing_ok=True)

    def parts_assemble(self, upload_id: str, count: int) -> str:
        """Complete the multipart upload (the store joins the parts, no byte passes through
        here) unless an earlier completion already did, then stream the whole for its sha256."""
        key = self._upload_key(upload_id)
        for multipart_id in self._multipart_ids(upload_id):
            parts = self.client.list_parts(Bucket=self.bucket, Key=key, UploadId=multipart_id).get("Parts", [])
            chosen = [{"PartNumber": p["PartNumber"], "ETag": p["ETag"]} for p in parts if p["PartNumber"] <= count]
            self.client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=multipart_id,
                                                  MultipartUpload={"Parts": chosen})
        digest = hashlib.sha256()
        body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        for chunk in body.iter_chunks(CHUNK):
            digest.update(chunk)
        return digest.hexdigest()

    @contextmanager
    def parts_open(self, upload_id: str) -> Iterator[BinaryIO]:
        # Kept after reading: a completion refused by validation can be retried as is.
        body = self.client.get_object(Bucket=self.bucket, Key=self._upload_key(upload_id))["Body"]
        try:
            yield body
        finally:
            body.close()

    def parts_unassemble(self, upload_id: str) -> bool:
        """A completed multipart upload cannot be reopened: the whole goes and a fresh multipart
        upload starts; the client sends every part again."""
        self.client.delete_object(Bucket=self.bucket, Key=self._upload_key(upload_id))
        self.client.create_multipart_upload(Bucket=self.bucket, Key=self._upload_key(upload_id))
        return False

    def parts_discard(self, upload_id: str) -> None:
        key = self._upload_key(upload_id)
        for multipart_id in self._multipart_ids(upload_id):
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=multipart_id)
        self.client.delete_object(Bucket=self.bucket, Key=key)
        shutil.rmtree(self.parts_dir(upload_id), ignore_errors=True)

    def parts_stale(self, max_idle_s: float) -> list[str]:
        """Upload ids of multipart uploads started more than ``max_idle_s`` ago (the reconciler
        aborts those no pending upload owns: an API process died between the two)."""
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=max_idle_s)
        stale = []
        for page in self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=f"{self.prefix}uploads/"):
            stale += [item["Key"].rsplit("/", 1)[-1] for item in page.get("Uploads", [])
                      if item["Initiated"] < cutoff]
        return sorted(set(stale))
