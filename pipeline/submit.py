"""`framescribe submit` and `framescribe job status|logs|stop|list`: Ray Jobs API client side.

The job runs `python -m jobs.label --config framescribe-run.yaml` on the cluster. Its runtime_env
working_dir is a staged copy of the framescribe packages (pipeline/, actors/, iwp/, jobs/: source
files only, no .venv, .git, outputs or big files) plus the validated, merged config; nothing else
leaves this machine unless asked for (`--env-from-local`, `--pip`).
"""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlparse

import typer
import yaml
from rich.console import Console
from rich.markup import escape

from pipeline.config import ConfigError, RunConfig, load_config

console = Console(stderr=True)
EXIT_CONFIG = 2                    # bad config, unreachable cluster, auth refused: fix something locally
PACKAGES = ("pipeline", "actors", "iwp", "jobs")
SHIPPED_CONFIG = "framescribe-run.yaml"
MAX_SHIPPED_FILE = 5 * 2**20       # a source file bigger than this is data, not code: never shipped
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
ADDRESS_HELP = ("Ray job API (dashboard) URL, e.g. http://127.0.0.1:8265 (kubectl port-forward "
                "svc/<cluster>-head-svc 8265:8265). Default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS if it is http(s)")


class SubmitError(Exception):
    """A problem the user fixes locally (address, token, config): exit code 2, message says what to do."""


# --- connection -------------------------------------------------------------------------------

def resolve_address(address: Optional[str]) -> str:
    if not address:
        address = os.environ.get("RAY_API_SERVER_ADDRESS")
        if not address and os.environ.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
            address = os.environ["RAY_ADDRESS"]
    if not address:
        raise SubmitError("--address is required: the Ray job API URL of the head, e.g. http://127.0.0.1:8265 "
                          "(or set RAY_API_SERVER_ADDRESS)")
    if "://" not in address:
        address = "http://" + address
    if not address.startswith(("http://", "https://")):
        raise SubmitError(f"--address {address!r}: use the http(s) URL of the Ray dashboard / job API "
                          "(port 8265 by default), not a ray:// client or GCS address")
    return address.rstrip("/")


def find_token() -> tuple[Optional[str], str]:
    """Ray auth token from the places Ray itself reads it: (token or None, where it came from)."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    for name, path in (("RAY_AUTH_TOKEN_PATH", os.environ.get("RAY_AUTH_TOKEN_PATH")),
                       ("~/.ray/auth_token", str(Path.home() / ".ray" / "auth_token"))):
        if path and Path(path).is_file():
            token = Path(path).read_text().strip()
            if token:
                return token, name
    return None, ""


TOKEN_HELP = ("set RAY_AUTH_TOKEN to the cluster's token (on the head: `ray get-auth-token`; on KubeRay: the "
              "auth Secret of the RayCluster), or RAY_AUTH_TOKEN_PATH to a file holding it, or write it to "
              "~/.ray/auth_token")


def _probe(address: str, headers: dict, timeout_s: float):
    import requests

    try:
        return requests.get(address + "/api/version", headers=headers, timeout=timeout_s)
    except requests.exceptions.RequestException as e:
        m = re.search(r"\[Errno -?\d+\] [^'\")]+|Name or service not known|timed out", str(e))
        reason = m.group(0).strip() if m else type(e).__name__
        port = urlparse(address).port or 8265
        raise SubmitError(
            f"cannot reach the Ray job API at {address} ({reason}). Is the head running with its dashboard "
            f"(ray start --head --dashboard-host=0.0.0.0; the head image needs ray[default], ray[data] alone "
            f"serves no job API), and is the port forwarded (kubectl port-forward svc/<cluster>-head-svc "
            f"{port}:8265)?") from None


def connect(address: Optional[str], *, timeout_s: float = 10.0):
    """JobSubmissionClient for `address`; handles token auth (401 → retry with the local token)."""
    address = resolve_address(address)
    headers: dict = {}
    r = _probe(address, headers, timeout_s)
    if r.status_code == 401:
        token, source = find_token()
        if token is None:
            raise SubmitError(f"the Ray cluster at {address} requires token authentication (HTTP 401) and no "
                              f"token was found here: {TOKEN_HELP}")
        headers = {"Authorization": f"Bearer {token}"}
        r = _probe(address, headers, timeout_s)
        if r.status_code in (401, 403):
            raise SubmitError(f"the Ray cluster at {address} rejected the token from {source} "
                              f"(HTTP {r.status_code}): {TOKEN_HELP}")
    elif r.status_code == 403:
        raise SubmitError(f"the Ray cluster at {address} rejected the request (HTTP 403): {TOKEN_HELP}")
    try:
        ok = r.status_code == 200 and "ray_version" in r.json()
    except ValueError:
        ok = False
    if not ok:
        raise SubmitError(f"{address} answered HTTP {r.status_code} but is not a Ray job API. Use the dashboard "
                          "port (8265 by default); a head with only ray[data] installed has no job API "
                          "(install ray[default] in the head image)")
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=headers or None)
    except Exception as e:  # the probe passed, so this is unexpected: still name the address
        raise SubmitError(f"cannot use the Ray job API at {address}: {type(e).__name__}: {e}") from None


# --- what gets shipped ------------------------------------------------------------------------

def package_root() -> Path:
    """The folder holding pipeline/, actors/, iwp/, jobs/ (repo root, or site-packages when installed)."""
    return Path(__file__).resolve().parents[1]


def _ignore(directory: str, names: list[str]) -> set[str]:
    out = set()
    for n in names:
        p = Path(directory) / n
        if n in ("__pycache__", ".pytest_cache") or n.endswith((".pyc", ".pyo", ".so.tmp")) or n.startswith("."):
            out.add(n)
        elif p.is_file() and p.stat().st_size > MAX_SHIPPED_FILE:
            out.add(n)
    return out


def stage_working_dir(cfg_yaml: str, dest: Path) -> Path:
    """Copy the framescribe packages (source only) and the config into `dest`; returns dest."""
    root = package_root()
    for pkg in PACKAGES:
        if not (root / pkg).is_dir():
            raise SubmitError(f"cannot find the {pkg}/ package next to {root / 'pipeline'}")
        shutil.copytree(root / pkg, dest / pkg, ignore=_ignore)
    (dest / SHIPPED_CONFIG).write_text(cfg_yaml)
    return dest


def _is_local_relative(value: Optional[str]) -> bool:
    return bool(value) and "://" not in value and not Path(value).is_absolute()


def check_for_cluster(cfg: RunConfig) -> None:
    """Paths are resolved on the cluster, in the job's working dir: relative local paths cannot work there."""
    for field in ("input", "output", "questions"):
        v = getattr(cfg, field)
        if _is_local_relative(v):
            raise ConfigError(f"{field}: {v!r} is a relative local path; the job runs on the cluster in its own "
                              "working directory. Use s3://... or an absolute path that exists on the cluster nodes")
    if _is_local_relative(cfg.model) and Path(cfg.model).exists():
        raise ConfigError(f"model: {cfg.model!r} is a relative local directory; use a hub id, s3://..., or an "
                          "absolute path that exists on the cluster nodes")


def check_incremental(cfg: RunConfig) -> None:
    """What an incremental run refuses (kept here so `submit --incremental` fails before uploading)."""
    if cfg.overwrite:
        raise ConfigError("overwrite: an incremental run never overwrites; remove `overwrite` from the config")
    if cfg.run_id:
        raise ConfigError("run_id: every incremental run gets its own run id; remove `run_id` from the config")


def config_yaml(cfg: RunConfig) -> str:
    """The validated config as the job will read it (`address` dropped: inside a job Ray connects itself)."""
    data = cfg.model_dump(mode="json", exclude_defaults=True, exclude={"address"})
    return yaml.safe_dump(data, sort_keys=False)


def local_env_vars(names: Optional[str]) -> dict[str, str]:
    if not names:
        return {}
    out = {}
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name not in os.environ:
            raise SubmitError(f"--env-from-local: {name} is not set in this shell")
        out[name] = os.environ[name]
    return out


def pip_spec(pip: Optional[str]) -> Optional[list[str]]:
    if not pip:
        return None
    if Path(pip).is_file():
        lines = [ln.strip() for ln in Path(pip).read_text().splitlines()]
        return [ln for ln in lines if ln and not ln.startswith("#")]
    return [p.strip() for p in pip.split(",") if p.strip()]


# --- waiting, logs, exit codes ----------------------------------------------------------------

def exit_code_for(info) -> int:
    """The job's outcome as framescribe's exit code (the entrypoint's own code when Ray reports it)."""
    status = str(getattr(info.status, "value", info.status))
    if status == "SUCCEEDED":
        return 0
    code = getattr(info, "driver_exit_code", None)
    return code if code not in (None, 0) else 1


def wait_for(client, job_id: str, *, poll_s: float = 2.0):
    while True:
        info = client.get_job_info(job_id)
        if str(getattr(info.status, "value", info.status)) in TERMINAL:
            return info
        time.sleep(poll_s)


def stream_logs(client, job_id: str) -> None:
    async def _tail():
        async for lines in client.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    asyncio.run(_tail())


def report_end(info, job_id: str, address: str) -> int:
    status = str(getattr(info.status, "value", info.status))
    code = exit_code_for(info)
    colour = "green" if code == 0 else "red"
    console.print(f"job {job_id}: [{colour}]{status}[/{colour}]"
                  + (f" (exit code {info.driver_exit_code})" if getattr(info, "driver_exit_code", None) is not None else "")
                  + (f": {escape(info.message.splitlines()[0])}" if code and info.message else ""))
    if code:
        console.print(f"logs: framescribe job logs {job_id} --address {address}")
    return code


# --- commands ---------------------------------------------------------------------------------

def _fail(e) -> None:
    console.print(f"[red]error:[/red] {escape(str(e))}")
    raise typer.Exit(EXIT_CONFIG)


def submit_job(client, cfg, address: str, *, incremental: bool, env_vars: dict, pip, submission_id: str | None,
               entrypoint_num_cpus: float | None) -> str:
    """Stage the packages + the validated config, submit `jobs.label` (or `jobs.incremental`), print the id."""
    runtime_env: dict = {}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    if pip:
        runtime_env["pip"] = pip
    with tempfile.TemporaryDirectory(prefix="framescribe-job-") as tmp:
        runtime_env["working_dir"] = str(stage_working_dir(config_yaml(cfg), Path(tmp)))
        entrypoint = f"python -m jobs.{'incremental' if incremental else 'label'} --config {SHIPPED_CONFIG}"
        try:
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id,
                                       entrypoint_num_cpus=entrypoint_num_cpus,
                                       metadata={"framescribe.labeling_hash": cfg.labeling_hash(),
                                                 "framescribe.output": cfg.output})
        except Exception as e:
            console.print(f"[red]error:[/red] job submission to {address} failed: {type(e).__name__}: "
                          f"{escape(str(e))}")
            raise typer.Exit(1)
    print(job_id)
    console.print(f"submitted job {job_id} to {address} (output {cfg.output})\n"
                  f"  status: framescribe job status {job_id} --address {address}\n"
                  f"  logs:   framescribe job logs {job_id} --address {address} --follow")
    return job_id


def follow_job(client, job_id: str, address: str, *, follow: bool) -> int:
    """Wait for the job (streaming its logs with `follow`) and return the exit code its end maps to."""
    try:
        if follow:
            stream_logs(client, job_id)
        info = wait_for(client, job_id)
    except KeyboardInterrupt:
        console.print(f"stopped waiting; the job keeps running (framescribe job stop {job_id} --address {address})")
        return 130
    return report_end(info, job_id, address)


def make_submit(config_params: Callable[[], list]) -> Callable:
    """The `submit` command; its config flags are `run`'s (from RunConfig), minus `--address`."""
    import inspect

    def submit(config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file, as for `framescribe run`"),
               address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
               wait: bool = typer.Option(False, "--wait", help="wait for the job to end; exit with its exit code"),
               follow: bool = typer.Option(False, "--follow-logs", help="stream the job's logs until it ends (implies --wait)"),
               env_from_local: Optional[str] = typer.Option(
                   None, "--env-from-local",
                   help="comma-separated names of environment variables to copy from this shell into the job, e.g. "
                        "AWS_ACCESS_KEY_ID,AWS_SECRET_ACCESS_KEY. Nothing is copied unless named here: normally the "
                        "cluster's own credentials (IAM role / IRSA / a Kubernetes Secret on the pods) are used. Values "
                        "passed this way are visible to anyone who can read the job's runtime_env on the cluster"),
               pip: Optional[str] = typer.Option(
                   None, "--pip", help="extra pip packages for the job (comma-separated, or a requirements file). "
                                       "Default: none; the cluster image is expected to have framescribe's dependencies"),
               submission_id: Optional[str] = typer.Option(None, "--submission-id", help="job id (default: Ray picks one)"),
               entrypoint_num_cpus: Optional[float] = typer.Option(None, help="CPUs reserved for the driver process"),
               incremental: bool = typer.Option(False, "--incremental",
                                                help="run `jobs.incremental` (new videos only, under the output's lease) "
                                                     "instead of `jobs.label`"),
               **values):
        """Submit a labeling run to a Ray cluster as a Ray job (config validated here first)."""
        try:
            cfg = load_config(config, relative_to_file=False, **values)  # paths are the cluster's
            check_for_cluster(cfg)
            if incremental:
                check_incremental(cfg)
            address_ = resolve_address(address)
            env_vars = local_env_vars(env_from_local)
            pip_ = pip_spec(pip)
        except (ConfigError, SubmitError) as e:
            _fail(e)
        try:
            client = connect(address_)
        except SubmitError as e:
            _fail(e)
        job_id = submit_job(client, cfg, address_, incremental=incremental, env_vars=env_vars, pip=pip_,
                            submission_id=submission_id, entrypoint_num_cpus=entrypoint_num_cpus)
        if not (wait or follow):
            raise typer.Exit(0)
        raise typer.Exit(follow_job(client, job_id, address_, follow=follow))

    params = inspect.signature(submit).parameters
    submit.__signature__ = inspect.Signature(
        [p for n, p in params.items() if n != "values"] + [p for p in config_params() if p.name != "address"])
    return submit


job_app = typer.Typer(no_args_is_help=True, help="Inspect and control submitted jobs (Ray Jobs API).")
AddressOpt = typer.Option(None, "--address", help=ADDRESS_HELP)


def _client(address: Optional[str]):
    try:
        return connect(address), resolve_address(address)
    except SubmitError as e:
        _fail(e)


@job_app.command("status")
def job_status(job_id: str = typer.Argument(...), address: Optional[str] = AddressOpt,
               wait: bool = typer.Option(False, "--wait", help="wait until the job ends; exit with its exit code")):
    """Status of a job (exit code 0; with --wait, the job's own exit code once it ends)."""
    client, address_ = _client(address)
    try:
        info = wait_for(client, job_id) if wait else client.get_job_info(job_id)
    except RuntimeError as e:
        _fail(f"job {job_id}: {e}")
    status = str(getattr(info.status, "value", info.status))
    print(status)
    for k in ("entrypoint", "message", "start_time", "end_time", "driver_exit_code"):
        v = getattr(info, k, None)
        if v is not None:
            if k.endswith("_time") and isinstance(v, (int, float)):  # epoch milliseconds
                v = datetime.fromtimestamp(v / 1000, timezone.utc).isoformat(timespec="seconds")
            console.print(f"  {k}: {escape(str(v))}")
    raise typer.Exit(exit_code_for(info) if wait else 0)


@job_app.command("logs")
def job_logs(job_id: str = typer.Argument(...), address: Optional[str] = AddressOpt,
             follow: bool = typer.Option(False, "--follow", "-f", help="stream until the job ends")):
    """Print a job's logs (driver stdout/stderr)."""
    client, _ = _client(address)
    try:
        if follow:
            stream_logs(client, job_id)
        else:
            sys.stdout.write(client.get_job_logs(job_id))
    except RuntimeError as e:
        _fail(f"job {job_id}: {e}")


@job_app.command("stop")
def job_stop(job_id: str = typer.Argument(...), address: Optional[str] = AddressOpt,
             wait: bool = typer.Option(False, "--wait", help="wait until it has stopped")):
    """Ask a running job to stop."""
    client, _ = _client(address)
    try:
        stopped = client.stop_job(job_id)
        info = wait_for(client, job_id, poll_s=1.0) if wait else client.get_job_info(job_id)
    except RuntimeError as e:
        _fail(f"job {job_id}: {e}")
    print(str(getattr(info.status, "value", info.status)))
    if not stopped:
        console.print(f"job {job_id} was not running")


@job_app.command("list")
def job_list(address: Optional[str] = AddressOpt):
    """Jobs on the cluster: id, status, entrypoint."""
    client, _ = _client(address)
    for j in sorted(client.list_jobs(), key=lambda j: j.start_time or 0):
        print(f"{j.submission_id or j.job_id}\t{getattr(j.status, 'value', j.status)}\t{j.entrypoint}")


def register(app: typer.Typer, config_params: Callable[[], list]) -> None:
    """Add `submit` and `job ...` to the framescribe CLI."""
    app.command("submit")(make_submit(config_params))
    app.add_typer(job_app, name="job")
