"""A real S3-protocol server for tests: `moto_server` on 127.0.0.1 (a free port), started once per
session, stopped at the end. A plain module, not a conftest.py: a test module imports both fixtures:

    from tests.conftest_s3 import moto_server, s3  # noqa: F401  (pytest fixtures)

`s3` (per test) points the standard AWS environment at the server (AWS_ENDPOINT_URL, dummy keys,
region; no profile or config file of the machine), so code under test and the CLI subprocesses
(`run_cli` copies os.environ) reach it exactly as they would reach real S3. Buckets are not shared:
take a fresh one with `s3.new_bucket()`.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# Dummy credentials. moto accepts any key until authentication is switched on (`set_auth(True)`);
# the values are distinctive so tests can grep outputs and logs for leaks.
ACCESS_KEY = "AKIAFRAMESCRIBETEST7"  # dummy key, only moto ever sees it
SECRET_KEY = "fs-secret-9f3c2b7e1d0a4c5b8e6f"
REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str
    proc: subprocess.Popen
    buckets: list[str] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """The environment a client needs (what the `s3` fixture sets)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION)

    def new_bucket(self, prefix: str = "fs") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        self.buckets.append(name)
        return name

    def upload(self, local: Path, bucket: str, key: str) -> str:
        self.client().upload_file(str(local), bucket, key)
        return f"s3://{bucket}/{key}"

    def upload_dir(self, local: Path, bucket: str, prefix: str) -> str:
        for p in sorted(Path(local).rglob("*")):
            if p.is_file():
                self.upload(p, bucket, f"{prefix.strip('/')}/{p.relative_to(local).as_posix()}")
        return f"s3://{bucket}/{prefix.strip('/')}"

    def objects(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        """Every object under the prefix, read with boto3 (independent of fsspec / pyarrow)."""
        c, out = self.client(), {}
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                out[o["Key"]] = c.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        return out

    def set_auth(self, enabled: bool) -> None:
        """Switch moto's IAM authentication on (every key is then unknown: requests get 403) or off."""
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", method="POST",
                                     data=b"0" if enabled else b"inf", headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(req, timeout=10).read()


def _start(log) -> S3Server:
    last = None
    for _ in range(3):  # the free port can be taken between probing and binding: try another
        port = _free_port()
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT)
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=2).read()
                return S3Server(endpoint, proc)
            except OSError as e:
                last = e
                time.sleep(0.1)
        proc.kill()
        proc.wait()
    raise RuntimeError(f"moto_server did not start: {last}")


@pytest.fixture(scope="session")
def moto_server():
    """One moto S3 server for the session (about 1 s to start)."""
    with tempfile.TemporaryFile() as log:
        server = _start(log)
        try:
            yield server
        finally:
            server.proc.terminate()
            try:
                server.proc.wait(10)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()


@pytest.fixture
def s3(moto_server, monkeypatch, tmp_path_factory):
    """The moto server with the standard AWS environment pointed at it (inherited by subprocesses)."""
    import s3fs

    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                 "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in moto_server.env.items():
        monkeypatch.setenv(name, value)
    empty = tmp_path_factory.mktemp("aws")  # no config / credentials file of this machine leaks in
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield moto_server
    finally:
        moto_server.set_auth(False)
        s3fs.S3FileSystem.clear_instance_cache()
