"""Scheduled (incremental) labeling: label only the videos that have no row yet for this config.

    python -m jobs.incremental --config run.yaml [--lease-ttl 600] [--wait-lease] [run flags...]

Run it on a schedule (RayCronJob, CronJob, cron + `ray job submit`). Each run:
1. validates the config (exit 2 when it is bad);
2. takes the lease OUT/_framescribe/lease.json (see pipeline/lease.py). When another run holds it, this
   run prints "another run holds the lease until ..." and exits 0, or waits with --wait-lease;
3. runs the normal pipeline: its resume (by labeling hash) skips every (video, prompt) already
   committed, so only new videos are decoded and labeled. Error rows count as done (a broken file
   is not retried every hour); set `retry_errors: true` to retry them;
4. records the outcome in OUT/_framescribe/incremental-state.json (last run + recent history:
   new / skipped / errors) and releases the lease.
Exit codes are `framescribe run`'s: 0 done (or lease held elsewhere), 1 failed, 2 bad config, 3 too many errors.
"""
from __future__ import annotations

import inspect
import json
import os
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from pipeline.lease import Heartbeat, Lease
from pipeline.cli import EXIT_CONFIG, EXIT_ERROR_RATIO, EXIT_FAILED, config_params, console, print_summary
from pipeline.config import ConfigError, RunConfig, load_config
from pipeline.output import STATE_DIR
from pipeline.storage import get_fs, join
from pipeline.submit import check_incremental

STATE_FILE = "incremental-state.json"
HISTORY = 50  # runs kept in the state file


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_state(cfg: RunConfig) -> dict:
    fs, root = get_fs(cfg.output, s3_endpoint=cfg.s3_endpoint, anon=cfg.anon)
    try:
        return json.loads(fs.cat_file(join(root, STATE_DIR, STATE_FILE)))
    except (FileNotFoundError, ValueError):
        return {}


def write_state(cfg: RunConfig, record: dict) -> dict:
    """Add this run to OUT/_framescribe/incremental-state.json (written only while holding the lease)."""
    fs, root = get_fs(cfg.output, s3_endpoint=cfg.s3_endpoint, anon=cfg.anon)
    state = read_state(cfg)
    runs = [*state.get("runs", []), record][-HISTORY:]
    state = {"input": cfg.input, "output": cfg.output, "labeling_hash": record["labeling_hash"],
             "last_run": record, "runs": runs,
             "totals": {"runs": state.get("totals", {}).get("runs", 0) + 1,
                        "new": state.get("totals", {}).get("new", 0) + record.get("new", 0)}}
    fs.makedirs(join(root, STATE_DIR), exist_ok=True)
    fs.pipe_file(join(root, STATE_DIR, STATE_FILE), json.dumps(state, indent=2, default=str).encode())
    return state


def incremental(config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file, as for `framescribe run`"),
                lease_ttl: float = typer.Option(600.0, "--lease-ttl", min=1,
                                                help="seconds a lease lasts without renewal (renewed every ttl/3 while running); "
                                                     "after a crash the next run waits at most this long"),
                wait_lease: bool = typer.Option(False, "--wait-lease", help="wait for a held lease instead of exiting 0"),
                wait_timeout: Optional[float] = typer.Option(None, "--wait-timeout",
                                                             help="with --wait-lease: give up (exit 0) after this many seconds"),
                **values):
    """Label only the videos with no row yet for this labeling config; safe when runs overlap (lease)."""
    try:
        cfg = load_config(config, **values)
        check_incremental(cfg)
        lease = Lease(cfg.output, ttl_s=lease_ttl, s3_endpoint=cfg.s3_endpoint, anon=cfg.anon)
    except ConfigError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(EXIT_CONFIG)
    except Exception as e:
        console.print(f"[red]error:[/red] output: cannot use {cfg.output!r} for the lease: {type(e).__name__}: "
                      f"{escape(str(e))}")
        raise typer.Exit(EXIT_CONFIG)

    if not take_lease(lease, wait=wait_lease, wait_timeout=wait_timeout, ttl_s=lease_ttl):
        raise typer.Exit(0)
    code, record = run_under_lease(cfg, lease)
    console.print(f"incremental: {record.get('new', 0)} new, {record.get('skipped', 0)} already labeled, "
                  f"{record.get('errors', 0)} errors → {cfg.output}/{STATE_DIR}/{STATE_FILE}")
    raise typer.Exit(code)


def take_lease(lease: Lease, *, wait: bool, wait_timeout: float | None, ttl_s: float) -> bool:
    """Acquire the output's lease; False (nothing to do) when another run holds it and we do not wait."""
    deadline = None if wait_timeout is None else time.monotonic() + wait_timeout
    while not lease.acquire():
        h = lease.holder
        msg = f"another run holds the lease until {h.expires_iso} (owner {h.owner}, {lease.path})"
        remaining = None if deadline is None else deadline - time.monotonic()
        if not wait or (remaining is not None and remaining <= 0):
            console.print(escape(msg) + "; nothing to do, exiting")
            return False
        console.print(escape(msg) + "; waiting")
        pause = max(1.0, min(30.0, ttl_s / 10, h.expires_at - time.time() + 0.5))
        time.sleep(pause if remaining is None else max(0.0, min(pause, remaining)))
    console.print(f"lease taken: {lease.owner} until {lease.holder.expires_iso}")
    return True


def run_under_lease(cfg: RunConfig, lease: Lease) -> tuple[int, dict]:
    """Run the pipeline while a heartbeat renews the lease; record the run in the state file, release the
    lease on every exit path. Returns (exit code, the run's record)."""
    from pipeline.run import ErrorRatioExceeded, run_pipeline

    heartbeat = Heartbeat(lease, on_lost=lambda: console.print(
        "[yellow]warning:[/yellow] the lease expired and another run took it over; finishing anyway "
        "(parts are committed atomically; at worst some rows are written twice)"))
    heartbeat.start()
    started, t0 = _now_iso(), time.perf_counter()
    record = {"started_at": started, "labeling_hash": cfg.labeling_hash(), "owner": lease.owner}
    code, summary = 0, None
    try:
        summary = run_pipeline(cfg)
    except ConfigError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
        code, record["status"], record["error"] = EXIT_CONFIG, "config_error", str(e)
    except ErrorRatioExceeded as e:
        summary = e.summary
        console.print(f"[red]error:[/red] {escape(str(e))}")
        code, record["status"] = EXIT_ERROR_RATIO, "error_ratio_exceeded"
    except Exception as e:
        traceback.print_exc()
        code, record["status"], record["error"] = EXIT_FAILED, "failed", f"{type(e).__name__}: {e}"
    finally:
        heartbeat.stop()
        if summary is not None:
            print_summary(summary)
            record.update(run_id=summary.run_id, videos_total=summary.videos_total,
                          new=summary.videos_ok + summary.videos_error, skipped=summary.videos_skipped,
                          ok=summary.videos_ok, errors=summary.videos_error, rows=summary.rows)
        record.setdefault("status", "ok")
        record.update(finished_at=_now_iso(), seconds=round(time.perf_counter() - t0, 3), exit_code=code,
                      lease_lost=heartbeat.lost)
        try:
            write_state(cfg, record)
        finally:
            lease.release()
    return code, record


incremental.__signature__ = inspect.Signature(
    [p for n, p in inspect.signature(incremental).parameters.items() if n != "values"] + config_params())

app = typer.Typer(add_completion=False)
app.command()(incremental)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    app(args=argv, prog_name="python -m jobs.incremental")


if __name__ == "__main__":
    main(sys.argv[1:])
