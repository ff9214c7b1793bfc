"""`framescribe report`: a static HTML report of a run's output (one folder, opens from disk, no network).

The summary covers every row; the cards (one per video) cover the first `limit` videos that pass the
filters. Each card shows the video's sampled frames, decoded again from the source with the run's
sampling, with the visual tokens the pruner dropped dimmed (the token grid mapped back to pixels).
"""
from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.decode import DecodeError, SamplingSpec, decode_video, shutdown_decode_pool
from pipeline.output import STATE_DIR, read_rows
from pipeline.storage import get_fs, is_remote, join

DIM = 0.22               # brightness kept by a dropped token's pixels
THUMB_MAX_SIDE = 112     # thumbnails: longest side in pixels (a 100-video report stays well under 10 MB)
JPEG_QUALITY = 80
PAGE_SIZE = 20           # cards per page in the browser
STAGES = ("decode_ms", "vision_ms", "prune_ms", "prefill_ms", "generate_ms")
SUMMARY_COLUMNS = ["video_id", "uri", "status", "error_type", "visual_tokens_full", "visual_tokens_kept",
                   "retention_used", "iwp_residual", "run_id", *STAGES]


class ReportError(Exception):
    """Nothing to report (no rows, bad filter): the CLI exits 2 with this message."""


@dataclass
class ReportResult:
    index: Path             # the page to open
    videos_total: int       # videos in the output
    videos_shown: int       # cards in the page
    bytes_total: int        # size of the report folder


# ---------------------------------------------------------------------------------------------------
# the kept-token overlay
# ---------------------------------------------------------------------------------------------------

def frame_groups(n_frames: int, n_groups: int) -> list[int]:
    """Temporal token group of each sampled frame (Qwen2.5-VL: 2 frames per group; LLaVA-OneVision: 1)."""
    per_group = max(1, math.ceil(n_frames / max(1, n_groups)))
    return [min(n_groups - 1, f // per_group) for f in range(n_frames)]


def kept_mask(kept: list[int], grid: list[int]) -> np.ndarray:
    """(groups, rows, cols) bool: which visual tokens the LLM saw."""
    g, r, c = (int(x) for x in grid)
    mask = np.zeros(g * r * c, dtype=bool)
    mask[np.asarray(kept, dtype=np.int64)] = True
    return mask.reshape(g, r, c)


def cell_bounds(n: int, size: int) -> list[tuple[int, int]]:
    """Pixel [start, end) of each of `n` equal cells along a side of `size` pixels (the processor's resize
    stretches the whole frame onto the token grid, so a token covers the same fraction of the frame)."""
    edges = [round(i * size / n) for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


def draw_overlay(frame: np.ndarray, group_mask: np.ndarray) -> np.ndarray:
    """A copy of `frame` (H, W, 3) with the pixels of dropped tokens dimmed."""
    out = frame.astype(np.float32)
    rows, cols = group_mask.shape
    ys, xs = cell_bounds(rows, frame.shape[0]), cell_bounds(cols, frame.shape[1])
    for i, (y0, y1) in enumerate(ys):
        for j, (x0, x1) in enumerate(xs):
            if not group_mask[i, j]:
                out[y0:y1, x0:x1] *= DIM
    return out.round().astype(np.uint8)


def thumbnail(frame: np.ndarray, max_side: int) -> np.ndarray:
    from PIL import Image

    h, w = frame.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale == 1.0:
        return frame
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(frame).resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0))


def strip_image(frames: np.ndarray, kept: list[int] | None, grid: list[int] | None, *,
                max_side: int = THUMB_MAX_SIDE, gap: int = 2, group_gap: int = 8) -> np.ndarray:
    """The sampled frames side by side as thumbnails; with a kept-token record, dropped tokens dimmed and a
    wider gap between temporal token groups."""
    thumbs = [thumbnail(f, max_side) for f in frames]
    groups = [0] * len(thumbs)
    if kept is not None and grid is not None:
        mask = kept_mask(kept, grid)
        groups = frame_groups(len(thumbs), mask.shape[0])
        thumbs = [draw_overlay(t, mask[g]) for t, g in zip(thumbs, groups)]
    gaps = [0] + [group_gap if b != a else gap for a, b in zip(groups, groups[1:])]
    h = max(t.shape[0] for t in thumbs)
    w = sum(t.shape[1] for t in thumbs) + sum(gaps)
    strip = np.full((h, w, 3), 255, dtype=np.uint8)
    x = 0
    for t, g in zip(thumbs, gaps):
        x += g
        strip[: t.shape[0], x: x + t.shape[1]] = t
        x += t.shape[1]
    return strip


# ---------------------------------------------------------------------------------------------------
# reading the run
# ---------------------------------------------------------------------------------------------------

def run_states(output: str, *, s3_endpoint: str | None = None, anon: bool = False) -> dict[str, dict]:
    """run_id → the run's summary JSON (sampling included for runs since the report existed)."""
    fs, root = get_fs(output, s3_endpoint=s3_endpoint, anon=anon)
    states = {}
    for p in fs.glob(join(root, STATE_DIR, "run-*.json")):
        try:
            state = json.loads(fs.cat_file(p))
        except (OSError, ValueError):
            continue
        if state.get("run_id"):
            states[state["run_id"]] = state
    return states


def sampling_for(row: dict, states: dict[str, dict]) -> SamplingSpec:
    """The run's SamplingSpec; for a run without one recorded, the row's frame count (default window)."""
    recorded = (states.get(row.get("run_id") or "") or {}).get("sampling")
    if recorded:
        return SamplingSpec(**recorded)
    return SamplingSpec(num_frames=max(1, int(row.get("frames_sampled") or 8)))


def summarize_rows(t: pa.Table) -> dict:
    """Counts over every row: videos, ok / error (a video with any error row counts as error), tokens."""
    per_video: dict[str, tuple[str, str | None]] = {}
    for vid, status, etype in zip(t["video_id"].to_pylist(), t["status"].to_pylist(), t["error_type"].to_pylist()):
        if vid not in per_video or status == "error":
            per_video[vid] = (status, etype if status == "error" else None)
    by_type: dict[str, int] = {}
    for status, etype in per_video.values():
        if status == "error":
            by_type[etype or "unknown"] = by_type.get(etype or "unknown", 0) + 1
    ok = t.filter(pc.equal(t["status"], "ok"))
    kept = pc.sum(ok["visual_tokens_kept"]).as_py() or 0
    full = pc.sum(ok["visual_tokens_full"]).as_py() or 0
    return {"videos": len(per_video), "rows": t.num_rows, "rows_ok": ok.num_rows,
            "videos_ok": sum(1 for s, _ in per_video.values() if s == "ok"),
            "videos_error": sum(by_type.values()), "errors_by_type": dict(sorted(by_type.items())),
            "tokens_kept": kept, "tokens_full": full}


def summary_plot(t: pa.Table, path: Path) -> bool:
    """Small plots of the ok rows: retention used, residual, time per stage. False when there is nothing to plot."""
    ok = t.filter(pc.equal(t["status"], "ok"))
    if ok.num_rows == 0:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(10.5, 2.3), dpi=80)
    retention = [x for x in ok["retention_used"].to_pylist() if x is not None]
    residual = [x for x in ok["iwp_residual"].to_pylist() if x is not None]
    axes[0].hist(retention or [0], bins=20, color="#4c72b0")
    axes[0].set_title("retention used", fontsize=9)
    axes[0].set_xlim(0, 1.02)
    axes[1].hist(residual or [0], bins=20, color="#dd8452")
    axes[1].set_title("residual ‖W−W_S‖²/‖W‖²", fontsize=9)
    times = [np.array([x for x in ok[s].to_pylist() if x is not None] or [0.0]) for s in STAGES]
    median = [float(np.median(t)) for t in times]
    p90 = [float(np.percentile(t, 90)) - m for t, m in zip(times, median)]
    axes[2].barh([s.removesuffix("_ms") for s in STAGES], median, xerr=[[0] * len(STAGES), p90], color="#55a868")
    axes[2].set_title("ms per video and stage (median, bar to p90)", fontsize=9)
    for ax in axes:
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------------
# the page
# ---------------------------------------------------------------------------------------------------

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#222}
header,main{max-width:1400px;margin:auto;padding:12px 20px}
h1{font-size:20px;margin:8px 0}
.summary{display:flex;flex-wrap:wrap;gap:8px 24px;background:#fff;padding:12px;border-radius:6px}
.summary div b{display:block;font-size:18px}
.plots{max-width:100%;margin-top:8px;background:#fff;border-radius:6px}
.controls{display:flex;gap:12px;align-items:center;margin:12px 0}
.card{background:#fff;border-radius:6px;padding:10px 12px;margin:10px 0;border-left:5px solid #3a8f3a}
.card[data-status=error]{border-left-color:#c0392b}
.card h2{font-size:15px;margin:0 0 6px;word-break:break-all}
.meta{color:#555;font-size:12px}
.strip{display:block;max-width:100%;height:auto;image-rendering:pixelated;margin:6px 0}
.rows{display:grid;grid-template-columns:1fr 1fr;gap:6px 16px}
.label{font-size:11px;color:#777;text-transform:uppercase}
.error{color:#c0392b;white-space:pre-wrap}
.badge{display:inline-block;padding:0 6px;border-radius:8px;background:#3a8f3a;color:#fff;font-size:12px}
.card[data-status=error] .badge{background:#c0392b}
"""

JS = """
(function () {
  var cards = Array.prototype.slice.call(document.querySelectorAll('.card'));
  var pageSize = PAGE_SIZE, page = 0;
  var status = document.getElementById('f-status'), etype = document.getElementById('f-etype');
  var text = document.getElementById('f-text'), info = document.getElementById('page-info');
  function matching() {
    var q = text.value.toLowerCase();
    return cards.filter(function (c) {
      return (!status.value || c.dataset.status === status.value) &&
             (!etype.value || c.dataset.errorTypes.split(' ').indexOf(etype.value) >= 0) &&
             (!q || c.textContent.toLowerCase().indexOf(q) >= 0);
    });
  }
  function show() {
    var m = matching(), pages = Math.max(1, Math.ceil(m.length / pageSize));
    page = Math.min(page, pages - 1);
    cards.forEach(function (c) { c.hidden = true; });
    m.slice(page * pageSize, (page + 1) * pageSize).forEach(function (c) { c.hidden = false; });
    info.textContent = m.length + ' of ' + cards.length + ' videos, page ' + (page + 1) + ' of ' + pages;
  }
  document.getElementById('prev').onclick = function () { page = Math.max(0, page - 1); show(); };
  document.getElementById('next').onclick = function () { page += 1; show(); };
  [status, etype].forEach(function (el) { el.onchange = function () { page = 0; show(); }; });
  text.oninput = function () { page = 0; show(); };
  show();
})();
"""


def _e(x) -> str:
    return html.escape("" if x is None else str(x))


def _fmt(x, spec: str = ".3f") -> str:
    return "–" if x is None else format(x, spec)


@dataclass
class Card:
    video_id: str
    uri: str
    rows: list[dict]
    strips: list[tuple[str, dict, int, int]] = field(default_factory=list)  # (src, first row, width, height)
    note: str | None = None  # why there are no frames, or why the overlay is missing

    @property
    def status(self) -> str:
        return "error" if any(r["status"] == "error" for r in self.rows) else "ok"


def card_html(card: Card) -> str:
    first = card.rows[0]
    etypes = " ".join(sorted({r["error_type"] for r in card.rows if r["error_type"]}))
    kept = first.get("visual_tokens_kept")
    source = (f' · {first.get("frames_sampled") or 0} frames · {_e(first.get("width"))}×{_e(first.get("height"))}'
              f' · {_fmt(first.get("duration_s"), ".2f")} s' if first.get("width") else "")
    head = (f'<h2>{_e(card.uri.rsplit("/", 1)[-1])} <span class="badge">{_e(card.status)}</span></h2>'
            f'<div class="meta">{_e(card.uri)}{source}'
            + (f' · pruner {_e(first.get("pruner"))} · tokens kept {kept} / {first.get("visual_tokens_full")}'
               f' · retention used {_fmt(first.get("retention_used"))} · residual {_fmt(first.get("iwp_residual"))}'
               if kept is not None else "") + '</div>')
    several = len({r.get("pruner") for r in card.rows if r["status"] == "ok"}) > 1
    strips = "".join(
        (f'<div class="label">pruner {_e(row.get("pruner"))}: kept {row.get("visual_tokens_kept")} / '
         f'{row.get("visual_tokens_full")}, residual {_fmt(row.get("iwp_residual"))}</div>' if several else "")
        + f'<img class="strip" src="{_e(src)}" width="{w}" height="{h}" alt="sampled frames of {_e(card.video_id)}"'
        f' data-pruner="{_e(row.get("pruner"))}" data-frames="{len(row.get("frame_timestamps") or [])}"'
        f' data-token-grid="{_e(",".join(map(str, row.get("token_grid") or [])))}"'
        f' title="frames at {_e(", ".join(f"{t:.2f}s" for t in row.get("frame_timestamps") or []))}'
        f' (dimmed: visual tokens the pruner dropped)">'
        for src, row, w, h in card.strips)
    note = f'<div class="meta">{_e(card.note)}</div>' if card.note else ""
    rows = []
    for r in card.rows:
        body = (f'<div class="error">{_e(r["error_type"])}: {_e(r["error_message"])}</div>' if r["status"] == "error"
                else f'<div class="text">{_e(r["text"])}</div>')
        ref = (f'<div><div class="label">reference</div><div class="reference">{_e(r.get("reference"))}</div></div>'
               if r.get("reference") else "<div></div>")
        who = f' ({_e(r.get("pruner"))})' if several else ""
        rows.append(f'<div><div class="label">{_e(r["prompt"])}{who}</div>{body}</div>{ref}')
    return (f'<article class="card" data-video-id="{_e(card.video_id)}" data-status="{card.status}" '
            f'data-error-types="{_e(etypes)}">{head}{strips}{note}<div class="rows">{"".join(rows)}</div></article>')


def page_html(output: str, summary: dict, plot: str | None, cards: list[Card], filters: str) -> str:
    s = summary
    ratio = s["tokens_kept"] / s["tokens_full"] if s["tokens_full"] else None
    boxes = [("videos", s["videos"]), ("ok", s["videos_ok"]), ("error", s["videos_error"]),
             ("rows", s["rows"]), ("visual tokens kept / full", f'{s["tokens_kept"]} / {s["tokens_full"]}'
                                   + (f" ({ratio:.1%})" if ratio is not None else ""))]
    boxes += [(f"error: {k}", v) for k, v in s["errors_by_type"].items()]
    summary_html = "".join(f"<div>{_e(k)}<b>{_e(v)}</b></div>" for k, v in boxes)
    types = sorted({t for c in cards for r in c.rows for t in [r["error_type"]] if t})
    options = "".join(f'<option value="{_e(t)}">{_e(t)}</option>' for t in types)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>framescribe report: {_e(output)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>
<body><header><h1>framescribe report</h1><div class="meta">{_e(output)} · {len(cards)} of {s["videos"]} videos
shown{_e(filters)} · frames decoded again from the source with the run's sampling; on each frame the visual
tokens the pruner dropped are dimmed</div>
<section class="summary" id="summary">{summary_html}</section>
{f'<img class="plots" src="{plot}" alt="retention, residual and stage timings">' if plot else ""}
<div class="controls"><label>status <select id="f-status"><option value="">all</option><option>ok</option>
<option>error</option></select></label><label>error type <select id="f-etype"><option value="">all</option>{options}
</select></label><label>search <input id="f-text" type="search"></label><button id="prev">‹ prev</button>
<button id="next">next ›</button><span id="page-info"></span></div></header>
<main id="cards">{"".join(card_html(c) for c in cards)}</main>
<script>{JS.replace("PAGE_SIZE", str(PAGE_SIZE))}</script></body></html>
"""


# ---------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------

def default_html_dir(output: str) -> str:
    """Beside a local run's rows (in its `_framescribe` folder, which dataset readers skip); else ./framescribe-report."""
    return "framescribe-report" if is_remote(output) else join(output, STATE_DIR, "report")


def select_rows(t: pa.Table, *, status: str | None, error_type: str | None) -> pa.Table:
    if status is not None:
        if status not in ("ok", "error"):
            raise ReportError(f"status: must be ok or error, got {status!r}")
        t = t.filter(pc.equal(t["status"], status))
    if error_type is not None:
        t = t.filter(pc.equal(t["error_type"], error_type))
    return t


def build_report(output: str, html_dir: str | None = None, *, limit: int = 100, status: str | None = None,
                 error_type: str | None = None, s3_endpoint: str | None = None, anon: bool = False,
                 decode_timeout_s: float | None = None, thumb_max_side: int = THUMB_MAX_SIDE) -> ReportResult:
    """Write the report of `output` (local or s3://) into `html_dir`; returns where its index.html is."""
    from PIL import Image

    if limit < 0:
        raise ReportError(f"limit: must be >= 0, got {limit}")
    everything = read_rows(output, columns=SUMMARY_COLUMNS, s3_endpoint=s3_endpoint, anon=anon)
    if everything.num_rows == 0:
        raise ReportError(f"output: no rows under {output!r} (is it a framescribe output?)")
    chosen = select_rows(everything, status=status, error_type=error_type)
    video_ids = list(dict.fromkeys(chosen.sort_by([("uri", "ascending"), ("video_id", "ascending")])["video_id"]
                                   .to_pylist()))[:limit]

    out = Path(html_dir or default_html_dir(output))
    (out / "frames").mkdir(parents=True, exist_ok=True)
    for old in (out / "frames").glob("*.jpg"):  # a re-render shows this selection only
        old.unlink()
    plot = "summary.png" if summary_plot(everything, out / "summary.png") else None

    rows = read_rows(output, s3_endpoint=s3_endpoint, anon=anon,
                     filter=pc.field("video_id").isin(video_ids)) if video_ids else None
    rows = select_rows(rows, status=status, error_type=error_type).to_pylist() if rows is not None else []
    by_video: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: (r["prompt"] or "", r["pruner"] or "")):
        by_video.setdefault(r["video_id"], []).append(r)
    states = run_states(output, s3_endpoint=s3_endpoint, anon=anon)
    cards = []
    try:
        for vid in video_ids:
            vrows = by_video[vid]
            card = Card(vid, vrows[0]["uri"], vrows)
            cards.append(card)
            source = next((r for r in vrows if r["status"] == "ok"), vrows[0])
            if source["status"] == "error" and source["error_type"] != "model_error":
                continue  # the file itself failed to decode: its error is the card
            spec = sampling_for(source, states)
            timeout = decode_timeout_s or (states.get(source["run_id"] or "") or {}).get("decode_timeout_s") or 120.0
            try:
                fs, _ = get_fs(card.uri, s3_endpoint=s3_endpoint, anon=anon)
                frames = decode_video(card.uri, spec, filesystem=fs, timeout_s=timeout).frames
            except DecodeError as e:
                card.note = f"frames unavailable: {e.error_type}: {e.message}"
                continue
            variants: dict[tuple, dict] = {}  # distinct kept sets (query-dependent pruners differ per prompt)
            for r in vrows:
                key = (tuple(r.get("kept_token_indices") or ()), tuple(r.get("token_grid") or ()))
                variants.setdefault(key, r)
            for k, r in enumerate(variants.values()):
                kept, grid = r.get("kept_token_indices"), r.get("token_grid")
                if r["status"] != "ok" or kept is None or not grid:
                    kept = grid = None
                    card.note = card.note or "no kept-token record in this row: frames shown without the overlay"
                strip = strip_image(frames, kept, grid, max_side=thumb_max_side)
                name = f"frames/{vid}-{k}.jpg"
                Image.fromarray(strip).save(out / name, quality=JPEG_QUALITY)
                card.strips.append((name, r, strip.shape[1], strip.shape[0]))
    finally:
        shutdown_decode_pool()

    filters = "".join(f", {k} = {v}" for k, v in (("status", status), ("error type", error_type)) if v)
    index = out / "index.html"
    summary = summarize_rows(everything)
    index.write_text(page_html(output, summary, plot, cards, filters), encoding="utf-8")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return ReportResult(index=index.resolve(), videos_total=summary["videos"],
                        videos_shown=len(cards), bytes_total=size)
