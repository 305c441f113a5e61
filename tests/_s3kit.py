"""moto's S3 server on loopback, for the checkpoint tests on an S3-compatible store."""

from __future__ import annotations

import contextlib
import os
import socket

import pytest

KEY = SECRET = "testing"
REGION = "us-east-1"


@contextlib.contextmanager
def moto_s3(bucket: str):
    """Start moto's server on a free loopback port with ``bucket`` made; yields (port, a boto3
    client of it). Skips the test where moto's server mode is not installed."""
    server_mod = pytest.importorskip(
        "moto.server", reason="moto's server mode is not installed: pip install 'moto[server]'")
    boto3 = pytest.importorskip("boto3")
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookups
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}",
                              aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                              region_name=REGION)
        client.create_bucket(Bucket=bucket)
        yield port, client
    finally:
        server.stop()
