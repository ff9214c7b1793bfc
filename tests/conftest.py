"""Shared fixtures: tiny offline models of the real architectures, a video corpus, the real CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub here: everything loads from local dirs
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    from actors.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2_5_vl", "qwen2_5_vl")


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    from actors.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llava_onevision", "llava_onevision")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """(videos by case, broken files by name) written once per session."""
    from tests.conftest_videos import build_corpus

    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def mixed_dir(tmp_path_factory, corpus) -> Path:
    """A folder of good videos (several codecs) and broken files, as a user would point --input at."""
    import shutil

    videos, broken = corpus
    d = tmp_path_factory.mktemp("mixed")
    for name in ("h264", "vp9", "mpeg4_avi", "one_frame", "odd_98x62", "rotated90", "vfr", "unicode"):
        if name in videos:
            shutil.copy(videos[name].path, d / videos[name].path.name)
    for name, p in broken.items():  # an audio-only .m4a is stored as .mp4, as such files often are
        shutil.copy(p, d / f"broken_{name}{p.suffix if p.suffix != '.m4a' else '.mp4'}")
    return d


def run_cli(*args: str, timeout: float = 600, env: dict | None = None, cwd: Path | None = None,
            module: str = "pipeline.cli") -> subprocess.CompletedProcess:
    """The real `framescribe` entry point (or another `module`'s) in a subprocess, as a user runs it; `cwd`
    is the folder the user runs it from (the repository root by default)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    if cwd is not None:  # the package must import from anywhere, as an installed one does
        full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [full_env.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def ray_local():
    """One in-process local Ray for the tests that call the Python API (the CLI tests start their own)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
