"""Filesystems for local paths and object storage (fsspec): credentials only from the environment."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import fsspec

from actors import s3_retry

s3_retry.install()  # s3fs also retries 5xx answers without a body (HEAD), see actors/s3_retry.py


# Transient storage errors (throttling, 5xx, connection resets, timeouts) are retried inside the task by the
# storage libraries themselves: botocore (standard mode: exponential backoff with jitter, up to
# S3_MAX_ATTEMPTS attempts per request; AWS_MAX_ATTEMPTS / AWS_RETRY_MODE override it) and, around that,
# s3fs (its `retries`, default 5, for SlowDown, timeouts and dropped connections).
S3_MAX_ATTEMPTS = 5
S3_CONNECT_TIMEOUT_S = 10
S3_READ_TIMEOUT_S = 60


def s3_client_config() -> dict[str, Any]:
    """botocore.client.Config arguments for the retries and timeouts above."""
    config: dict[str, Any] = {"connect_timeout": S3_CONNECT_TIMEOUT_S, "read_timeout": S3_READ_TIMEOUT_S}
    if not (os.environ.get("AWS_MAX_ATTEMPTS") or os.environ.get("AWS_RETRY_MODE")):
        config["retries"] = {"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"}
    return config


def storage_options(uri: str, *, s3_endpoint: str | None = None, anon: bool = False) -> dict[str, Any]:
    """fsspec options for `uri`; secrets stay in the AWS env/config chain, never in our config."""
    if not uri.startswith(("s3://", "s3a://")):
        return {}
    opts: dict[str, Any] = {"anon": anon, "config_kwargs": s3_client_config()}
    endpoint = s3_endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    return opts


def get_fs(uri: str, *, s3_endpoint: str | None = None, anon: bool = False):
    """(filesystem, path without protocol) for a local path, file://, s3:// or any fsspec URL."""
    fs, path = fsspec.core.url_to_fs(uri, **storage_options(uri, s3_endpoint=s3_endpoint, anon=anon))
    return fs, path


@dataclass(frozen=True)
class Location:
    """A location (input, output, model) resolved once: its URI, fsspec filesystem and root path."""
    uri: str
    fs: Any
    root: str

    @classmethod
    def resolve(cls, uri: str, *, s3_endpoint: str | None = None, anon: bool = False) -> "Location":
        fs, root = get_fs(uri, s3_endpoint=s3_endpoint, anon=anon)
        return cls(uri, fs, root.rstrip("/") or root)

    def path(self, *parts: str) -> str:
        return join(self.root, *parts) if parts else self.root

    @property
    def remote(self) -> bool:
        return is_remote(self.uri)


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID")


def redact(text: str) -> str:
    """`text` with credential values from the environment and URL user-info (user:pass@) blanked out."""
    import re

    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return re.sub(r"(\w+://)[^/@\s]+@", r"\1***@", text)


def is_s3(uri: str) -> bool:
    return uri.startswith(("s3://", "s3a://"))


def check_bucket(uri: str, field: str, *, s3_endpoint: str | None = None, anon: bool = False,
                 write: bool = False) -> None:
    """Fail fast, before any cluster work, when an s3:// location cannot be used.

    Raises ConfigError naming `field`: the bucket does not exist (framescribe never creates buckets),
    access is denied (credentials), or the endpoint cannot be reached. With `write`, a tiny probe
    object is written under `<uri>/_framescribe/` and deleted again. Local paths are not checked here.
    """
    from pipeline.config import ConfigError

    if not is_s3(uri):
        return
    fs, path = get_fs(uri, s3_endpoint=s3_endpoint, anon=anon)
    bucket = path.split("/", 1)[0]
    hint = ("check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, instance role) "
            "or pass --anon for a public bucket")
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
        if write:
            import uuid

            probe = join(path, "_framescribe", f".write-probe-{uuid.uuid4().hex}")
            fs.pipe_file(probe, b"")
            fs.rm_file(probe)
    except FileNotFoundError:
        raise ConfigError(f"{field}: bucket {bucket!r} of {uri!r} does not exist "
                          f"(framescribe does not create buckets)") from None
    except PermissionError as e:
        raise ConfigError(f"{field}: access to {uri!r} denied ({redact(str(e))}); {hint}") from None
    except Exception as e:
        name = type(e).__name__
        if "Endpoint" in name or "Connect" in name or isinstance(e, (ConnectionError, TimeoutError)):
            raise ConfigError(f"{field}: cannot reach the object store for {uri!r} ({name}); check --s3-endpoint "
                              f"/ AWS_ENDPOINT_URL and the network") from None
        raise ConfigError(f"{field}: cannot use {uri!r}: {name}: {redact(str(e))}") from None


def check_local_writable(uri: str, field: str) -> None:
    """Fail fast, before any cluster work, when a local output folder cannot be written. Nothing is created:
    a probe file is written to and deleted from the folder, or from its nearest existing parent when the
    folder does not exist yet (the run creates it later)."""
    from pipeline.config import ConfigError

    if is_remote(uri):
        return
    import uuid
    from pathlib import Path

    target = Path(get_fs(uri)[1])
    existing = next((p for p in (target, *target.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise ConfigError(f"{field}: {uri!r} cannot be a folder: {str(existing)!r} is a file")
    probe = existing / f".framescribe-write-probe-{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{field}: cannot write to {uri!r} ({type(e).__name__}: {e.strerror or e} in "
                          f"{str(existing)!r}); choose a writable folder") from None
