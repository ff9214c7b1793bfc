"""Ray job entrypoint for one labeling run:

    ray job submit --working-dir . -- python -m jobs.label --config run.yaml [--retention 0.5 ...]

Takes exactly `framescribe run`'s options (the same generated flags) and exits with its codes:
0 done, 1 failed, 2 bad config, 3 too many errors, 4 another run holds the output's lease
(`--wait-lease` waits for it instead; see pipeline/lease.py). Inside a Ray job, RAY_ADDRESS is set by Ray, so
the run joins the cluster the job was submitted to (leave `address` out of the config).
"""
from __future__ import annotations

import os
import sys

import typer

from pipeline.cli import run

app = typer.Typer(add_completion=False, help="Label videos as a Ray job (same options as `framescribe run`).")
app.command()(run)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")  # job logs are files: no progress bars
    app(args=argv, prog_name="python -m jobs.label")


if __name__ == "__main__":
    main(sys.argv[1:])
