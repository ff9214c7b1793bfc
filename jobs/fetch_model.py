"""Fill the model cache once (the KubeRay head's init container; any machine before a run):

    python -m jobs.fetch_model --config run.yaml

A hub model is downloaded into HF_HOME at `model_revision` (a branch or tag is resolved to the commit
it points to now; the run's preflight resolves it to the same commit from this cache, offline). An
s3:// model prefix is copied into FRAMESCRIBE_CACHE, where the model actors look first. A local
directory needs nothing. Prints the path and revision; exit 2 when the config or the model is bad.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from pipeline.config import ConfigError, load_config
from pipeline.storage import storage_options

EXIT_CONFIG = 2


def fetch(config: Path = typer.Option(..., "--config", "-c", help="YAML file, as for `framescribe run`")):
    """Download the config's model (at its pinned revision) into the shared cache."""
    from actors.loading import ModelLoadError, fetch_model_dir, is_object_store, resolve_model

    try:
        cfg = load_config(config)
        if is_object_store(cfg.model):
            path, revision = fetch_model_dir(cfg.model, storage_options=storage_options(
                cfg.model, s3_endpoint=cfg.s3_endpoint, anon=cfg.anon)), cfg.model_revision
        elif Path(resolve_model(cfg.model)).exists():
            path, revision = Path(resolve_model(cfg.model)), cfg.model_revision
        else:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(cfg.model, revision=cfg.model_revision))
            revision = path.name  # snapshots/<commit>
    except (ConfigError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(EXIT_CONFIG)
    except Exception as e:
        print(f"error: model: cannot fetch {cfg.model!r} at revision {cfg.model_revision or 'main'!r}: "
              f"{type(e).__name__}: {e}", file=sys.stderr)
        raise typer.Exit(EXIT_CONFIG)
    print(f"model {cfg.model} revision {revision or '-'} at {path}")


def main(argv: Optional[list[str]] = None) -> None:
    app = typer.Typer(add_completion=False)
    app.command()(fetch)
    app(args=argv, prog_name="python -m jobs.fetch_model")


if __name__ == "__main__":
    main(sys.argv[1:])
