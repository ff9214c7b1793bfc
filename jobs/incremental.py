"""Scheduled (incremental) labeling: label only the videos that have no row yet for this config.

    python -m jobs.incremental --config run.yaml [--lease-ttl 600] [--wait-lease [--wait-timeout S]] [run flags...]

Run it on a schedule (RayCronJob, CronJob, cron + `ray job submit`). Each run:
1. validates the config (exit 2 when it is bad);
2. takes the lease OUT/_framescribe/lease.json (see pipeline/lease.py), as every run does. When another
   run (full or incremental) holds it, this run prints "another run holds the output's lease: ..." and
   exits 0 (unlike `framescribe run`, which exits 4), or waits with --wait-lease;
3. runs the normal pipeline: its resume (by labeling hash) skips every (video, prompt) already
   committed, so only new videos are decoded and labeled. Error rows count as done (a broken file
   is not retried every hour); set `retry_errors: true` to retry them;
4. records the outcome (still under the lease) in OUT/_framescribe/incremental-state.json (last run + recent history:
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

from pipeline.lease import LeaseHeld, LeaseLost
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
                **values):
    """Label only the videos with no row yet for this labeling config; safe when runs overlap (lease)."""
    from pipeline.run import output_lease

    try:
        cfg = load_config(config, **values)
        check_incremental(cfg)
    except ConfigError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(EXIT_CONFIG)
    try:
        with output_lease(cfg, log=lambda line: console.print(escape(line))) as lease:
            code, record = run_under_lease(cfg, lease)
    except LeaseHeld as e:  # a scheduled tick while another run writes: not a failure, nothing to do
        console.print(escape(str(e)) + "; nothing to do, exiting 0")
        raise typer.Exit(0)
    except LeaseLost as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(EXIT_FAILED)
    except OSError as e:
        console.print(f"[red]error:[/red] output: cannot use {cfg.output!r} for the lease: {type(e).__name__}: "
                      f"{escape(str(e))}")
        raise typer.Exit(EXIT_CONFIG)
    console.print(f"incremental: {record.get('new', 0)} new, {record.get('skipped', 0)} already labeled, "
                  f"{record.get('errors', 0)} errors → {cfg.output}/{STATE_DIR}/{STATE_FILE}")
    raise typer.Exit(code)


def run_under_lease(cfg: RunConfig, lease) -> tuple[int, dict]:
    """Run the pipeline while holding the output's lease and record the run in the state file (still under
    the lease). Returns (exit code, the run's record); a lost lease or SIGTERM propagates, unrecorded."""
    from pipeline.run import ErrorRatioExceeded, run_pipeline

    started, t0 = _now_iso(), time.perf_counter()
    record = {"started_at": started, "labeling_hash": cfg.labeling_hash(), "owner": lease.owner}
    code, summary = 0, None
    try:
        summary = run_pipeline(cfg, lease=lease, empty_ok=True)  # no videos yet is nothing to do, not an error
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
    if summary is not None:
        print_summary(summary)
        record.update(run_id=summary.run_id, labeling_hash=summary.labeling_hash, videos_total=summary.videos_total,
                      new=summary.videos_ok + summary.videos_error, skipped=summary.videos_skipped,
                      ok=summary.videos_ok, errors=summary.videos_error, rows=summary.rows)
    record.setdefault("status", "ok")
    record.update(finished_at=_now_iso(), seconds=round(time.perf_counter() - t0, 3), exit_code=code)
    write_state(cfg, record)
    return code, record


incremental.__signature__ = inspect.Signature(
    [p for n, p in inspect.signature(incremental).parameters.items() if n != "values"] + config_params())

app = typer.Typer(add_completion=False, context_settings={"help_option_names": ["-h", "--help"]})
app.command()(incremental)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    app(args=argv, prog_name="python -m jobs.incremental")


if __name__ == "__main__":
    main(sys.argv[1:])
