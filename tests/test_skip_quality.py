"""bench.skip_quality: the QA benchmark with and without the vision skip, paired on the same questions."""
from __future__ import annotations

from bench.quality import default_model
from bench.skip_quality import parse_cases, skip_quality


def test_skip_quality_pairs_the_same_questions_and_reports_the_skipped_share():
    assert parse_cases("iwp@0.25, none") == [("iwp", 0.25), ("none", 1.0)]
    # threshold 0: only bit-identical groups are skipped (none in these clips); a huge one: all but the first
    rows = skip_quality(default_model(), 2, [("iwp", 0.25)], [0.0, 1e9], bootstrap=50, threads=1, log=lambda m: None)
    assert [(r["threshold"], r["score"]) for r in rows] == [
        (0.0, "accuracy"), (0.0, "loglik_accuracy"), (1e9, "accuracy"), (1e9, "loglik_accuracy")]
    exact, everything = rows[0], rows[2]
    assert exact["groups"] == everything["groups"] == 16  # 2 clips x 8 temporal groups
    assert exact["groups_skipped_share"] == 0.0 and exact["diff"] == 0.0 and exact["answer_changed"] == 0.0
    assert everything["groups_skipped_share"] == 1 - 2 / 16
    for r in rows:
        assert r["questions"] == rows[0]["questions"] > 0
        assert r["ci_lo"] <= r["diff"] <= r["ci_hi"]
        assert abs(r["skip"] - r["no_skip"] - r["diff"]) < 2e-4
