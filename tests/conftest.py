"""Shared fixtures: deterministic torch, and a guard against threads a test leaves running."""

from __future__ import annotations

import dataclasses
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_torch() -> Iterator[None]:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    leaked = [
        t
        for t in threading.enumerate()
        if t not in before and t.is_alive() and t.name.startswith("lrwatch")
    ]
    for t in leaked:
        t.join(timeout=5)
    still = [t.name for t in leaked if t.is_alive()]
    assert not still, f"test leaked lrwatch threads: {still}"


@dataclasses.dataclass
class S3Server:
    """A running moto server: ``url`` of its bucket, ``endpoint``, and the server to stop."""

    url: str
    endpoint: str
    server: Any

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint)


@pytest.fixture
def s3(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[S3Server]:
    """A real S3-compatible server (moto's server mode) on a free port, with one bucket.

    The environment points botocore at it (``AWS_ENDPOINT_URL``, dummy credentials), as a user
    points lrwatch at MinIO or Ceph, so subprocesses inherit it; every trainer's spool goes to
    a temporary directory (``LRWATCH_SPOOL``), and so do the daemon's and views' copies
    (``LRWATCH_STATE_DIR``).
    """
    server_mod = pytest.importorskip("moto.server", reason="needs moto[server] (dev extra)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "LRWATCH_SPOOL": str(tmp_path_factory.mktemp("spool")),
        "LRWATCH_STATE_DIR": str(tmp_path_factory.mktemp("state")),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "FSSPEC_S3_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    bucket = f"lrwatch-test-{port}"
    out = S3Server(f"s3://{bucket}", endpoint, server)
    out.client().create_bucket(Bucket=bucket)
    try:
        yield out
    finally:
        server.stop()
