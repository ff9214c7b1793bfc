"""`bench scale` measures what it says: its synthetic output is keyed as discovery keys videos, so resume
planning over it finds nothing to do, and the re-run of a finished job plans nothing and starts no Ray."""
import json

from bench import scale


def test_resume_over_the_synthetic_output_finds_nothing_to_do(tmp_path):
    uris = scale._uris(300, str(tmp_path / "corpus"))
    manifest = tmp_path / "manifest.txt"
    scale.write_manifest(manifest, uris)
    assert scale.write_output(str(tmp_path / "out"), uris, 100, s3_endpoint=None, manifest=manifest) == 3
    m = scale._measure("resume", {"input": str(manifest), "output": str(tmp_path / "out"), "s3": None})
    assert (m["videos"], m["parts"], m["rows_indexed"], m["todo"]) == (300, 3, 300, 0), json.dumps(m)


def test_finished_rerun_plans_nothing_and_starts_no_ray(tmp_path):
    row = scale.measure_finished_rerun(tmp_path, 40)
    assert row["nothing_to_do"] is True and row["ray_started"] is False, row
