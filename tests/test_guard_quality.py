"""bench.guard_quality: the quality guard on vs off at equal mean kept tokens, τ chosen on validation."""
from __future__ import annotations

import numpy as np
import pytest

from bench.guard_quality import guard_quality, main, matched_retention, spec_for, val_thresholds
from bench.quality import default_model, encode_clips, load_qa
from iwp import budget_for


def test_matched_retention_budgets_the_rounded_mean():
    for n in (128, 196, 1000):
        for mean in (1.0, 13.0, 15.38, 22.5, 25.75, n - 0.2):
            r, k = matched_retention(mean, n)
            assert budget_for(n, r) == k and abs(k - mean) <= 0.5


def test_validation_reports_the_guards_reach():
    rows, info = val_thresholds(default_model(), 4, 0.1, None, 0.5, threads=1, log=lambda m: None)
    assert len(rows) == 3 and info["n_tokens"] == 128
    for r in rows:
        # the guard acts exactly on the videos whose residual at r0 is above τ
        assert abs(r["acted_share"] + r["quantile"] - 1) < 1e-9
        assert 13 <= r["kept_mean"] <= 64  # between ceil(0.1 N) and ceil(0.5 N)


def test_guard_on_vs_off_keeps_equal_mean_tokens_on_the_same_questions():
    from iwp import IWPSettings

    qa = load_qa(default_model(), threads=1)
    encoded, _ = encode_clips(qa, "test", 3, 0, 3, "mc")
    middle = float(np.median([qa.prune(v, spec_for(0.1, IWPSettings(seed=0), 0)).residual for v in encoded]))
    # τ 0: every video grows to max retention; τ huge: the guard never acts; the median: some videos
    rows = guard_quality(default_model(), 3, 0.1, [0.0, middle, 1e9], 0.5, bootstrap=50, threads=1,
                         log=lambda m: None)
    assert [(r["threshold"], r["score"]) for r in rows] == [
        (t, s) for t in (0.0, middle, 1e9) for s in ("accuracy", "loglik_accuracy")]
    for r in rows:
        assert r["questions"] == rows[0]["questions"] > 0
        assert abs(r["no_guard_kept"] - r["guard_kept_mean"]) <= 0.5 and r["kept_gap"] == pytest.approx(
            r["no_guard_kept"] - r["guard_kept_mean"], abs=1e-3)
        assert r["ci_lo"] <= r["diff"] <= r["ci_hi"]
        assert abs(r["guard"] - r["no_guard"] - r["diff"]) < 2e-4
    always, sometimes, never = rows[0], rows[2], rows[4]
    assert always["guard_acted_share"] == 1.0 and always["guard_kept_mean"] == always["no_guard_kept"] == 64
    assert never["guard_acted_share"] == 0.0 and never["guard_kept_mean"] == never["no_guard_kept"] == 13
    for same_budget in (always, never):  # equal budgets on every video: the same selection, the same answers
        assert same_budget["diff"] == 0.0 and same_budget["answer_changed"] == 0.0
    assert sometimes["guard_acted_share"] == pytest.approx(1 / 3, abs=1e-3)  # the one clip above the median
    assert 13 < sometimes["guard_kept_mean"] < 64


def test_test_split_needs_thresholds_chosen_on_validation(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--videos", "2", "--out", str(tmp_path)])
    assert e.value.code == 2
