"""`framescribe report`: the kept-token overlay, old outputs, and the page opened in headless Chromium."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from pipeline.report import build_report, draw_overlay, frame_groups, kept_mask, strip_image
from pipeline.sample_videos import make_moving_shapes, write_video
from tests.browser import MISSING, find_chromium, open_page
from tests.conftest import run_cli
from tests.conftest_s3 import moto_server, s3  # noqa: F401  (pytest fixtures)

GREY = 200  # a uniform clip: a kept token's pixels stay GREY, a dropped one's go dark


def test_frame_groups_follow_the_token_grid():
    assert frame_groups(8, 4) == [0, 0, 1, 1, 2, 2, 3, 3]     # Qwen2.5-VL: 2 frames per temporal group
    assert frame_groups(7, 4) == [0, 0, 1, 1, 2, 2, 3]        # an odd count: the processor pads the last group
    assert frame_groups(5, 5) == [0, 1, 2, 3, 4]              # LLaVA-OneVision: one group per frame


def test_overlay_dims_exactly_the_dropped_tokens():
    frame = np.full((60, 90, 3), GREY, np.uint8)
    grid = [2, 2, 3]
    kept = [0, 4, 6, 11]                                      # group 0: (0,0) (1,1); group 1: (0,0) (1,2)
    mask = kept_mask(kept, grid)
    assert mask.sum() == 4 and mask[0, 1, 1] and mask[1, 1, 2] and not mask[0, 0, 1]
    for g in range(2):
        out = draw_overlay(frame, mask[g])
        for i in range(2):
            for j in range(3):
                cell = out[i * 30:(i + 1) * 30, j * 30:(j + 1) * 30]
                expected = GREY if mask[g, i, j] else round(GREY * 0.22)
                assert (cell == expected).all(), (g, i, j)
    strip = strip_image(np.stack([frame] * 4), kept, grid, max_side=90, gap=2, group_gap=8)
    assert strip.shape == (60, 4 * 90 + 2 + 8 + 2, 3)        # frames 0,1 | group gap | frames 2,3


def _uniform_clip(path: Path, n: int = 8, size: int = 224) -> Path:
    return write_video(path, np.full((n, size, size, 3), GREY, np.uint8), fps=8, codec="h264")


def test_old_outputs_without_the_new_columns_load_and_render(tmp_path):
    """Parts written before kept_token_indices / token_grid / reference existed read back with nulls, and the
    report still shows their frames (without an overlay)."""
    import pyarrow.parquet as pq

    from pipeline.output import OUTPUT_SCHEMA, conform, read_rows

    clip = _uniform_clip(tmp_path / "old.mp4", n=4)
    new = {"kept_token_indices", "token_grid", "reference"}
    row = {"video_id": "v1", "uri": str(clip), "prompt_id": "p1", "prompt": "Describe.", "text": "grey",
           "status": "ok", "frames_sampled": 4, "frame_timestamps": [0.0, 0.1, 0.2, 0.3], "width": 224,
           "height": 224, "visual_tokens_full": 128, "visual_tokens_kept": 32, "labeling_hash": "h", "run_id": "r"}
    old = conform(pa.Table.from_pylist([row])).select([f.name for f in OUTPUT_SCHEMA if f.name not in new])
    out = tmp_path / "labels"
    out.mkdir()
    pq.write_table(old, out / "part-old.parquet")
    back = read_rows(str(out)).to_pylist()
    assert len(back) == 1 and back[0]["text"] == "grey"
    assert back[0]["kept_token_indices"] is None and back[0]["token_grid"] is None and back[0]["reference"] is None
    result = build_report(str(out), str(tmp_path / "report"))
    page = result.index.read_text()
    assert result.videos_shown == 1 and "no kept-token record" in page
    from PIL import Image

    strip = np.asarray(Image.open(tmp_path / "report" / "frames" / "v1-0.jpg"))
    assert strip.shape[1] == 4 * 112 + 3 * 2 and abs(float(strip.mean()) - GREY) < 3  # nothing dimmed


# ---------------------------------------------------------------------------------------------------
# a small run (good and broken videos, two pruners) → report → headless Chromium
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def labeled_run(tmp_path_factory, tiny_qwen, ray_local):
    """One output holding two runs over the same videos, pruned by iwp and by random."""
    from pipeline.config import RunConfig
    from pipeline.run import run_pipeline

    root = tmp_path_factory.mktemp("report-run")
    videos = root / "videos"
    videos.mkdir()
    _uniform_clip(videos / "uniform.mp4")
    write_video(videos / "shapes.mp4", make_moving_shapes(8, 96, 128, seed=3), fps=8)
    (videos / "broken.mp4").write_bytes(b"this is not a video")
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in [
        {"uri": "videos/uniform.mp4", "reference": "a flat grey frame"},
        {"uri": "videos/shapes.mp4", "reference": "a square crosses the frame"},
        {"uri": "videos/broken.mp4"}]))
    out = root / "labels"
    for pruner in ("iwp", "random"):
        run_pipeline(RunConfig(input=str(manifest), output=str(out), model=str(tiny_qwen), pruner=pruner,
                               retention=0.25, num_frames=8, max_new_tokens=4, batch_size=4))
    return out


@pytest.mark.slow
def test_rows_record_kept_tokens_grid_and_reference(labeled_run):
    rows = pads.dataset(str(labeled_run), format="parquet").to_table().to_pylist()
    assert len(rows) == 6                                     # 3 videos × 1 prompt × 2 pruners
    for r in rows:
        name = Path(r["uri"]).name
        if name == "broken.mp4":
            assert r["status"] == "error" and r["kept_token_indices"] is None and r["reference"] is None
            continue
        assert r["status"] == "ok", r["error_message"]
        g, h, w = r["token_grid"]
        assert g == math.ceil(8 / 2) and g * h * w == r["visual_tokens_full"]
        kept = r["kept_token_indices"]
        assert len(kept) == r["visual_tokens_kept"] == math.ceil(0.25 * r["visual_tokens_full"])
        assert kept == sorted(set(kept)) and 0 <= kept[0] and kept[-1] < r["visual_tokens_full"]
        assert r["reference"] == {"uniform.mp4": "a flat grey frame", "shapes.mp4": "a square crosses the frame"}[name]
    iwp, rnd = ({Path(r["uri"]).name: r["kept_token_indices"] for r in rows if r["pruner"] == p} for p in ("iwp", "random"))
    assert iwp["shapes.mp4"] != rnd["shapes.mp4"]            # the two pruners kept different tokens


def _frame_spans(strip: np.ndarray) -> list[tuple[int, int]]:
    """[x0, x1) of each thumbnail in a screenshot of a strip: the columns between the white gaps (a gap column
    averages ~254 even after JPEG; a frame column of the uniform clip at most ~GREY)."""
    content = strip.mean(axis=(0, 2)) < 240
    spans, start = [], None
    for x, c in enumerate([*content, False]):
        if c and start is None:
            start = x
        elif not c and start is not None:
            spans.append((start, x))
            start = None
    return spans


@pytest.mark.slow
def test_report_opens_in_headless_chromium_and_shows_the_kept_tokens(labeled_run, tmp_path):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip(MISSING)
    html_dir = tmp_path / "report"
    res = run_cli("report", str(labeled_run), "--html", str(html_dir))
    assert res.returncode == 0, res.stderr[-3000:]
    index = Path(res.stdout.strip().splitlines()[-1])
    assert index == (html_dir / "index.html").resolve() and index.is_file()
    size = sum(p.stat().st_size for p in html_dir.rglob("*") if p.is_file())
    assert size < 3 * 100_000                                 # under 100 kB a video: 100 videos < 10 MB

    rows = pads.dataset(str(labeled_run), format="parquet").to_table().to_pylist()
    uniform = {r["pruner"]: r for r in rows if Path(r["uri"]).name == "uniform.mp4"}

    async def script(page):
        await page.wait_for("Array.from(document.images).every(i => i.complete)")
        found = await page.evaluate("""(() => {
          const cards = Array.from(document.querySelectorAll('.card'));
          return {cards: cards.length, visible: cards.filter(c => !c.hidden).length,
                  broken_images: Array.from(document.images).filter(i => !i.naturalWidth).map(i => i.src),
                  names: cards.map(c => c.querySelector('h2').textContent),
                  texts: cards.map(c => c.textContent), summary: document.getElementById('summary').textContent};
        })()""")
        shots = {}
        for pruner in ("iwp", "random"):
            rect = await page.evaluate(f"""(() => {{
              const img = document.querySelector('.card[data-video-id="{uniform[pruner]["video_id"]}"] img[data-pruner="{pruner}"]');
              img.scrollIntoView(); const r = img.getBoundingClientRect();
              return {{x: r.left + window.scrollX, y: r.top + window.scrollY, width: r.width, height: r.height}};
            }})()""")
            shots[pruner] = await page.screenshot(rect)
        # a person filters to the errors: only the broken file's card stays
        visible_errors = await page.evaluate("""(() => {
          const s = document.getElementById('f-status'); s.value = 'error'; s.dispatchEvent(new Event('change'));
          return Array.from(document.querySelectorAll('.card')).filter(c => !c.hidden).map(c => c.dataset.status);
        })()""")
        return found, shots, visible_errors, page.console_errors, page.requests

    found, shots, visible_errors, console_errors, requests = open_page(index.as_uri(), script, chromium=chromium)
    assert console_errors == []
    assert requests and all(u.startswith("file://") for u in requests), requests  # no network
    assert found["cards"] == found["visible"] == 3 and found["broken_images"] == []
    assert [n.split()[0] for n in found["names"]] == ["broken.mp4", "shapes.mp4", "uniform.mp4"]
    assert "not_a_video" in found["texts"][0]
    assert "a flat grey frame" in found["texts"][2] and uniform["iwp"]["text"] in found["texts"][2]
    assert "videos3" in found["summary"].replace(" ", "") and "not_a_video" in found["summary"]
    assert visible_errors == ["error"]

    from PIL import Image

    for pruner, png in shots.items():
        row = uniform[pruner]
        g, h, w = row["token_grid"]
        mask = np.zeros(g * h * w, bool)
        mask[row["kept_token_indices"]] = True
        mask = mask.reshape(g, h, w)
        strip = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
        spans = _frame_spans(strip)
        assert len(spans) == 8 and all(x1 - x0 == 112 for x0, x1 in spans), spans  # 224 px frames at half size
        for f, (x0, x1) in enumerate(spans):
            seen = np.zeros((h, w), bool)
            for i in range(h):
                for j in range(w):
                    y, x = int((i + 0.5) * strip.shape[0] / h), x0 + int((j + 0.5) * (x1 - x0) / w)
                    seen[i, j] = strip[y, x].mean() > GREY / 2
            assert (seen == mask[f // 2]).all(), (pruner, f)  # Qwen2.5-VL: frames 2k, 2k+1 share group k


@pytest.mark.slow
def test_report_of_an_s3_output(labeled_run, s3, tmp_path):
    """OUT and the videos in a bucket: rows, run summaries and frames are all read from object storage."""
    from PIL import Image

    from pipeline.output import write_part

    b = s3.new_bucket()
    rows = pads.dataset(str(labeled_run), format="parquet").to_table()
    uris = {}
    for uri in set(rows["uri"].to_pylist()):
        uris[uri] = s3.upload(Path(uri), b, f"videos/{Path(uri).name}") if Path(uri).is_file() else f"s3://{b}/videos/gone.mp4"
    moved = rows.set_column(rows.schema.get_field_index("uri"), "uri", pa.array([uris[u] for u in rows["uri"].to_pylist()]))
    write_part(moved, f"s3://{b}/labels")
    for state in (labeled_run / "_framescribe").glob("run-*.json"):
        s3.upload(state, b, f"labels/_framescribe/{state.name}")
    # the CLI in a subprocess (it inherits the s3 fixture's AWS environment, as a user's shell would pass it)
    res = run_cli("report", f"s3://{b}/labels", "--html", str(tmp_path / "report"), "--status", "ok")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 of 3 videos" in res.stderr                      # --status ok: the broken file's card is left out
    html = (tmp_path / "report" / "index.html").read_text()
    assert html.count('<article class="card"') == 2 and f"s3://{b}/videos/uniform.mp4" in html
    strips = sorted((tmp_path / "report" / "frames").glob("*.jpg"))
    assert len(strips) == 4, html                             # 2 videos × 2 pruners
    assert all(Image.open(p).size[0] > 8 * 64 for p in strips)
