"""`framescribe bench speed`: where the time goes with and without visual-token pruning, in ONE run.

For one model shape (random weights built from the published config, see `actors.model_shapes`) and a
batch of synthetic videos, every case — the unpruned model (pruner "none") and each pruner × retention —
runs the captioning path the model actor runs: encode (processor + vision tower + merger) → prune →
splice → batched prefill → greedy decode of exactly `max_new_tokens` tokens (EOS disabled, so every
case decodes the same number of steps). Cases are warmed up once, then measured round-robin
(`repeats` passes over all cases, so slow drift of a shared machine hits every case alike) and the
median of each quantity is reported.

All `*_ms` columns are for one batch of `batch_size` videos; `preprocess_ms` (the processor alone, timed
in a separate call) is the CPU part of `vision_ms` (on a GPU the processor runs on the device).
`prune_ms` is what the run's rows record (selection, compensation, the guard); `residual_ms` the fidelity
residual every row also carries, computed after it (both are in `e2e_ms`).
Ratios are against the unpruned row:
prefill speedup, pruning time as % of the unpruned prefill, end-to-end (videos/s) speedup.
With `--layers N` / `--vision-layers N` (CPU runs of big shapes) the `*_full_depth_est` columns
extrapolate to the full model: prefill ∝ LLM layers, vision ∝ vision blocks, decode ∝ parameters read
per step (layers + LM head); they are estimates, the measured columns are what was run.
"""
from __future__ import annotations

import csv
import os
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from bench.figures import save_figure

from actors.generation import sync_device

DEFAULT_RETENTIONS = (1.0, 0.5, 0.25, 0.10)
PROMPT = "Describe this video."
PRUNE_MODES = ("per_video", "batched")
CONTENTS = ("moving", "static", "panning")  # synthetic clips: see synthetic_batch
# decoding: actors.generation's loop, the static-cache loop (actors.static_decode), the same with a compiled step
DECODE_LOOPS = ("dynamic", "static", "compiled")
# columns of the CSV, in order (tests check them)
CSV_COLUMNS = (
    "arch", "size", "source", "hidden", "layers", "layers_full", "heads", "kv_heads", "intermediate", "vocab",
    "vision_layers", "vision_layers_full", "params_m", "device", "device_name", "dtype", "attn", "threads", "clock",
    "frames", "resolution", "batch_size", "max_new_tokens", "repeats", "content",
    "pruner", "retention", "prune_mode", "compensation", "vision_skip_threshold", "decode_loop", "eos_check_every", "groups", "groups_encoded", "groups_skipped_share", "visual_tokens", "visual_tokens_kept", "seq_len",
    "preprocess_ms", "vision_ms", "prune_ms", "residual_ms", "splice_ms", "prefill_ms", "decode_ms", "decode_steps",
    "decode_ms_per_token",
    "e2e_ms", "videos_per_s", "peak_mem_mb", "peak_mem_kind", "kv_cache_mb",
    "prefill_speedup", "prune_overhead_pct", "e2e_speedup",
    "prefill_ms_full_depth_est", "e2e_ms_full_depth_est", "prefill_speedup_full_depth_est",
    "prune_overhead_pct_full_depth_est", "residual_pct_full_depth_est", "e2e_speedup_full_depth_est",
    "load_avg", "commit", "created_at",
)


@dataclass
class SpeedConfig:
    arch: str = "qwen2_5_vl"
    size: str = "tiny"
    device: str = "auto"
    dtype: str = "auto"
    frames: int = 16
    resolution: int | None = None        # default: the shape's (112 tiny, 224 small, 448 3b/7b, 384 LLaVA)
    batch_size: int = 4
    retentions: tuple[float, ...] = DEFAULT_RETENTIONS
    pruners: tuple[str, ...] = ("iwp",)
    prune_modes: tuple[str, ...] = ("per_video",)
    max_new_tokens: int = 32
    repeats: int = 3
    warmup: int = 1
    layers: int | None = None
    vision_layers: int | None = None
    threads: int | None = None           # CPU: torch.set_num_threads (default: torch's choice)
    attn: str = "sdpa"
    clock: str = "wall"                  # "process": CPU time of this process (1 thread), immune to other load
    out: Path = Path("bench-out/speed")
    seed: int = 0
    content: str = "moving"              # moving | static | panning (see synthetic_batch)
    vision_skip_threshold: float | None = None  # also run every case with the vision skip at this threshold
    decode_loops: tuple[str, ...] = ("dynamic",)  # every case once per decode loop (DECODE_LOOPS)
    eos_check_every: int = 8                      # static loops: steps between EOS checks (EOS is disabled here)
    compensation: str = "auto"                    # pruned cases: "bias" adds the log-count attention bias (4-D mask);
                                                  # "auto": what `framescribe run` does (bias for iwp, none otherwise)

    def __post_init__(self) -> None:
        from iwp import PRUNERS

        if self.content not in CONTENTS:
            raise ValueError(f"content: {self.content!r} is not one of {', '.join(CONTENTS)}")
        for d in self.decode_loops:
            if d not in DECODE_LOOPS:
                raise ValueError(f"decode_loops: {d!r} is not one of {', '.join(DECODE_LOOPS)}")
        if not self.decode_loops:
            raise ValueError("decode_loops: name at least one")
        if self.compensation not in ("auto", "none", "bias"):
            raise ValueError(f"compensation: {self.compensation!r} is not 'auto', 'none' or 'bias'")
        if self.compensation == "bias" and "batched" in self.prune_modes:
            raise ValueError("compensation: the batched (lockstep) selection has no compensation; use per_video")
        if self.eos_check_every < 1:
            raise ValueError(f"eos_check_every: must be >= 1, got {self.eos_check_every}")
        if self.vision_skip_threshold is not None and self.vision_skip_threshold < 0:
            raise ValueError(f"vision_skip_threshold: must be >= 0, got {self.vision_skip_threshold}")

        for p in self.pruners:
            if p not in PRUNERS or p == "none":
                choices = ", ".join(x for x in PRUNERS if x != "none")
                raise ValueError(f"pruners: unknown pruner {p!r}; choose from {choices}")
            if p == "fastv":
                raise ValueError("pruners: 'fastv' needs eager attention and a full prefill per prompt; "
                                 "it is not part of the speed benchmark")
        for r in self.retentions:
            if not 0.0 < r <= 1.0:
                raise ValueError(f"retentions: each must be in (0, 1], got {r}")
        for m in self.prune_modes:
            if m not in PRUNE_MODES:
                raise ValueError(f"prune_modes: {m!r} is not one of {', '.join(PRUNE_MODES)}")
        if self.clock not in ("wall", "process"):
            raise ValueError(f"clock: {self.clock!r} is not 'wall' or 'process'")
        if self.clock == "process":
            if self.device == "cuda":
                raise ValueError("clock: 'process' measures CPU time; GPU runs need the wall clock")
            if self.threads not in (None, 1):
                raise ValueError("clock: 'process' needs --threads 1 (CPU time of several threads is not elapsed time)")
            self.threads = 1
        if self.frames < 1 or self.batch_size < 1 or self.repeats < 1 or self.max_new_tokens < 1 or self.warmup < 0:
            raise ValueError("frames, batch_size, repeats, max_new_tokens must be >= 1 and warmup >= 0")


@dataclass(frozen=True)
class Case:
    pruner: str
    retention: float
    prune_mode: str = "per_video"
    skip: float | None = None  # vision-skip threshold, None: every group through the tower
    decode: str = "dynamic"    # one of DECODE_LOOPS

    @property
    def label(self) -> str:
        skip = ("" if self.skip is None else "+skip") + ("" if self.decode == "dynamic" else f"+{self.decode}")
        if self.pruner == "none":
            return "none" + skip
        mode = "" if self.prune_mode == "per_video" else "+batched"
        return f"{self.pruner}{mode}{skip}@{self.retention:g}"


def cases_for(cfg: SpeedConfig) -> list[Case]:
    from iwp.baselines import IWP_VARIANTS

    cases = [Case("none", 1.0)]
    for pruner in cfg.pruners:
        for mode in cfg.prune_modes:
            if mode == "batched" and pruner not in IWP_VARIANTS:
                continue  # only PC-MMR has a batched (lockstep) selection
            cases += [Case(pruner, r, mode) for r in cfg.retentions]
    if cfg.vision_skip_threshold is not None:  # the same cases again with the vision skip on
        cases += [Case(c.pruner, c.retention, c.prune_mode, cfg.vision_skip_threshold) for c in cases]
    return [Case(c.pruner, c.retention, c.prune_mode, c.skip, d) for d in cfg.decode_loops for c in cases]


def make_decoders(model, cfg: SpeedConfig) -> dict:
    """The decoder of each decode loop: None (actors.generation's loop) or a StaticDecoder kept across calls."""
    from actors.static_decode import StaticDecoder

    return {d: None if d == "dynamic" else StaticDecoder(model, compile_step=d == "compiled",
                                                         eos_check_every=cfg.eos_check_every)
            for d in cfg.decode_loops}


# ---------------------------------------------------------------- measurement helpers


def reset_peak(device) -> None:
    """Start a peak-memory window: CUDA allocator peak, or the process's peak RSS (Linux clear_refs)."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
    except OSError:
        pass


def peak_mb(device) -> tuple[float, str]:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024, "host_peak_rss"
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "host_max_rss_process"


def git_commit() -> str:
    try:
        # "-dirty": the working tree had uncommitted changes (other engineers' or the benchmark's own)
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except Exception:
        return ""


def synthetic_batch(batch_size: int, frames: int, resolution: int, seed: int = 0, fps: float = 2.0,
                    content: str = "moving"):
    """`batch_size` natural-ish clips and their frame times. content: "moving" (textured background, a large
    square crossing it), "static" (still camera and background, two small moving squares), "panning" (the
    camera pans every frame)."""
    from pipeline.sample_videos import make_moving_shapes, make_panning_scene, make_static_scene

    make = {"moving": make_moving_shapes, "static": make_static_scene, "panning": make_panning_scene}[content]
    videos = [make(frames, resolution, resolution, seed=seed + i) for i in range(batch_size)]
    timestamps = [[j / fps for j in range(frames)] for _ in range(batch_size)]
    return videos, timestamps


def prune_batched(encoded, spec, language_model, clock=time.perf_counter):
    """Lockstep PC-MMR for a batch of videos (one K/V projection, one greedy loop for all): the
    candidate batched path of issue #8, measured here before the captioner adopts it. Times prune_ms and
    residual_ms apart with `clock`, as `prune_video` does."""
    import torch
    from dataclasses import replace as dc_replace

    from actors.splice import PrunedVideo, layer_kv
    from iwp import budget_for, relative_residual, select_tokens_pcmmr_batch
    from iwp.baselines import IWP_VARIANTS

    if spec.method not in IWP_VARIANTS or spec.max_residual is not None:
        raise ValueError("batched pruning covers the iwp variants without the quality guard")
    device = encoded[0].embeds.device
    settings = dc_replace(spec.settings, **IWP_VARIANTS[spec.method])
    with torch.inference_mode():
        sync_device(device)
        t0 = clock()
        sizes = [v.embeds.shape[0] for v in encoded]
        keys, values = layer_kv(language_model, torch.cat([v.embeds for v in encoded]), spec.layer)
        ks, vs = keys.split(sizes), values.split(sizes)
        budgets = [budget_for(n, spec.retention) for n in sizes]
        keeps = select_tokens_pcmmr_batch(ks, vs, [v.layout for v in encoded], budgets, settings)
        out = [PrunedVideo(keep, v.embeds[keep], v.embeds.shape[0], None, 0.0, spec.retention)
               for v, keep in zip(encoded, keeps)]
        sync_device(device)
        t1 = clock()
        for p, k, val in zip(out, ks, vs):  # the fidelity residual, timed apart
            p.residual = relative_residual(k, val, p.keep, settings,
                                           generator=torch.Generator(device="cpu").manual_seed(spec.seed))
        sync_device(device)
        t2 = clock()
    for p in out:
        p.prune_ms, p.residual_ms = (t1 - t0) * 1e3 / len(out), (t2 - t1) * 1e3 / len(out)
    return out


def case_compensation(compensation: str, case: Case) -> str:
    """The compensation a case runs with: none unpruned and in the batched selection (it has none); "auto"
    is the run's default for the pruner."""
    from iwp.registry import default_compensation

    if case.pruner == "none" or case.prune_mode == "batched":
        return "none"
    return default_compensation(case.pruner) if compensation == "auto" else compensation


def measure_case(adapter, built, videos, timestamps, case: Case, max_new_tokens: int, seed: int = 0,
                 clock=time.perf_counter, decoder=None, compensation: str = "none") -> dict:
    """One timed pass of the captioning path for one batch (`decoder`: the case's static decoder, or None)."""
    import torch

    from actors.static_decode import generate
    from actors.splice import PruneSpec, prune_video

    device = built.device
    spec = PruneSpec(method=case.pruner, retention=case.retention, seed=seed,
                     compensation=case_compensation(compensation, case))
    # the processor's share of the vision time, timed on its own (outside the end-to-end pass)
    sync_device(device)
    tp = clock()
    adapter.preprocess(videos)
    sync_device(device)
    preprocess_ms = (clock() - tp) * 1e3
    reset_peak(device)
    sync_device(device)
    t0 = clock()
    adapter.skip_threshold = case.skip
    with torch.inference_mode():
        encoded = adapter.encode(videos, timestamps)
        sync_device(device)
        t1 = clock()
        if case.prune_mode == "batched" and case.pruner != "none":
            pruned = prune_batched(encoded, spec, adapter.language_model, clock=clock)
        else:
            pruned = [prune_video(v, spec, adapter.language_model, clock=clock) for v in encoded]
        sync_device(device)
        t2 = clock()
        seqs = [adapter.splice(v, p, PROMPT) for v, p in zip(encoded, pruned)]
        sync_device(device)
        t3 = clock()
        # EOS disabled (-1 is never generated): every case decodes exactly max_new_tokens tokens
        gen = generate(built.model, seqs, max_new_tokens=max_new_tokens, eos_token_ids={-1},
                       pad_token_id=adapter.tokenizer.pad_token_id or 0, decoder=decoder, clock=clock)
        sync_device(device)
        t4 = clock()
    peak, kind = peak_mb(device)
    steps = max(0, gen.new_tokens - 1)  # the first token comes out of the prefill
    seq_len = max(s.embeds.shape[0] for s in seqs)
    # prune_ms as the run's rows record it (selection + compensation); the fidelity residual on its own
    residual_ms = sum(p.residual_ms for p in pruned)
    return {"preprocess_ms": preprocess_ms, "vision_ms": (t1 - t0) * 1e3, "prune_ms": (t2 - t1) * 1e3 - residual_ms,
            "residual_ms": residual_ms,
            "splice_ms": (t3 - t2) * 1e3,
            "prefill_ms": gen.prefill_ms, "decode_ms": gen.decode_ms, "decode_steps": steps,
            "decode_ms_per_token": gen.decode_ms / steps if steps else 0.0, "e2e_ms": (t4 - t0) * 1e3,
            "peak_mem_mb": peak, "peak_mem_kind": kind,
            "visual_tokens": int(statistics.median(p.n_full for p in pruned)),
            "visual_tokens_kept": int(statistics.median(int(p.keep.numel()) for p in pruned)),
            "seq_len": seq_len, "groups": sum(v.layout.n_chunks for v in encoded),
            "groups_encoded": sum(v.meta.get("groups_encoded", v.layout.n_chunks) for v in encoded)}


def kv_cache_mb(built, batch: int, length: int) -> float:
    """K/V cache size after prefill + decode (analytic: 2 × layers × kv_heads × head_dim × tokens)."""
    import torch

    t = built.shape.text
    head_dim = t.hidden // t.heads
    elt = torch.finfo(built.dtype).bits // 8
    return 2 * built.layers * t.kv_heads * head_dim * batch * length * elt / 2**20


def _median(values: list) -> float:
    return float(statistics.median(values))


def _full_depth_factors(built) -> tuple[float, float, float]:
    """(vision, prefill, decode) time multipliers from the built depth to the full model's."""
    t, v = built.shape.text, built.shape.vision
    vision_f = v.depth / built.vision_layers
    prefill_f = t.layers / built.layers
    # decode is bound by reading the weights once per step: per-layer params × layers + LM head
    kv_width = t.hidden * t.kv_heads // t.heads
    per_layer = 2 * t.hidden * t.hidden + 2 * t.hidden * kv_width + 3 * t.hidden * t.intermediate  # q,o + k,v + MLP
    head = t.hidden * (built.info.get("vocab") or 0)
    decode_f = (per_layer * t.layers + head) / (per_layer * built.layers + head)
    return vision_f, prefill_f, decode_f


def summarize(built, cfg: SpeedConfig, results: dict[Case, list[dict]], resolution: int) -> list[dict]:
    """One row per case with medians, ratios vs the unpruned case and full-depth estimates."""
    base_info = {**built.describe(), "source": built.shape.source, "threads": cfg.threads or "", "clock": cfg.clock,
                 "frames": cfg.frames, "resolution": resolution, "batch_size": cfg.batch_size,
                 "max_new_tokens": cfg.max_new_tokens, "repeats": cfg.repeats, "content": cfg.content,
                 "load_avg": round(os.getloadavg()[0], 2), "commit": git_commit(),
                 "created_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if built.device.type == "cpu":
        import torch

        base_info["threads"] = torch.get_num_threads()
    vf, pf, df = _full_depth_factors(built)
    rows = []
    for case, runs in results.items():
        row = {**base_info, "pruner": case.pruner, "retention": case.retention, "prune_mode": case.prune_mode,
               "compensation": case_compensation(cfg.compensation, case),
               "vision_skip_threshold": "" if case.skip is None else case.skip, "decode_loop": case.decode,
               "eos_check_every": "" if case.decode == "dynamic" else cfg.eos_check_every}
        for k in ("preprocess_ms", "vision_ms", "prune_ms", "residual_ms", "splice_ms", "prefill_ms", "decode_ms",
                  "decode_ms_per_token",
                  "e2e_ms", "peak_mem_mb"):
            row[k] = round(_median([r[k] for r in runs]), 3)
        for k in ("decode_steps", "visual_tokens", "visual_tokens_kept", "seq_len", "groups", "groups_encoded"):
            row[k] = runs[0][k]
        row["groups_skipped_share"] = round(1 - row["groups_encoded"] / row["groups"], 4)
        row["peak_mem_kind"] = runs[0]["peak_mem_kind"]
        row["videos_per_s"] = round(cfg.batch_size / (row["e2e_ms"] / 1e3), 4)
        row["kv_cache_mb"] = round(kv_cache_mb(built, cfg.batch_size, row["seq_len"] + cfg.max_new_tokens), 2)
        row["prefill_ms_full_depth_est"] = round(row["prefill_ms"] * pf, 3)
        rest = row["e2e_ms"] - row["vision_ms"] - row["prefill_ms"] - row["decode_ms"]  # prune + residual + splice + glue
        tower = max(0.0, row["vision_ms"] - row["preprocess_ms"])  # the processor does not scale with depth
        row["e2e_ms_full_depth_est"] = round(row["preprocess_ms"] + tower * vf + rest + row["prefill_ms"] * pf
                                             + row["decode_ms"] * df, 3)
        rows.append(row)
    base = next(r for r in rows if r["pruner"] == "none" and r["vision_skip_threshold"] == ""
                and r["decode_loop"] == cfg.decode_loops[0])
    for r in rows:
        r["prefill_speedup"] = round(base["prefill_ms"] / r["prefill_ms"], 3)
        r["prune_overhead_pct"] = round(100 * r["prune_ms"] / base["prefill_ms"], 3)
        r["e2e_speedup"] = round(r["videos_per_s"] / base["videos_per_s"], 3)
        r["prefill_speedup_full_depth_est"] = round(base["prefill_ms_full_depth_est"]
                                                    / r["prefill_ms_full_depth_est"], 3)
        r["prune_overhead_pct_full_depth_est"] = round(100 * r["prune_ms"] / base["prefill_ms_full_depth_est"], 3)
        r["residual_pct_full_depth_est"] = round(100 * r["residual_ms"] / base["prefill_ms_full_depth_est"], 3)
        r["e2e_speedup_full_depth_est"] = round(base["e2e_ms_full_depth_est"] / r["e2e_ms_full_depth_est"], 3)
    return [{k: r.get(k, "") for k in CSV_COLUMNS} for r in rows]


def run_speed(cfg: SpeedConfig, *, log=print, built=None) -> tuple[list[dict], Path, Path]:
    """Build the model (or take `built`, to measure several clip kinds on one build), run every case,
    write CSV + PNG; returns (rows, csv_path, png_path)."""
    import torch

    from actors.loading import make_adapter, pick_device, pick_dtype
    from actors.model_shapes import build_model, get_shape

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    if cfg.clock == "process" and device.type != "cpu":
        raise ValueError("clock: 'process' measures CPU time; GPU runs need the wall clock (--clock wall)")
    if device.type == "cpu" and cfg.clock == "wall" and os.getloadavg()[0] > (os.cpu_count() or 1):
        log(f"warning: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: other work shares this "
            f"machine, wall-clock timings will be noisy (--clock process measures this process's CPU time)")
    dtype = pick_dtype(cfg.dtype, device)
    shape = get_shape(cfg.arch, cfg.size)
    resolution = cfg.resolution or shape.resolution
    t0 = time.perf_counter()
    built = built or build_model(cfg.arch, cfg.size, device=device, dtype=dtype, layers=cfg.layers,
                                 vision_layers=cfg.vision_layers, resolution=resolution, attn=cfg.attn, seed=cfg.seed)
    log(f"built {cfg.arch}/{cfg.size} ({built.params / 1e6:.1f}M params, {built.layers}/{shape.text.layers} LLM "
        f"layers, {built.vision_layers}/{shape.vision.depth} vision blocks) on {device} {dtype} "
        f"in {time.perf_counter() - t0:.1f}s")
    adapter = make_adapter(built.model, built.processor)
    videos, timestamps = synthetic_batch(cfg.batch_size, cfg.frames, resolution, seed=cfg.seed, content=cfg.content)
    cases = cases_for(cfg)
    decoders = make_decoders(built.model, cfg)
    clock = time.process_time if cfg.clock == "process" else time.perf_counter
    for w in range(cfg.warmup):  # first calls allocate, pick kernels, fill caches, compile: not measured
        for case in cases:
            measure_case(adapter, built, videos, timestamps, case, cfg.max_new_tokens, cfg.seed, clock,
                         decoders[case.decode], cfg.compensation)
        log(f"warm-up {w + 1}/{cfg.warmup} done")
    results: dict[Case, list[dict]] = {c: [] for c in cases}
    for rep in range(cfg.repeats):  # round-robin: drift of a shared machine hits every case alike
        for case in cases:
            results[case].append(measure_case(adapter, built, videos, timestamps, case, cfg.max_new_tokens,
                                              cfg.seed, clock, decoders[case.decode], cfg.compensation))
        log(f"repeat {rep + 1}/{cfg.repeats} done")
    rows = summarize(built, cfg, results, resolution)
    cfg.out.mkdir(parents=True, exist_ok=True)
    content = "" if cfg.content == "moving" else f"_{cfg.content}"
    decode = "" if cfg.decode_loops == ("dynamic",) else "_" + "-".join(cfg.decode_loops)
    stem = (f"speed_{cfg.arch}_{cfg.size}_L{built.layers}_f{cfg.frames}_b{cfg.batch_size}{content}{decode}"
            f"_{device.type}")
    csv_path = cfg.out / f"{stem}.csv"
    write_csv(rows, csv_path)
    png_path = cfg.out / f"{stem}.png"
    try:
        plot_speed(rows, png_path)
    except ImportError:  # the GPU suite's machine may have no matplotlib: the CSV is the result
        log("matplotlib missing: no PNG written")
    return rows, csv_path, png_path


def row_case(r: dict) -> Case:
    skip = r.get("vision_skip_threshold", "")
    return Case(r["pruner"], r["retention"], r["prune_mode"], None if skip in ("", None) else float(skip),
                r.get("decode_loop") or "dynamic")


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)


def plot_speed(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [row_case(r).label for r in rows]
    parts = [("vision_ms", "vision"), ("prune_ms", "prune"), ("residual_ms", "residual"), ("splice_ms", "splice"),
             ("prefill_ms", "prefill"), ("decode_ms", "decode")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    bottom = [0.0] * len(rows)
    for key, name in parts:
        vals = [float(r[key]) for r in rows]
        ax1.bar(labels, vals, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax1.set_ylabel(f"ms per batch of {rows[0]['batch_size']}")
    ax1.set_title("where the time goes")
    ax1.tick_params(axis="x", rotation=45)
    ax1.legend(fontsize=8)
    series: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["pruner"] != "none":
            series.setdefault((r["pruner"], r["prune_mode"], r["vision_skip_threshold"], r["decode_loop"]), []).append(r)
    for (pruner, mode, skip, decode), rs in series.items():
        rs = sorted(rs, key=lambda r: r["retention"])
        name = ((pruner if mode == "per_video" else f"{pruner} (batched)") + ("" if skip == "" else " +skip")
                + ("" if decode == "dynamic" else f" +{decode}"))
        ax2.plot([r["retention"] for r in rs], [r["prefill_speedup"] for r in rs], "o-", label=f"{name}: prefill")
        ax2.plot([r["retention"] for r in rs], [r["e2e_speedup"] for r in rs], "s--", label=f"{name}: end-to-end")
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax2.set_xlabel("retention (kept visual tokens / all)")
    ax2.set_ylabel("speedup vs unpruned")
    ax2.set_xticks(sorted({float(r["retention"]) for r in rows}))
    ax2.legend(fontsize=8)
    r0 = rows[0]
    save_figure(fig, path, f"{r0['arch']} {r0['size']} ({r0['layers']}/{r0['layers_full']} LLM layers), {r0['frames']} frames "
                 f"{r0['resolution']}px, {r0['device_name']} {r0['dtype']}")


def print_speed(rows: list[dict], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    r0 = rows[0]
    t = Table(title=f"bench speed: {r0['arch']} {r0['size']}, LLM layers {r0['layers']}/{r0['layers_full']}, "
                    f"vision blocks {r0['vision_layers']}/{r0['vision_layers_full']}, {r0['frames']} frames × "
                    f"{r0['batch_size']} videos, {r0['device']} {r0['dtype']} "
                    f"(medians of {r0['repeats']}; ms per batch)")
    cols = ["case", "tokens", "groups enc.", "vision (preproc.)", "prune (+residual)", "prefill", "dec/tok", "e2e", "videos/s", "peak MB",
            "prefill ×", "prune % of prefill", "e2e ×"]
    est = any(r["layers"] != r["layers_full"] or r["vision_layers"] != r["vision_layers_full"] for r in rows)
    if est:
        cols += ["prefill × (full est)", "prune % (full est)", "e2e × (full est)"]
    for c in cols:
        t.add_column(c, justify="right")
    for r in rows:
        cells = [row_case(r).label,
                 f"{r['visual_tokens_kept']}/{r['visual_tokens']}", f"{r['groups_encoded']}/{r['groups']}",
                 f"{r['vision_ms']:.1f} ({r['preprocess_ms']:.0f})", f"{r['prune_ms']:.1f} (+{r['residual_ms']:.0f})", f"{r['prefill_ms']:.1f}",
                 f"{r['decode_ms_per_token']:.1f}", f"{r['e2e_ms']:.0f}", f"{r['videos_per_s']:.3f}",
                 f"{r['peak_mem_mb']:.0f}", f"{r['prefill_speedup']:.2f}", f"{r['prune_overhead_pct']:.1f}",
                 f"{r['e2e_speedup']:.2f}"]
        if est:
            cells += [f"{r['prefill_speedup_full_depth_est']:.2f}", f"{r['prune_overhead_pct_full_depth_est']:.2f}",
                      f"{r['e2e_speedup_full_depth_est']:.2f}"]
        t.add_row(*cells)
    console.print(t)


# ---------------------------------------------------------------- CLI

def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.replace(" ", "").split(",") if x)


def _names(text: str) -> tuple[str, ...]:
    return tuple(x for x in text.replace(" ", "").split(",") if x)


def command(
    arch: str = typer.Option("qwen2_5_vl", help="qwen2_5_vl | llava_onevision"),
    size: str = typer.Option("tiny", help="tiny | small | 3b | 7b (shapes of the public configs, random weights)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    dtype: str = typer.Option("auto", help="auto (bfloat16 on cuda, float32 on cpu) | float32 | bfloat16 | float16"),
    frames: int = typer.Option(16, help="frames per video"),
    resolution: Optional[int] = typer.Option(None, help="square frame side in pixels (default: 112 tiny, 224 small, "
                                              "448 Qwen 3b/7b, 384 LLaVA)"),
    batch_size: int = typer.Option(4, help="videos per batch (one prefill + decode for all)"),
    retentions: str = typer.Option(",".join(f"{r:g}" for r in DEFAULT_RETENTIONS), help="comma-separated"),
    pruners: str = typer.Option("iwp", help="comma-separated pruners to compare against the unpruned model"),
    prune_modes: str = typer.Option("per_video", help="per_video (as the captioner) and/or batched (lockstep PC-MMR)"),
    max_new_tokens: int = typer.Option(32, help="decode steps per video (EOS disabled)"),
    repeats: int = typer.Option(3, help="measured passes; the median is reported"),
    warmup: int = typer.Option(1, help="unmeasured passes first"),
    layers: Optional[int] = typer.Option(None, help="LLM layers to build (default: the shape's); "
                                                    "recorded in the output"),
    vision_layers: Optional[int] = typer.Option(None, help="vision blocks to build (default: the shape's)"),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch (default: torch's choice)"),
    attn: str = typer.Option("sdpa", help="attention implementation: sdpa | flash_attention_2 | eager"),
    clock: str = typer.Option("wall", help="wall | process (CPU only: this process's CPU time with 1 thread, "
                                           "steady on a machine shared with other work)"),
    out: Path = typer.Option(Path("bench-out/speed"), help="directory for the CSV and PNG"),
    seed: int = typer.Option(0),
    content: str = typer.Option("moving", help="synthetic clips: moving (a large square crosses a still "
                                "background) | static (still camera, two small moving objects) | panning "
                                "(the camera moves every frame)"),
    vision_skip: Optional[float] = typer.Option(None, help="also run every case with the vision skip at this "
                                                "threshold (e.g. 1.0, the run default); rows show groups encoded"),
    decode_loops: str = typer.Option("dynamic", help="comma-separated: run every case with each decode loop: "
                                     "dynamic (growing cache) | static (static KV cache, masks allocated once) | "
                                     "compiled (static with a torch.compile'd step; CUDA graphs on a GPU)"),
    eos_check_every: int = typer.Option(8, help="static loops: decoding steps between EOS checks"),
    compensation: str = typer.Option("auto", help="auto | none | bias: pruned cases carry the log-count attention "
                                     "bias (a 4-D float mask: no flash kernel); auto: as `framescribe run` does "
                                     "(bias for iwp, none for the other pruners and the batched selection)"),
):
    """Prefill / pruning / decode / end-to-end speed of pruned vs unpruned captioning, one model shape."""
    from rich.console import Console

    console = Console(width=None if Console().is_terminal else 200)
    try:
        cfg = SpeedConfig(arch=arch, size=size, device=device, dtype=dtype, frames=frames, resolution=resolution,
                          batch_size=batch_size, retentions=_floats(retentions), pruners=_names(pruners),
                          prune_modes=_names(prune_modes), max_new_tokens=max_new_tokens, repeats=repeats,
                          warmup=warmup, layers=layers, vision_layers=vision_layers, threads=threads, attn=attn,
                          clock=clock, out=out, seed=seed, content=content, vision_skip_threshold=vision_skip,
                          decode_loops=_names(decode_loops), eos_check_every=eos_check_every,
                          compensation=compensation)
        from actors.model_shapes import get_shape

        get_shape(arch, size)
    except ValueError as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    rows, csv_path, png_path = run_speed(cfg, log=lambda m: Console(stderr=True).print(m))
    print_speed(rows, console)
    console.print(f"wrote {csv_path} and {png_path}")
