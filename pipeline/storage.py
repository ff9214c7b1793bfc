"""Filesystems for local paths and object storage (fsspec): credentials only from the environment."""
from __future__ import annotations

import os
from typing import Any

import fsspec


def storage_options(uri: str, *, s3_endpoint: str | None = None, anon: bool = False) -> dict[str, Any]:
    """fsspec options for `uri`; secrets stay in the AWS env/config chain, never in our config."""
    if not uri.startswith(("s3://", "s3a://")):
        return {}
    opts: dict[str, Any] = {"anon": anon}
    endpoint = s3_endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    return opts


def get_fs(uri: str, *, s3_endpoint: str | None = None, anon: bool = False):
    """(filesystem, path without protocol) for a local path, file://, s3:// or any fsspec URL."""
    fs, path = fsspec.core.url_to_fs(uri, **storage_options(uri, s3_endpoint=s3_endpoint, anon=anon))
    return fs, path


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
