"""The layout's rules, read from the imports: one direction (iwp ← actors ← pipeline ← jobs / bench), no
module importing another module's private (underscore) names, and a CLI that loads without the benchmarks."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RANK = {"iwp": 0, "actors": 1, "pipeline": 2, "jobs": 3, "bench": 3}
UPWARD_ALLOWED = {"pipeline/cli.py"}  # the one place that reaches up, lazily, inside the command that needs it


def _modules():
    for pkg in RANK:
        for path in sorted((REPO / pkg).rglob("*.py")):
            yield pkg, path


def _imports(tree):
    """(imported module, names, node, at module level?) for every import statement."""
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node, id(node) in top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [a.name for a in node.names], node, id(node) in top


def _violations():
    upward, private = [], []
    for pkg, path in _modules():
        rel = path.relative_to(REPO).as_posix()
        tree = ast.parse(path.read_text(), filename=rel)
        for module, names, node, at_top in _imports(tree):
            root = module.split(".")[0]
            if root in RANK and RANK[root] > RANK[pkg] or (root in RANK and RANK[root] == RANK[pkg] and root != pkg):
                if not (rel in UPWARD_ALLOWED and not at_top):
                    upward.append(f"{rel}:{node.lineno} imports {module}")
            if root in RANK:
                private += [f"{rel}:{node.lineno} imports {module}.{n}" for n in names
                            if n.startswith("_") and not n.startswith("__")]
    return upward, private


def test_imports_run_one_way():
    upward, _ = _violations()
    assert not upward, "imports must run iwp ← actors ← pipeline ← jobs/bench:\n" + "\n".join(upward)


def test_no_private_names_imported_across_modules():
    _, private = _violations()
    assert not private, "make shared helpers public instead:\n" + "\n".join(private)


def test_the_rules_catch_what_they_forbid(tmp_path, monkeypatch):
    """The checker itself fails on an upward and a private import (so the two tests above can fail)."""
    bad = REPO / "iwp" / "_layout_probe_tmp.py"
    bad.write_text("from pipeline.config import RunConfig\nfrom actors.generation import _secret\n")
    try:
        upward, private = _violations()
    finally:
        bad.unlink()
    assert any("_layout_probe_tmp" in v for v in upward) and any("_layout_probe_tmp" in v for v in private)


def test_cli_does_not_import_the_benchmarks():
    code = ("import sys, pipeline.cli; bad = sorted(m for m in sys.modules if m == 'bench' or m.startswith('bench.')); "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("name", ["speed", "pipeline", "quality"])
def test_bench_commands_load_on_demand(name):
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "bench", name, "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Usage" in r.stdout, r.stdout + r.stderr


def _definitions(name: str) -> list[str]:
    found = []
    for _, path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def _calls(name: str) -> list[str]:
    found = []
    for _, path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == name:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


@pytest.mark.parametrize("name", ["fastv_scores", "stop_and_pad_ids", "build_model", "qwen_config", "llava_config",
                                  "qwen_processor", "llava_processor", "build_tokenizer"])
def test_one_definition(name):
    """FastV scores, the EOS/pad set-up and each model-shape builder are written once (production and
    evaluation share them; bench.train_tiny.build_model is a thin wrapper over actors.model_shapes)."""
    defs = [d for d in _definitions(name) if not (name == "build_model" and d.startswith("bench/train_tiny.py"))]
    assert len(defs) == 1, defs


@pytest.mark.parametrize("cls", ["Qwen2_5_VLConfig", "LlavaOnevisionConfig", "Qwen2_5_VLProcessor",
                                 "LlavaOnevisionProcessor"])
def test_model_configs_built_in_one_place(cls):
    assert {c.split(":")[0] for c in _calls(cls)} == {"actors/model_shapes.py"}, _calls(cls)


def test_pruner_registry_is_the_one_config_validates_against():
    from iwp import baselines, registry
    from pipeline import config

    assert config.PRUNERS is registry.PRUNERS is baselines.PRUNERS


def test_preflight_imports_no_torch(tmp_path):
    """Preflight (model check, revision pin, listing) stays torch-free: a finished re-run must not pay its import."""
    videos = tmp_path / "videos"
    videos.mkdir()
    code = ("import sys; from pipeline.config import RunConfig; from pipeline.run import preflight; "
            f"preflight(RunConfig(input={str(videos)!r}, output={str(tmp_path / 'out')!r}, "
            "model='actors/assets/tiny-qwen2_5_vl-synthqa'), empty_ok=True); "
            "bad = sorted(m for m in sys.modules if m == 'torch' or m == 'ray'); print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
