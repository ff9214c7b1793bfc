"""Which Ray a run uses, decided before it starts: never a dead cluster, never an endless wait.

- no `--address` and no `RAY_ADDRESS`: a new local Ray for this run (not whatever the stale
  `/tmp/ray/ray_current_cluster` file of a stopped `ray start` points to);
- `RAY_ADDRESS` (a submitted Ray job sets it) or `--address HOST:PORT` / `ray://HOST:PORT`: that cluster;
- `--address auto`: the running local cluster (`ray start --head` on this machine).
An address must answer a TCP connect within `PROBE_TIMEOUT_S`, else the run fails with a ConfigError
naming it (exit 2) instead of retrying the GCS for minutes.
"""
from __future__ import annotations

import os
import socket

from pipeline.config import ConfigError

PROBE_TIMEOUT_S = 5.0


def resolve_address(address: str | None) -> str | None:
    """The address to pass to `ray.init` ("local" = start a new local Ray); raises ConfigError."""
    source = "address"
    if address is None:
        env = os.environ.get("RAY_ADDRESS", "").strip()
        if not env:
            return "local"
        address, source = env, "RAY_ADDRESS"
    if address.startswith(("http://", "https://")):
        raise ConfigError(f"{source}: {address!r} is a Ray job API URL; use `framescribe submit` with it, or "
                          "give the cluster's HOST:PORT / ray://HOST:PORT")
    if address == "local":
        return "local"
    target = address
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address
        from ray._private.utils import read_ray_address

        try:  # the cluster `ray start` recorded; else any local GCS Ray finds (its legacy "auto")
            target = read_ray_address() or canonicalize_bootstrap_address("auto")
        except Exception as e:
            raise ConfigError(f"{source}: 'auto' found no running local Ray cluster ({e}); start one with "
                              "`ray start --head`, pass its address, or leave --address out for a local Ray") from None
        if target is None:
            raise ConfigError(f"{source}: 'auto' found no running local Ray cluster")
    probe(target, source)
    return address


def forget_dead_local_cluster() -> None:
    """Remove a `ray_current_cluster` file whose cluster no longer answers (a stopped `ray start` left it).

    A new local Ray started while that file names a dead GCS does not come up here (its agents follow the
    file: "The current node timed out during startup"); Ray's `ray stop` removes the file the same way."""
    from ray._common.utils import reset_ray_address
    from ray._private.utils import read_ray_address

    recorded = read_ray_address()
    if not recorded:
        return
    try:
        probe(recorded, "ray_current_cluster")
    except ConfigError:
        reset_ray_address()


def probe(address: str, source: str = "address") -> None:
    """Fail fast when nothing listens at `address` (host:port, optionally ray://)."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"{source}: {address!r} is not HOST:PORT, ray://HOST:PORT, auto or local")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as e:
        raise ConfigError(f"{source}: no Ray cluster answers at {address!r} ({type(e).__name__}: {e}); "
                          "is it running? (without --address a run starts its own local Ray)") from None
