"""A real S3-protocol server on loopback for the tests: moto's ``ThreadedMotoServer`` (an HTTP
server speaking the S3 REST API, signatures checked, multipart and ranged GETs included) on
127.0.0.1 and a free port. The code under test talks to it with its ordinary boto3 client,
configured by the standard AWS environment variables; nothing of the client is mocked."""

from __future__ import annotations

import uuid
from contextlib import contextmanager
from collections.abc import Iterator


@contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """Start the server, create a bucket; yields the environment a process needs to use it,
    ``SQUEEZE_STORAGE_URL`` included."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    bucket = f"squeeze-{uuid.uuid4().hex[:12]}"
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test-key",
           "AWS_SECRET_ACCESS_KEY": "test-secret", "AWS_REGION": "us-east-1",
           "SQUEEZE_STORAGE_URL": f"s3://{bucket}/squeeze-test"}
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                 aws_access_key_id="test-key", aws_secret_access_key="test-secret").create_bucket(Bucket=bucket)
    try:
        yield env
    finally:
        server.stop()
