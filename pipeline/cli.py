"""`framescribe` command line. `run`'s flags are generated from `RunConfig`, so flags, YAML and the
Python API can never drift apart."""
from __future__ import annotations

import enum
import inspect
import json
import os
import signal
import sys
import typing
from pathlib import Path
from typing import Literal, Optional

import typer
import typer.core
import typer.main
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipeline.config import ConfigError, RunConfig, load_config

HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(add_completion=False, no_args_is_help=True, context_settings=HELP_OPTIONS,
                  help="Label video corpora with vision-language models on Ray Data (IWP token pruning).")
console = Console(stderr=True, soft_wrap=True)  # error lines stay whole (greppable)

EXIT_CONFIG, EXIT_FAILED, EXIT_ERROR_RATIO, EXIT_INTERRUPTED = 2, 1, 3, 130
EXIT_LEASE_HELD = 4  # another run holds the output's lease (one writer per output; --wait-lease waits)


def _shutdown_ray() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:
        pass


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def field_choices(name: str) -> tuple[str, ...] | None:
    """The allowed values of a RunConfig field (a Literal, or `choices` in its schema extra), else None."""
    field = RunConfig.model_fields[name]
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    if "choices" in extra:
        return tuple(extra["choices"])
    annotation = field.annotation
    if typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return tuple(typing.get_args(annotation)) if typing.get_origin(annotation) is Literal else None


def field_default(name: str) -> str:
    """A RunConfig field's default as help shows it."""
    field = RunConfig.model_fields[name]
    if field.is_required():
        return "required"
    return "none" if field.default is None else str(field.default).lower() if isinstance(field.default, bool) \
        else str(field.default)


def options_table() -> str:
    """The README's options table, generated from RunConfig (tests/test_folder_safety.py checks the README
    holds exactly this; regenerate with `python -c "from pipeline.cli import options_table; print(options_table())"`)."""
    lines = ["| flag / YAML key | default | meaning |", "|---|---|---|"]
    for name, field in RunConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        choices = field_choices(name)
        meaning = (field.description or "").replace("|", "\\|")
        if choices:
            meaning += f"; one of {', '.join(f'`{c}`' for c in choices)}"
        lines.append(f"| `{flag}` | {field_default(name)} | {meaning} |")
    return "\n".join(lines)


def _flag_type(name: str, annotation):
    """CLI type for a pydantic field (Optional[X] → X; choices → an Enum so help lists them; pydantic validates)."""
    choices = field_choices(name)
    if choices:
        return enum.Enum(name, {c: c for c in choices}, type=str)
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def config_params() -> list[inspect.Parameter]:
    """One keyword-only CLI option per RunConfig field: its description, default and choices come from the
    field, so help cannot drift from the config (flags left out stay None: the YAML value or default applies)."""
    params = []
    for name, field in RunConfig.model_fields.items():
        ftype = _flag_type(name, field.annotation)
        flag = "--" + name.replace("_", "-")
        decls = [f"{flag}/--no-{name.replace('_', '-')}"] if ftype is bool else [flag]
        params.append(inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[ftype],
            default=typer.Option(None, *decls, help=field.description or "", show_default=field_default(name),
                                 case_sensitive=False)))
    return params


def _config_from_cli(config: Optional[Path], values: dict) -> RunConfig:
    return load_config(config, **values)


def print_summary(summary) -> None:
    t = Table(title="framescribe run", show_header=False)
    rows = [("videos", f"{summary.videos_total} ({summary.videos_skipped} already labeled, skipped)"),
            ("ok / error", f"{summary.videos_ok} / {summary.videos_error}"),
            ("rows written", str(summary.rows)),
            ("frames decoded", str(summary.frames_decoded)),
            ("visual tokens kept / full", f"{summary.visual_tokens_kept} / {summary.visual_tokens_full}"),
            ("videos/s", f"{summary.videos_per_s:.2f} ({summary.seconds:.1f} s)"),
            ("output", summary.output), ("run id", summary.run_id)]
    if getattr(summary, "log_file", ""):
        rows.append(("log file", summary.log_file))
    if summary.error_types:
        rows.insert(2, ("errors by type", ", ".join(f"{k}: {v}" for k, v in sorted(summary.error_types.items()))))
    if getattr(summary, "duplicates_removed", 0):
        rows.insert(-2, ("duplicates removed", f"{summary.duplicates_removed} (one row per video × prompt kept)"))
    if getattr(summary, "other_configs", None):
        rows.insert(-2, ("other labeling configs", f"{sum(summary.other_configs.values())} rows of "
                         f"{len(summary.other_configs)} other config(s) in this output; this run's labeling_hash "
                         f"is {summary.labeling_hash} (filter on it to read one config)"))
    if summary.rows == 0 and summary.videos_total and summary.videos_skipped == summary.videos_total:
        rows.insert(1, ("nothing to do", "every (video, prompt) is already labeled with this config; "
                                         "--retry-errors redoes error rows, --overwrite starts over"))
    for k, v in rows:
        t.add_row(k, v)
    Console().print(t)


def print_plan(cfg: RunConfig, plan) -> None:
    """`--dry-run`: what the run would do, and an estimate of how long it takes."""
    from pipeline.run import estimate

    est = estimate(cfg, plan)
    t = Table(title="framescribe plan (dry run: nothing labeled)", show_header=False)
    skipped = plan.n_videos - (plan.limited_from or len(plan.todo))
    rows = [("inputs found", f"{plan.n_videos} videos"),
            ("already labeled", f"{skipped} videos (this labeling config)"),
            ("to do", f"{len(plan.todo)} videos, {plan.rows_todo} rows (video x prompt)"
                      + (f" (--limit {cfg.limit} of {plan.limited_from})" if plan.limited_from else "")),
            ("output parts", f"{len(plan.index.live)} ({plan.index.keys.num_rows} rows)")]
    if est.decode_s_per_video is not None:
        rows.append(("decode sample", f"{est.sample} videos, {est.decode_s_per_video:.2f} s/video (one CPU)"))
    if est.previous_videos_per_s:
        rows.append(("previous run", f"{est.previous_videos_per_s:.2f} videos/s"))
    if est.eta_s is not None:
        basis = "previous run's rate" if est.previous_videos_per_s else "decode only, one CPU: a lower bound"
        rows.append(("estimate", f"{est.eta_s / 60:.1f} min ({basis})"))
    for k, v in rows:
        t.add_row(k, v)
    Console().print(t)


def execute(cfg: RunConfig) -> int:
    """Run and map outcomes to exit codes (0 done, 2 bad config, 3 too many errors, 4 output busy, 1 failed)."""
    from pipeline.lease import LeaseHeld, LeaseLost
    from pipeline.run import ErrorRatioExceeded, run_pipeline

    try:
        summary = run_pipeline(cfg, log=lambda line: console.print(escape(line)))
        if cfg.dry_run:
            print_plan(cfg, summary)
            return 0
    except (KeyboardInterrupt, SystemExit) as e:
        # Ctrl-C, or SIGTERM (ray.init turns it into SystemExit(15); before that the handler in main does)
        if isinstance(e, SystemExit) and e.code not in (signal.SIGTERM, signal.SIGINT):
            raise
        console.print("[red]interrupted:[/red] the run stopped; committed parts are kept and a re-run resumes "
                      "from them")
        _shutdown_ray()
        # exit now: after a signal, Ray's core worker can abort (SIGABRT) in the interpreter's teardown
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)
    except ConfigError as e:
        console.print(f"[red]error:[/red] {e}")
        return EXIT_CONFIG
    except LeaseHeld as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
        return EXIT_LEASE_HELD
    except LeaseLost as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
        return EXIT_FAILED
    except ErrorRatioExceeded as e:
        print_summary(e.summary)
        console.print(f"[red]error:[/red] {e}")
        return EXIT_ERROR_RATIO
    print_summary(summary)
    return 0


def run(config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file with any of the options below"),
        **values):
    """Label videos: discover → decode → model → Parquet. Flags override the --config file."""
    try:
        cfg = _config_from_cli(config, values)
    except ConfigError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(EXIT_CONFIG)
    raise typer.Exit(execute(cfg))


run.__signature__ = inspect.Signature(
    [inspect.signature(run).parameters["config"], *config_params()])
app.command("run")(run)


@app.command("tiny-model")
def tiny_model(out_dir: Path = typer.Argument(..., help="directory to write the model to (new or empty)"),
               arch: str = typer.Option("qwen2_5_vl", help="qwen2_5_vl | llava_onevision"),
               seed: int = typer.Option(0, help="seed of the random weights"),
               force: bool = typer.Option(False, "--force", help="write into a folder that is not empty")):
    """Write a random-weight tiny model of a real architecture (offline tokenizer + processor)."""
    from actors.tiny_model import ARCHS, make_tiny_model

    if arch not in ARCHS:
        console.print(f"[red]error:[/red] arch: unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
        raise typer.Exit(EXIT_CONFIG)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        console.print(f"[red]error:[/red] out_dir: {str(out_dir)!r} is not an empty folder; "
                      f"pass --force to write the model files into it")
        raise typer.Exit(EXIT_CONFIG)
    path = make_tiny_model(out_dir, arch, seed=seed)
    console.print(f"wrote {arch} tiny model to {path}")


@app.command()
def demo(workdir: Path = typer.Option(Path(".framescribe-cache/demo"), help="where videos, model and output go"),
         model: Optional[str] = typer.Option(None, help="model to use (default: the shipped tiny model trained on "
                                             "synthetic clips, else a random tiny offline model)"),
         pruner: str = typer.Option("iwp"), retention: float = typer.Option(0.25)):
    """Make a few short videos (and one broken file), make or reuse a tiny model, label them on local Ray."""
    from actors.tiny_model import make_tiny_model
    from pipeline.discover import VIDEO_EXTENSIONS
    from pipeline.sample_videos import make_demo_videos

    videos = workdir / "videos"
    for old in videos.glob("*"):  # a re-run shows this run's clips only; files the demo did not write stay
        if old.is_file() and (old.name == "broken.mp4" or old.name.startswith(("demo_", "test-"))):
            old.unlink()
    sampling = dict(max_new_tokens=12)
    references: dict[str, str] = {}
    shipped = None
    if model is None:
        from actors.assets import shipped_synthqa_model

        shipped = shipped_synthqa_model()
    if shipped is not None:
        # the shipped tiny model knows only the synthetic QA world: label test clips of that world, sampled
        # the way it was trained (16 frames of 112x112), and show the reference caption beside its own
        from bench.synthetic_qa import write_demo_clips

        model = str(shipped)
        references = write_demo_clips(videos, n=4)
        sampling = dict(num_frames=16, max_pixels=112 * 112, max_new_tokens=40)
    else:
        make_demo_videos(videos, n=4)
        if model is None:
            model_dir = workdir / "tiny-qwen2_5_vl"
            if not (model_dir / "config.json").is_file():
                make_tiny_model(model_dir, "qwen2_5_vl")
            model = str(model_dir)
    (videos / "broken.mp4").write_bytes(b"this is not a video")
    # a manifest carries each clip's reference caption into its rows (the report shows it beside the caption)
    manifest = workdir / "manifest.jsonl"
    clips = [p for p in sorted(videos.iterdir()) if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS]
    manifest.write_text("".join(json.dumps({"uri": f"videos/{p.name}", "reference": references.get(p.name)}) + "\n"
                                for p in clips))
    cfg = RunConfig(input=str(manifest), output=str(workdir / "labels"), model=model, pruner=pruner,
                    retention=retention, batch_size=4, overwrite=True, **sampling)
    code = execute(cfg)
    if code == 0:
        from pipeline.report import build_report

        _print_rows(cfg.output)
        console.print(f"Parquet dataset: {Path(cfg.output).resolve()}  "
                      f"(read it with pyarrow.dataset.dataset(PATH) or duckdb read_parquet('PATH/**/*.parquet'))")
        result = build_report(cfg.output, str(workdir / "report"))
        console.print(f"Report (open it in a browser; it needs no server or network): {result.index.as_uri()}")
    raise typer.Exit(code)


def _print_rows(output: str) -> None:
    from pipeline.output import read_rows

    rows = read_rows(output, columns=["uri", "status", "visual_tokens_kept", "visual_tokens_full", "text",
                                      "error_type", "reference"]).to_pylist()
    with_reference = any(r["reference"] for r in rows)
    t = Table(title="rows")
    for c in ("video", "status", "tokens", "text / error") + (("reference caption",) if with_reference else ()):
        t.add_column(c)
    for r in sorted(rows, key=lambda r: r["uri"]):
        tokens = f"{r['visual_tokens_kept']}/{r['visual_tokens_full']}" if r["status"] == "ok" else ""
        cells = [Path(r["uri"]).name, r["status"], tokens, (r["text"] or r["error_type"] or "")[:120]]
        t.add_row(*cells, *((r["reference"] or "",) if with_reference else ()))
    Console().print(t)


@app.command()
def report(output: str = typer.Argument(..., help="the run's output: a directory or s3:// prefix"),
           html: Optional[Path] = typer.Option(None, "--html", help="folder to write the report to [default: "
                                               "OUT/_framescribe/report for a local OUT, else ./framescribe-report]"),
           limit: int = typer.Option(100, help="videos to show as cards (the summary covers every row)"),
           status: Optional[str] = typer.Option(None, help="show only videos with rows of this status: ok | error"),
           error_type: Optional[str] = typer.Option(None, help="show only rows with this error type, e.g. corrupt"),
           s3_endpoint: Optional[str] = typer.Option(None, help="object storage endpoint (else AWS_ENDPOINT_URL)"),
           anon: bool = typer.Option(False, help="anonymous object storage access")):
    """Write a static HTML report of a run's output: summary, then per video its frames with the kept visual
    tokens shown (dropped ones dimmed), caption or answers, reference and error. Opens from disk, no network."""
    from pipeline.report import ReportError, build_report

    try:
        result = build_report(output, None if html is None else str(html), limit=limit, status=status,
                              error_type=error_type, s3_endpoint=s3_endpoint, anon=anon)
    except ReportError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(EXIT_CONFIG)
    console.print(f"{result.videos_shown} of {result.videos_total} videos, {result.bytes_total / 1e6:.1f} MB")
    print(result.index)


from pipeline.submit import register as _register_submit  # noqa: E402  (`submit`, `job status|logs|stop|list`)

_register_submit(app, config_params)

# `framescribe bench ...`: each benchmark lives in bench/<module>.py and exposes `command` (typer options).
# The modules are imported only when a bench command runs (or its help is shown): the CLI never needs them.
BENCHMARKS = {"speed": "bench.speed", "pipeline": "bench.throughput", "quality": "bench.quality",
              "scale": "bench.scale"}


class _LazyBenchGroup(typer.core.TyperGroup):
    def list_commands(self, ctx):
        return list(BENCHMARKS)

    def get_command(self, ctx, name):
        if name not in BENCHMARKS:
            return None
        import importlib

        single = typer.Typer(add_completion=False)
        single.command(name)(importlib.import_module(BENCHMARKS[name]).command)
        return typer.main.get_command(single)


bench_app = typer.Typer(cls=_LazyBenchGroup, add_completion=False, no_args_is_help=True,
                        help="Benchmarks: speed (prefill, pruning, decode, end to end), pipeline throughput, quality, scale.")
app.add_typer(bench_app, name="bench")


def _version(value: bool) -> None:
    if value:
        from pipeline import __version__

        print(f"framescribe {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                       help="print the version and exit")):
    """Label video corpora with vision-language models on Ray Data (IWP token pruning)."""


def main() -> None:
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "0")
    signal.signal(signal.SIGTERM, _raise_interrupt)  # SIGTERM stops a run like Ctrl-C, at any stage
    app()


if __name__ == "__main__":
    main()
