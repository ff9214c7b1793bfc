"""bench.pcmmr_form: both selections run in both forms and report whether their picks agree."""
import pytest

from bench import pcmmr_form


@pytest.mark.parametrize("selection", ["pcmmr", "cover"])
def test_selection_forms_agree_on_small_random_videos(selection):
    rows = pcmmr_form.run("cpu", batches=(1, 2), repeats=1, groups=3, per_group=16, heads=2, head_dim=8,
                          selection=selection, log=lambda _: None)
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["selection"] == selection and r["tokens"] == 48 and r["picks"] == 12
        assert r["same_picks"] == 1.0 and r["elementwise_ms"] > 0 and r["matrix_ms"] > 0
