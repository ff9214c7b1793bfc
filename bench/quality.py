"""`framescribe bench quality`: what each pruner costs in answers and in fidelity, side by side.

Two measurements, both through the pipeline's own seam (adapter.encode → prune_video → adapter.splice →
greedy_generate / prefill):

1. **Accuracy** on the synthetic temporal video-QA test split (`bench.synthetic_qa`) with the trained tiny
   Qwen2.5-VL (`bench.train_tiny`; the shipped one by default): every pruner × retention answers the same
   questions about the same clips with the same seeds. Two scores: greedy exact match (what the pipeline
   writes) and option log-likelihood.
2. **Fidelity**: relative error ‖x_pruned − x_full‖ / ‖x_full‖ of every LLM layer's attention output and
   hidden state at the text positions after the video (the prompt tokens, which are the same in both
   sequences), and of the final (normed) hidden state, against the unpruned model. On the trained tiny
   model (test clips) and on a random-weight model with Qwen2.5-VL-7B layer shapes (hidden 3584, 28 heads /
   4 KV heads, MLP 18944; vision tower width 1280) cut to `--big-layers` LLM layers and as many vision
   blocks so it fits a CPU, over natural-looking clips (fractal-noise scenery, gradients, a panning camera,
   shaded moving objects). Random weights say nothing about answers, only about how much of the attention
   output a pruned token set preserves.

Optionally (`--sweep-videos N`) the IWP knobs (λ, temperature, floor) are swept one at a time on the
VALIDATION split at retentions 0.25 and 0.10, and the best values are used for the IWP rows.

Outputs in `--out`: accuracy.csv, accuracy_by_type.csv, fidelity.csv, sweep.csv (if swept),
quality.md (the tables), accuracy.png (accuracy vs retention, one line per method), fidelity.png.
"""
from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import typer

DEFAULT_RETENTIONS = (1.0, 0.5, 0.25, 0.15, 0.10, 0.05)
SWEEP_GRID = {"lam": (0.1, 0.3, 0.5, 0.7, 0.9), "temperature": (0.5, 1.0, 2.0, 4.0), "floor": (0.0, 0.25, 0.5)}
SWEEP_RETENTIONS = (0.25, 0.10)
SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "actors" / "assets" / "tiny-qwen2_5_vl-synthqa"
# the trained models shipped for this benchmark, by the name `--models` takes: the first sees 128 visual tokens per
# clip, the second (the first fine-tuned with the clips upscaled to 168 px) 288
SHIPPED_MODELS = {"shipped": SHIPPED_MODEL, "shipped-168": SHIPPED_MODEL.with_name("tiny-qwen2_5_vl-synthqa-168")}

ACCURACY_COLUMNS = ("model", "method", "retention", "questions", "accuracy", "loglik_accuracy", "rel_accuracy",
                    "rel_loglik_accuracy", "kept_tokens", "full_tokens", "residual_mean", "answer_changed",
                    "residual_rank_corr", "compensation", "split", "format", "seed", "lam", "temperature", "floor")
FIDELITY_COLUMNS = ("model", "method", "retention", "videos", "attn_err_mean", "hidden_err_mean", "final_err",
                    "residual_mean", "attn_err_layers", "hidden_err_layers")


@dataclass
class QualityConfig:
    model: Optional[str] = None            # default: the shipped trained tiny model
    models: tuple[str, ...] = ()           # several models in one run (names in SHIPPED_MODELS or directories)
    seed: int = 0
    videos: int = 200                      # test clips for accuracy
    per_clip: int = 3                      # questions per clip
    fmt: str = "mc"                        # question format: mc | short
    retentions: tuple[float, ...] = DEFAULT_RETENTIONS
    methods: tuple[str, ...] = ()          # default: every pruner in iwp.PRUNERS
    out: Path = Path("bench-out/quality")
    fidelity_videos: int = 16              # trained model, test clips; 0 = skip
    big_videos: int = 2                    # 7B-shaped random model, natural-looking clips; 0 = skip
    big_layers: int = 2
    big_resolution: int = 168
    sweep_videos: int = 0                  # validation clips for the IWP sweep; 0 = no sweep
    lam: Optional[float] = None            # IWP settings (default: iwp.IWPSettings, or the sweep's choice)
    temperature: Optional[float] = None
    floor: Optional[float] = None
    threads: Optional[int] = None
    count_every: int = 1                   # every k-th clip asks its counting question first (0: no forcing)
    bootstrap: int = 2000                  # paired resamples for the confidence intervals

    def __post_init__(self) -> None:
        from iwp import PRUNERS

        if not self.methods:
            self.methods = default_methods()
        for m in self.methods:
            base, comp = parse_method(m)
            if base not in PRUNERS:
                raise ValueError(f"methods: unknown pruner {base!r} in {m!r}; choose from {', '.join(PRUNERS)}")
            if base == "none" and comp != "none":
                raise ValueError(f"methods: {m!r}: 'none' prunes nothing to compensate")
        if self.count_every < 0 or self.bootstrap < 0:
            raise ValueError("count_every and bootstrap must be >= 0")
        for r in self.retentions:
            if not 0.0 < r <= 1.0:
                raise ValueError(f"retentions: each must be in (0, 1], got {r}")
        if self.fmt not in ("mc", "short"):
            raise ValueError(f"format must be 'mc' or 'short', got {self.fmt!r}")
        if self.videos < 0 or self.per_clip < 1:
            raise ValueError("videos must be >= 0 (0: only the 7B-shaped fidelity) and per_clip >= 1")
        if self.videos == 0 and not self.big_videos:
            raise ValueError("nothing to do: --videos 0 and --big-videos 0")
        if self.model and self.models:
            raise ValueError("models: give --model or --models, not both")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"models: a model is named twice in {','.join(self.models)}")

    def model_paths(self) -> list[str]:
        """The model directories to run, in order (`--models`, else `--model`, else the first shipped model)."""
        if self.models:
            return [resolve_model(m) for m in self.models]
        return [self.model or default_model()]


COMPENSATED_BY_DEFAULT = ("random", "uniform", "divprune", "visionzip", "dycoke", "iwp", "iwp_fixed", "iwp_pcmmr")
TEMPORAL_QTYPES = ("appeared_first", "appeared_last", "disappeared", "changed", "direction")


def default_methods() -> tuple[str, ...]:
    """Every pruner at its defaults (`iwp` includes its default compensation), IWP without it (`iwp+none`), and
    the main baselines with the log-count bias (`dycoke+bias`, ...)."""
    from iwp import PRUNERS
    from iwp.registry import default_compensation

    return tuple(PRUNERS) + tuple(f"{m}+none" for m in PRUNERS if default_compensation(m) != "none") + tuple(
        f"{m}+bias" for m in COMPENSATED_BY_DEFAULT if default_compensation(m) != "bias")


def parse_method(name: str) -> tuple[str, str]:
    """'dycoke+bias+merge' → ('dycoke', 'bias+merge'); 'dycoke' → ('dycoke', 'none'); 'iwp' → ('iwp', its default
    compensation, 'bias'); 'iwp+none' → ('iwp', 'none')."""
    from iwp import COMPENSATIONS
    from iwp.registry import default_compensation

    base, _, comp = name.partition("+")
    comp = comp or default_compensation(base)
    if comp not in COMPENSATIONS:
        raise ValueError(f"methods: unknown compensation {comp!r} in {name!r}; choose from {', '.join(COMPENSATIONS)}")
    return base, comp


def is_baseline(method: str) -> bool:
    """A non-IWP pruning method (with or without compensation)."""
    base, _ = parse_method(method)
    return base != "none" and not base.startswith("iwp")


def repo_relative(path: str | None) -> str | None:
    """A path inside this repository as relative to it: saved outputs carry no machine's checkout path."""
    if path is None:
        return None
    root = Path(__file__).resolve().parents[1]
    p = Path(path).resolve()
    return str(p.relative_to(root)) if p.is_relative_to(root) else path


def resolve_model(name: str) -> str:
    """A `--models` entry: a shipped model's name (SHIPPED_MODELS) or a model directory."""
    path = SHIPPED_MODELS.get(name)
    if path is None:
        return name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"models: the shipped model {name!r} is missing from this install ({path})")
    return str(path)


def default_model() -> str:
    if (SHIPPED_MODEL / "config.json").is_file():
        return str(SHIPPED_MODEL)
    raise FileNotFoundError(f"no trained model at {SHIPPED_MODEL}; train one with `python -m bench.train_tiny "
                            f"--out DIR` and pass --model DIR")


def _cases(methods, retentions) -> list[tuple[str, float]]:
    cases = []
    for m in methods:
        for r in retentions:
            if m == "none" and r < 1.0:
                continue
            if r >= 1.0 and ("+" in m or (m != "none" and "none" in methods)):
                continue  # nothing pruned: every method (and its compensation) is the unpruned row
            cases.append((m, float(r)))
    return cases


# ------------------------------------------------------------------------------------------------ accuracy

def load_qa(path: str, threads: Optional[int] = None):
    import torch

    from bench.qa_scoring import QAModel

    if threads:
        torch.set_num_threads(threads)
    # eager attention: FastV reads attention weights; identical outputs to SDPA up to float rounding
    return QAModel.load(path, attn="eager", max_new_tokens=8)


def encode_clips(qa, split: str, n: int, seed: int, per_clip: int, fmt: str, chunk: int = 16, count_every: int = 0):
    """(encoded videos, QA items) for clips 0..n-1 of `split`; every `count_every`-th clip asks its count first."""
    from bench import synthetic_qa as sq
    from bench.qa_scoring import QAItem

    encoded, items = [], []
    for s in range(0, n, chunk):
        clips = [sq.make_clip(split, i, seed) for i in range(s, min(n, s + chunk))]
        encoded += qa.encode([c.frames for c in clips], [c.timestamps for c in clips])
        for j, c in enumerate(clips):
            include = ("count",) if count_every and (s + j) % count_every == 0 else ()
            items += [QAItem(s + j, q.prompt(fmt), q.answer, q.options, q.qtype)
                      for q in sq.eval_questions(c, per_clip, include)]
    return encoded, items


def accuracy_rows(qa, encoded, items, cases, settings, seed: int, log=print, per_question: dict | None = None
                  ) -> tuple[list[dict], list[dict]]:
    """Accuracy per (method, retention) and per question type; `per_question` (if given) receives every
    case's per-question results, keyed (method, retention), for the paired statistics."""
    from actors.splice import PruneSpec
    from bench.qa_scoring import answer_items

    rows, by_type = [], []
    for method, r in cases:
        t0, c0 = time.perf_counter(), time.process_time()
        base, comp = parse_method(method)
        spec = PruneSpec(method=base, retention=r, settings=settings, seed=seed, compensation=comp)
        res = answer_items(qa, encoded, items, spec, loglik=True)
        if per_question is not None:
            per_question[(method, r)] = res
        kept = np.mean([x["kept"] for x in res])
        resid = [x["residual"] for x in res if x["residual"] is not None]
        row = {"method": method, "compensation": comp, "retention": r, "questions": len(res),
               "accuracy": float(np.mean([x["correct"] for x in res])),
               "loglik_accuracy": float(np.mean([x["loglik_correct"] for x in res])),
               "kept_tokens": round(float(kept), 2), "full_tokens": res[0]["full"],
               "residual_mean": round(float(np.mean(resid)), 4) if resid else None}
        rows.append(row)
        types = sorted({x["qtype"] for x in res})
        for t in types:
            sel = [(x, it) for x, it in zip(res, items) if x["qtype"] == t]
            by_type.append({"method": method, "retention": r, "qtype": t, "questions": len(sel),
                            "accuracy": float(np.mean([x["correct"] for x, _ in sel])),
                            "loglik_accuracy": float(np.mean([x["loglik_correct"] for x, _ in sel])),
                            "chance": float(np.mean([1 / len(it.options) for _, it in sel]))})
        log(f"  {method:>15} @ {r:<5g} acc {row['accuracy']:.3f}  loglik {row['loglik_accuracy']:.3f}  "
            f"kept {kept:.1f}/{row['full_tokens']}  ({time.perf_counter() - t0:.1f}s, {time.process_time() - c0:.1f} CPU s)")
    _add_relative(rows)
    return rows, by_type


def _add_relative(rows: list[dict]) -> None:
    """rel_accuracy / rel_loglik_accuracy: each row's accuracy as a fraction of the unpruned ("none") row's."""
    base = next((x for x in rows if x["method"] == "none"), None)
    for x in rows:
        for k in ("accuracy", "loglik_accuracy"):
            x[f"rel_{k}"] = round(x[k] / base[k], 4) if base and base[k] else None


ANSWERABLE_MARGIN = 0.2


def answerable_rows(by_type: list[dict], margin: float = ANSWERABLE_MARGIN) -> tuple[list[dict], list[str]]:
    """Accuracy restricted to the question types the UNPRUNED model answers well (option log-likelihood at
    least `margin` above chance): types it answers at chance say nothing about what pruning removes."""
    base = {r["qtype"]: r for r in by_type if r["method"] == "none"}
    if not base:  # no unpruned row: take each type's best retention-1.0 row
        base = {r["qtype"]: r for r in by_type if r["retention"] == 1.0}
    types = sorted(t for t, r in base.items() if r["loglik_accuracy"] >= r["chance"] + margin)
    out = []
    for key in dict.fromkeys((r["method"], r["retention"]) for r in by_type):
        sel = [r for r in by_type if (r["method"], r["retention"]) == key and r["qtype"] in types]
        n = sum(r["questions"] for r in sel)
        if not n:
            continue
        out.append({"method": key[0], "retention": key[1], "questions": n,
                    "accuracy": sum(r["accuracy"] * r["questions"] for r in sel) / n,
                    "loglik_accuracy": sum(r["loglik_accuracy"] * r["questions"] for r in sel) / n,
                    "types": " ".join(types)})
    _add_relative(out)
    return out, types


# ------------------------------------------------------------------------------------------------ statistics

def rank_correlation(x, y) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None when either side is constant."""
    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = np.argsort(v, kind="mergesort")
        sv = v[order]
        out = np.empty(len(v))
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and sv[j + 1] == sv[i]:
                j += 1
            out[order[i:j + 1]] = (i + j) / 2.0
            i = j + 1
        return out

    if len(x) < 2:
        return None
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def paired_ci(a, b, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of a − b over the same questions and its percentile CI from paired resampling of the questions."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if not n_boot or len(d) == 0:
        return float(d.mean()) if len(d) else 0.0, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for start in range(0, n_boot, 250):  # bounded index blocks
        idx = rng.integers(0, len(d), (min(250, n_boot - start), len(d)))
        means[start:start + idx.shape[0]] = d[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(d.mean()), float(lo), float(hi)


def verdict(lo: float, hi: float) -> str:
    if lo > 0:
        return "better"
    if hi < 0:
        return "worse"
    return "tied"


def add_answer_changed(rows: list[dict], per_question: dict) -> None:
    """answer_changed: share of questions whose greedy answer differs from the unpruned one; residual_rank_corr:
    Spearman correlation of the per-video residual with 'the answer changed' over the questions."""
    base = next((res for (m, _r), res in per_question.items() if m == "none"), None)
    for row in rows:
        res = per_question.get((row["method"], row["retention"]))
        if base is None or res is None:
            continue
        changed = [int(x["text"] != y["text"]) for x, y in zip(res, base)]
        row["answer_changed"] = round(float(np.mean(changed)), 4)
        pairs = [(x["residual"], c) for x, c in zip(res, changed) if x["residual"] is not None]
        corr = rank_correlation([p[0] for p in pairs], [p[1] for p in pairs]) if pairs else None
        row["residual_rank_corr"] = None if corr is None else round(corr, 4)


def paired_rows(per_question: dict, items, n_boot: int, seed: int, key: str = "correct") -> list[dict]:
    """At every retention < 1: IWP (the method named exactly `iwp`) minus every other method, over the same
    questions, with a paired-bootstrap 95 % CI; plus iwp minus iwp_fixed (with any compensation) and minus
    iwp_pcmmr on the questions that need time."""
    out = []
    rets = sorted({r for (_m, r) in per_question if r < 1.0}, reverse=True)
    temporal = np.array([it.qtype in TEMPORAL_QTYPES for it in items])
    for r in rets:
        iwp = per_question.get(("iwp", r))
        if iwp is None:
            continue
        a = np.array([x[key] for x in iwp], dtype=float)
        for (m, rr), res in per_question.items():
            if rr != r or m == "iwp":
                continue
            b = np.array([x[key] for x in res], dtype=float)
            diff, lo, hi = paired_ci(a, b, n_boot, seed)
            out.append({"retention": r, "subset": "all", "method": m, "baseline": is_baseline(m),
                        "iwp": round(float(a.mean()), 4), "other": round(float(b.mean()), 4),
                        "diff": round(diff, 4), "ci_lo": round(lo, 4), "ci_hi": round(hi, 4), "iwp_is": verdict(lo, hi)})
            if parse_method(m)[0] in ("iwp_fixed", "iwp_pcmmr") and temporal.any():
                diff, lo, hi = paired_ci(a[temporal], b[temporal], n_boot, seed)
                out.append({"retention": r, "subset": "temporal", "method": m, "baseline": False,
                            "iwp": round(float(a[temporal].mean()), 4), "other": round(float(b[temporal].mean()), 4),
                            "diff": round(diff, 4), "ci_lo": round(lo, 4), "ci_hi": round(hi, 4),
                            "iwp_is": verdict(lo, hi)})
    return out


def best_baseline_rows(paired: list[dict]) -> list[dict]:
    """Per retention: IWP against the best baseline (non-IWP method, with or without compensation)."""
    out = []
    for r in dict.fromkeys(p["retention"] for p in paired):
        base = [p for p in paired if p["retention"] == r and p["baseline"] and p["subset"] == "all"]
        if not base:
            continue
        best = max(base, key=lambda p: p["other"])
        worst_case = "better than every baseline" if all(p["iwp_is"] == "better" for p in base) else (
            "best or tied with the best" if all(p["iwp_is"] != "worse" for p in base) else "behind a baseline")
        out.append({"retention": r, "iwp": best["iwp"], "best_baseline": best["method"], "best": best["other"],
                    "diff": best["diff"], "ci_lo": best["ci_lo"], "ci_hi": best["ci_hi"],
                    "iwp_vs_best": best["iwp_is"], "iwp_vs_all_baselines": worst_case})
    return out


def sweep_iwp(qa, cfg: QualityConfig, base, log=print) -> tuple[list[dict], dict]:
    """Coordinate sweep of λ, temperature, floor on the validation split (IWP-temporal, retentions 0.25/0.10)."""
    encoded, items = encode_clips(qa, "val", cfg.sweep_videos, cfg.seed, cfg.per_clip, cfg.fmt)
    cache: dict[tuple, float] = {}
    rows = []

    def score(settings) -> float:
        key = (settings.lam, settings.temperature, settings.floor)
        if key not in cache:
            accs = []
            for r in SWEEP_RETENTIONS:
                res, _ = accuracy_rows(qa, encoded, items, [("iwp", r)], settings, cfg.seed, log=lambda m: None)
                accs.append((res[0]["accuracy"], res[0]["loglik_accuracy"]))
            cache[key] = float(np.mean([a for a, _ in accs]))
            rows.append({"lam": settings.lam, "temperature": settings.temperature, "floor": settings.floor,
                         **{f"acc@{r:g}": a for r, (a, _) in zip(SWEEP_RETENTIONS, accs)},
                         **{f"loglik@{r:g}": b for r, (_, b) in zip(SWEEP_RETENTIONS, accs)},
                         "mean_acc": cache[key]})
            log(f"  sweep λ={settings.lam:g} τ={settings.temperature:g} floor={settings.floor:g}: "
                f"mean acc {cache[key]:.3f}")
        return cache[key]

    best = base
    for _round in range(2):
        for knob, values in SWEEP_GRID.items():
            scored = [(score(replace(best, **{knob: v})), -abs(v - getattr(base, knob)), v) for v in values]
            _, _, v = max(scored)              # best accuracy; ties go to the value nearest the default
            best = replace(best, **{knob: v})
    return rows, {"lam": best.lam, "temperature": best.temperature, "floor": best.floor}


# ------------------------------------------------------------------------------------------------ fidelity

def _capture(lm):
    """Forward hooks on every decoder layer's attention and output and on the final norm."""
    store: dict[str, list] = {"attn": [None] * len(lm.layers), "hidden": [None] * len(lm.layers), "final": [None]}
    handles = []

    def hook(kind, i):
        def f(_mod, _inp, out):
            store[kind][i] = (out[0] if isinstance(out, tuple) else out).detach()
        return f

    for i, layer in enumerate(lm.layers):
        handles.append(layer.self_attn.register_forward_hook(hook("attn", i)))
        handles.append(layer.register_forward_hook(hook("hidden", i)))
    handles.append(lm.norm.register_forward_hook(hook("final", 0)))
    return store, handles


def text_after_video(qa, enc, prompt: str) -> int:
    ids = qa.adapter.full_input_ids(enc, prompt)
    last = int(np.nonzero((ids == qa.adapter.video_token_id).cpu().numpy())[0].max())
    return len(ids) - last - 1


def run_states(qa, seq, n_text: int) -> dict:
    import torch

    from actors.attention_bias import prefill_mask

    lm = qa.adapter.language_model
    mask = torch.ones(1, seq.embeds.shape[0], dtype=torch.long)
    if seq.key_bias is not None:  # compensation: the same 4-D float mask the generation loop builds
        mask = prefill_mask(mask, seq.key_bias[None], seq.embeds.dtype)
    store, handles = _capture(lm)
    try:
        with torch.inference_mode():
            lm(inputs_embeds=seq.embeds[None], position_ids=seq.positions[:, None], attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {k: [x[0, -n_text:].float() for x in v] for k, v in store.items()}


def _rel(a, b) -> float:
    return float((a - b).norm() / a.norm().clamp_min(1e-12))


def fidelity_rows(qa, encoded, prompts: list[str], cases, settings, seed: int, model_name: str, log=print) -> list[dict]:
    """Relative error at the text after the video, per layer, against the unpruned sequence (mean over videos)."""
    from actors.splice import PrunedVideo, PruneSpec

    refs, n_texts = [], []
    for enc, prompt in zip(encoded, prompts):
        n = enc.embeds.shape[0]
        import torch

        full = PrunedVideo(torch.arange(n), enc.embeds, n, None, 0.0, 1.0)
        n_text = text_after_video(qa, enc, prompt)
        refs.append(run_states(qa, qa.splice(enc, full, prompt), n_text))
        n_texts.append(n_text)
    rows = []
    for method, r in cases:
        t0, c0 = time.perf_counter(), time.process_time()
        base, comp = parse_method(method)
        spec = PruneSpec(method=base, retention=r, settings=settings, seed=seed, compensation=comp)
        attn, hidden, final, resid = [], [], [], []
        for enc, prompt, ref, n_text in zip(encoded, prompts, refs, n_texts):
            p = qa.prune(enc, spec, prompt)
            st = run_states(qa, qa.splice(enc, p, prompt), n_text)
            attn.append([_rel(a, b) for a, b in zip(ref["attn"], st["attn"])])
            hidden.append([_rel(a, b) for a, b in zip(ref["hidden"], st["hidden"])])
            final.append(_rel(ref["final"][0], st["final"][0]))
            if p.residual is not None:
                resid.append(p.residual)
        a_l = np.mean(attn, axis=0)
        h_l = np.mean(hidden, axis=0)
        rows.append({"model": model_name, "method": method, "retention": r, "videos": len(encoded),
                     "attn_err_mean": round(float(a_l.mean()), 5), "hidden_err_mean": round(float(h_l.mean()), 5),
                     "final_err": round(float(np.mean(final)), 5),
                     "residual_mean": round(float(np.mean(resid)), 5) if resid else None,
                     "attn_err_layers": json.dumps([round(float(x), 5) for x in a_l]),
                     "hidden_err_layers": json.dumps([round(float(x), 5) for x in h_l])})
        log(f"  {model_name}: {method:>15} @ {r:<5g} attn {a_l.mean():.4f}  final {np.mean(final):.4f}  "
            f"({time.perf_counter() - t0:.1f}s)")
    return rows


def natural_clip(seed: int, size: int = 168, frames: int = 16) -> np.ndarray:
    """(frames, size, size, 3) uint8 natural-looking clip: fractal-noise scenery under a sky gradient, a
    panning camera, 2-4 shaded objects moving on their own paths, a little sensor noise. Deterministic."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(np.random.SeedSequence([77, seed]))
    pan = rng.uniform(-1.5, 1.5, size=2)
    margin = int(math.ceil(np.abs(pan).max() * frames)) + 4
    big = size + 2 * margin
    tex = np.zeros((big, big), np.float32)
    for octave in range(5):                                     # fractal noise: sum of smooth octaves
        cell = max(2, big // (3 * 2 ** octave))
        low = rng.random((big // cell + 3, big // cell + 3)).astype(np.float32)
        up = np.asarray(Image.fromarray((low * 255).astype(np.uint8)).resize(
            ((big // cell + 3) * cell, (big // cell + 3) * cell), Image.Resampling.BICUBIC), np.float32)[:big, :big]
        tex += up / 255.0 / (2 ** octave)
    tex = (tex - tex.min()) / max(1e-6, float(tex.max() - tex.min()))
    yy = np.linspace(0, 1, big, dtype=np.float32)[:, None]
    horizon = rng.uniform(0.3, 0.6)
    ground = np.stack([0.35 + 0.3 * tex, 0.45 + 0.35 * tex, 0.25 + 0.2 * tex], -1)       # greenish-brown field
    ground *= rng.uniform(0.8, 1.2, 3).astype(np.float32)
    sky = np.stack([0.55 + 0.3 * yy, 0.7 + 0.2 * yy, 0.95 - 0.1 * yy], -1) * np.ones((1, big, 1), np.float32)
    sky = sky + 0.08 * tex[..., None]
    w = np.clip((yy - horizon) * 12 + 0.5, 0, 1)[..., None]
    scene = (sky * (1 - w) + ground * w) * 255.0
    objs = []
    for _ in range(int(rng.integers(2, 5))):
        objs.append(dict(c=rng.uniform(30, 240, 3), r=rng.uniform(0.06, 0.16) * size, a=rng.uniform(0.6, 1.6),
                         p=rng.uniform(0.15, 0.85, 2) * size, v=rng.uniform(-3, 3, 2)))
    out = np.empty((frames, size, size, 3), np.uint8)
    gy, gx = np.mgrid[0:size, 0:size].astype(np.float32)
    for t in range(frames):
        ox = int(round(margin + pan[0] * (t - frames / 2)))
        oy = int(round(margin + pan[1] * (t - frames / 2)))
        img = scene[oy:oy + size, ox:ox + size].copy()
        for o in objs:
            cx, cy = o["p"] + o["v"] * t
            d = ((gx - cx) / (o["r"] * o["a"])) ** 2 + ((gy - cy) / (o["r"] / o["a"])) ** 2
            m = np.clip((1.0 - d) * 4, 0, 1)[..., None]                                 # soft edge
            shade = (1.1 - 0.4 * np.clip((gy - cy + o["r"]) / (2 * o["r"]), 0, 1))[..., None]
            img = img * (1 - m) + np.clip(o["c"] * shade, 0, 255) * m
        img += rng.normal(0, 2.0, img.shape)
        out[t] = np.clip(img, 0, 255).astype(np.uint8)
    blurred = [np.asarray(Image.fromarray(f).filter(ImageFilter.GaussianBlur(0.6))) for f in out]
    return np.stack(blurred)


def big_model_fidelity(cfg: QualityConfig, cases, settings, log=print) -> list[dict]:
    import torch

    from actors.model_shapes import build_model
    from bench.qa_scoring import QAModel

    log(f"building a random-weight Qwen2.5-VL-7B-shaped model with {cfg.big_layers} LLM layers and "
        f"{cfg.big_layers} vision blocks (CPU, float32) ...")
    built = build_model("qwen2_5_vl", "7b", device=torch.device("cpu"), dtype=torch.float32, layers=cfg.big_layers,
                        vision_layers=cfg.big_layers, resolution=cfg.big_resolution, attn="eager", seed=cfg.seed)
    qa = QAModel(built.model, built.processor)
    clips = [natural_clip(cfg.seed * 1000 + i, cfg.big_resolution) for i in range(cfg.big_videos)]
    encoded = qa.encode(clips, [[i / 8 for i in range(len(c))] for c in clips])
    prompts = ["Describe this video."] * len(encoded)
    name = f"qwen2_5_vl-7b-shape-L{cfg.big_layers}-random"
    rows = fidelity_rows(qa, encoded, prompts, cases, settings, cfg.seed, name, log=log)
    del qa, built
    return rows


# ------------------------------------------------------------------------------------------------ outputs

def write_csv(path: Path, rows: list[dict], columns=None) -> Path:
    columns = list(columns or (rows[0].keys() if rows else []))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in columns})
    return path


def print_tsv(rows: list[dict], columns) -> None:
    """The rows as a tab-separated table on stdout (what the bench scripts print beside their CSV)."""
    print("\t".join(columns))
    for r in rows:
        print("\t".join(str(r[c]) for c in columns))


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def accuracy_table(rows: list[dict], key: str = "accuracy", relative: bool = False) -> str:
    """Methods x retentions (%), the best pruned cell of each retention in bold; with `relative`, each pruned
    cell followed by (% of the unpruned value)."""
    base = next((r[key] for r in rows if r["method"] == "none"), None)
    rets = sorted({r["retention"] for r in rows}, reverse=True)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    best = {ret: max((r[key] for r in rows if r["retention"] == ret and r["method"] != "none"), default=None)
            for ret in rets if ret < 1.0}
    lines = ["| method | " + " | ".join(f"{r:g}" for r in rets) + " |", "|---|" + "---:|" * len(rets)]
    for m in methods:
        cells = []
        for ret in rets:
            x = next((r[key] for r in rows if r["method"] == m and r["retention"] == ret), None)
            if x is None:
                cells.append("")
                continue
            s = _pct(x) + (f" ({100 * x / base:.0f})" if relative and base and ret < 1.0 else "")
            cells.append(f"**{s}**" if ret < 1.0 and best.get(ret) is not None and x == best[ret] else s)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fidelity_table(rows: list[dict], key: str = "final_err") -> str:
    if not rows:
        return ""
    rets = sorted({r["retention"] for r in rows}, reverse=True)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = ["| method | " + " | ".join(f"{r:g}" for r in rets) + " |", "|---|" + "---:|" * len(rets)]
    for m in methods:
        cells = [next((f"{r[key]:.3f}" for r in rows if r["method"] == m and r["retention"] == ret), "")
                 for ret in rets]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


_STYLE = {"iwp": dict(color="black", lw=2.6, marker="o"), "iwp_fixed": dict(color="0.35", lw=1.6, ls="--", marker="o"),
          "iwp_magnitude": dict(color="0.55", lw=1.2, ls=":", marker="o"),
          "iwp_duplication": dict(color="0.55", lw=1.2, ls="-.", marker="o")}


def _retention_axis(ax, rets) -> None:
    from matplotlib.ticker import NullFormatter, NullLocator

    ax.set_xscale("log")
    ax.set_xticks(rets)
    ax.set_xticklabels([f"{r:g}" for r in rets])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_accuracy(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=80)
    base = next((r for r in rows if r["method"] == "none"), None)
    for ax, key, label in ((axes[0], "accuracy", "greedy exact match"), (axes[1], "loglik_accuracy", "option log-likelihood")):
        for m in dict.fromkeys(r["method"] for r in rows):
            if m == "none":
                continue
            pts = sorted((r["retention"], r[key]) for r in rows if r["method"] == m)
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], label=m, ms=3.5,
                    **_STYLE.get(m, dict(lw=1.1, marker=".")))
        if base:
            ax.axhline(100 * base[key], color="tab:green", lw=0.8, ls="--", label="unpruned")
        _retention_axis(ax, sorted({r["retention"] for r in rows}))
        ax.set_xlabel("retention (kept visual tokens / all)")
        ax.set_ylabel(f"accuracy % ({label})")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_fidelity(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(5.5 * max(1, len(models)), 4.2), dpi=80, squeeze=False)
    for ax, model in zip(axes[0], models):
        sel = [r for r in rows if r["model"] == model and r["retention"] < 1.0]
        for m in dict.fromkeys(r["method"] for r in sel):
            pts = sorted((r["retention"], r["attn_err_mean"]) for r in sel if r["method"] == m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=m, ms=3.5, **_STYLE.get(m, dict(lw=1.1, marker=".")))
        _retention_axis(ax, sorted({r["retention"] for r in sel}))
        ax.set_xlabel("retention")
        ax.set_ylabel("attention-output relative error")
        ax.set_title(f"{model}: text after the video, mean over layers", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def by_type_table(by_type: list[dict], key: str = "accuracy") -> str:
    """(method @ retention) x question type (%), the question count of each type in the last row."""
    types = sorted({r["qtype"] for r in by_type})
    lines = ["| method @ retention | " + " | ".join(types) + " |", "|---|" + "---:|" * len(types)]
    for m, ret in dict.fromkeys((r["method"], r["retention"]) for r in by_type):
        cells = [next((_pct(r[key]) for r in by_type if (r["method"], r["retention"], r["qtype"]) == (m, ret, t)), "")
                 for t in types]
        lines.append(f"| {m} @ {ret:g} | " + " | ".join(cells) + " |")
    first = next(iter(dict.fromkeys((r["method"], r["retention"]) for r in by_type)), None)
    counts = [next((str(r["questions"]) for r in by_type if (r["method"], r["retention"], r["qtype"]) == (*first, t)),
                   "") for t in types] if first else []
    lines.append("| (questions) | " + " | ".join(counts) + " |")
    return "\n".join(lines)


def paired_table(paired: list[dict]) -> str:
    lines = ["| retention | questions | other method | iwp % | other % | iwp − other (95 % CI), points | iwp is |",
             "|---:|---|---|---:|---:|---|---|"]
    for p in paired:
        lines.append(f"| {p['retention']:g} | {p['subset']} | {p['method']} | {_pct(p['iwp'])} | {_pct(p['other'])} | "
                     f"{100 * p['diff']:+.1f} ({100 * p['ci_lo']:+.1f}, {100 * p['ci_hi']:+.1f}) | {p['iwp_is']} |")
    return "\n".join(lines)


def write_markdown(path: Path, cfg: QualityConfig, acc: list[dict], fid: list[dict], sweep: list[dict],
                   chosen: dict, meta: dict, by_type: list[dict] | None = None, paired: list[dict] | None = None,
                   paired_loglik: list[dict] | None = None) -> Path:
    path.write_text(markdown_text(cfg, acc, fid, sweep, chosen, meta, by_type, paired, paired_loglik))
    return path


def markdown_text(cfg: QualityConfig, acc: list[dict], fid: list[dict], sweep: list[dict], chosen: dict, meta: dict,
                  by_type: list[dict] | None = None, paired: list[dict] | None = None,
                  paired_loglik: list[dict] | None = None) -> str:
    """One model's report: its accuracy tables, paired comparisons, per-type table, fidelity and sweep."""
    by_type = by_type or []
    paired = paired or []
    lines = [f"# Quality benchmark ({meta['model_name']})", "",
             f"Command: `{meta['command']}`", "",
             f"Test split: {cfg.videos} clips x {cfg.per_clip} questions ({cfg.fmt} format), seed {cfg.seed}; "
             f"IWP settings λ={chosen['lam']:g}, temperature={chosen['temperature']:g}, floor={chosen['floor']:g}.", ""]
    if acc:
        n_q = acc[0]["questions"]
        n_count = sum(r["questions"] for r in by_type if r["qtype"] == "count" and r["method"] == acc[0]["method"]
                      and r["retention"] == acc[0]["retention"])
        se = 100 * math.sqrt(0.25 / max(1, n_q))
        lines += [f"{n_q} questions per (method, retention), {n_count} of them counting; one standard error of an "
                  f"accuracy is at most {se:.1f} points. `+bias`: log-count attention bias (mass compensation), "
                  "`+bias+merge`: and the size-weighted merged embedding.", "",
                  "## Accuracy (greedy exact match, %)", "", accuracy_table(acc, "accuracy", relative=True), "",
                  "## Accuracy (option log-likelihood, %)", "", accuracy_table(acc, "loglik_accuracy", relative=True), ""]
        if paired:
            best = best_baseline_rows(paired)
            lines += ["## IWP against the best baseline (greedy; paired bootstrap over the same questions)", "",
                      "| retention | iwp % | best baseline | its % | iwp − best (95 % CI), points | iwp vs best | "
                      "iwp vs every baseline |", "|---:|---:|---|---:|---|---|---|"]
            for b in best:
                lines.append(f"| {b['retention']:g} | {_pct(b['iwp'])} | {b['best_baseline']} | {_pct(b['best'])} | "
                             f"{100 * b['diff']:+.1f} ({100 * b['ci_lo']:+.1f}, {100 * b['ci_hi']:+.1f}) | "
                             f"{b['iwp_vs_best']} | {b['iwp_vs_all_baselines']} |")
            lines += ["", "## IWP minus every other method (greedy, paired bootstrap 95 % CI; `temporal`: only the "
                      f"questions that need time: {', '.join(TEMPORAL_QTYPES)})", "", paired_table(paired), ""]
        if paired_loglik:
            lines += ["## IWP minus every other method (option log-likelihood)", "", paired_table(paired_loglik), ""]
        corr = [r for r in acc if r.get("residual_rank_corr") is not None]
        if corr:
            lines += ["## Does the residual predict a changed answer?", "",
                      "Spearman rank correlation of the per-video residual (of what the LLM sees) with 'the greedy "
                      "answer differs from the unpruned one', over the questions:", "",
                      "| method | retention | answers changed % | rank correlation |", "|---|---:|---:|---:|"]
            lines += [f"| {r['method']} | {r['retention']:g} | {_pct(r['answer_changed'])} | "
                      f"{r['residual_rank_corr']:+.3f} |" for r in corr]
            lines.append("")
        if by_type:
            lines += ["## Accuracy per question type (greedy, %)", "", by_type_table(by_type), ""]
        ans, types = answerable_rows(by_type)
        if ans:
            lines += [f"## Accuracy on the question types the unpruned model answers (option log-likelihood >= "
                      f"chance + {100 * ANSWERABLE_MARGIN:.0f} points: {', '.join(types)}; {ans[0]['questions']} "
                      f"questions), % (in brackets: % of unpruned)", "",
                      "Option log-likelihood:", "", accuracy_table(ans, "loglik_accuracy", relative=True), "",
                      "Greedy exact match:", "", accuracy_table(ans, "accuracy", relative=True), ""]
    for model in dict.fromkeys(r["model"] for r in fid):
        sel = [r for r in fid if r["model"] == model]
        lines += [f"## Fidelity: {model} ({sel[0]['videos']} videos)", "",
                  "Attention-output relative error at the text after the video, mean over layers:", "",
                  fidelity_table(sel, "attn_err_mean"), "", "Final hidden state relative error:", "",
                  fidelity_table(sel, "final_err"), ""]
    if sweep:
        keys = list(sweep[0].keys())
        lines += ["## IWP sweep (validation split, iwp @ 0.25 and 0.10)", "",
                  "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for s in sweep:
            lines.append("| " + " | ".join(f"{s[k]:.3f}" if isinstance(s[k], float) else str(s[k]) for k in keys) + " |")
        lines += ["", f"Chosen: {chosen}", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ run

def model_quality(cfg: QualityConfig, model_path: str, base, cases, log=print) -> dict:
    """Accuracy (and the trained model's fidelity, the optional sweep) of one model on the test clips; every
    row carries the model's name."""
    fid_cases = [(m, r) for m, r in cases if r < 1.0]
    model_name = Path(model_path).name
    qa = load_qa(model_path, cfg.threads)
    sweep, chosen = [], {"lam": base.lam, "temperature": base.temperature, "floor": base.floor}
    if cfg.sweep_videos:
        log(f"{model_name}: sweeping IWP settings on {cfg.sweep_videos} validation clips ...")
        sweep, chosen = sweep_iwp(qa, cfg, base, log=log)
        log(f"chosen IWP settings: {chosen} (defaults: lam={base.lam}, temperature={base.temperature}, "
            f"floor={base.floor})")
    settings = replace(base, **chosen)
    log(f"{model_name}: accuracy on {cfg.videos} test clips, {len(cases)} method x retention cases ...")
    encoded, items = encode_clips(qa, "test", cfg.videos, cfg.seed, cfg.per_clip, cfg.fmt, count_every=cfg.count_every)
    per_question: dict = {}
    acc, by_type = accuracy_rows(qa, encoded, items, cases, settings, cfg.seed, log=log, per_question=per_question)
    add_answer_changed(acc, per_question)
    paired = paired_rows(per_question, items, cfg.bootstrap, cfg.seed)
    paired_loglik = paired_rows(per_question, items, cfg.bootstrap, cfg.seed, key="loglik_correct")
    for r in acc:
        r.update(model=model_name, split="test", format=cfg.fmt, seed=cfg.seed, **chosen)
    for r in by_type + paired + paired_loglik:
        r["model"] = model_name
    for r in paired:
        r["score"] = "accuracy"
    for r in paired_loglik:
        r["score"] = "loglik_accuracy"
    fid = []
    if cfg.fidelity_videos:
        n = min(cfg.fidelity_videos, len(encoded))
        prompts = [next(it.prompt for it in items if it.video == i) for i in range(n)]
        log(f"fidelity: {model_name}, {n} test clips ...")
        fid = fidelity_rows(qa, encoded[:n], prompts, fid_cases, settings, cfg.seed, model_name, log=log)
    return {"model": model_name, "path": model_path, "accuracy": acc, "by_type": by_type, "fidelity": fid,
            "sweep": sweep, "chosen": chosen, "paired": paired, "paired_loglik": paired_loglik}


def _with_model(rows: list[dict], model: str) -> list[dict]:
    return [{"model": model, **r} for r in rows]


def run_quality(cfg: QualityConfig, log=print, command: str = "") -> dict:
    import torch

    from iwp import IWPSettings

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    defaults = IWPSettings(seed=cfg.seed)
    base = replace(defaults, **{k: getattr(cfg, k) for k in ("lam", "temperature", "floor") if getattr(cfg, k) is not None})
    cases = _cases(cfg.methods, cfg.retentions)
    per_model = [model_quality(cfg, path, base, cases, log=log) for path in cfg.model_paths()] if cfg.videos else []
    chosen = per_model[0]["chosen"] if per_model else {"lam": base.lam, "temperature": base.temperature,
                                                       "floor": base.floor}
    big_fid = []
    if cfg.big_videos:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        big_fid = big_model_fidelity(cfg, [(m, r) for m, r in cases if r < 1.0], replace(base, **chosen), log=log)

    def joined(key: str) -> list[dict]:
        return [r for m in per_model for r in m[key]]

    acc, by_type, paired, paired_loglik = (joined(k) for k in ("accuracy", "by_type", "paired", "paired_loglik"))
    sweep = [r for m in per_model for r in (_with_model(m["sweep"], m["model"]) if len(per_model) > 1 else m["sweep"])]
    fid = joined("fidelity") + big_fid
    if acc:
        write_csv(out / "accuracy.csv", acc, ACCURACY_COLUMNS)
        write_csv(out / "accuracy_by_type.csv", by_type,
                  ("model", "method", "retention", "qtype", "questions", "accuracy", "loglik_accuracy", "chance"))
        if paired:
            write_csv(out / "paired.csv", paired + paired_loglik,
                      ("model", "score", "retention", "subset", "method", "baseline", "iwp", "other", "diff", "ci_lo",
                       "ci_hi", "iwp_is"))
            write_csv(out / "iwp_vs_best.csv",
                      [r for m in per_model for r in _with_model(best_baseline_rows(m["paired"]), m["model"])])
        answerable = [r for m in per_model for r in _with_model(answerable_rows(m["by_type"])[0], m["model"])]
        if answerable:
            write_csv(out / "accuracy_answerable.csv", answerable)
        for i, m in enumerate(per_model):  # the first model's plot keeps its name; further models' carry theirs
            plot_accuracy(m["accuracy"], out / ("accuracy.png" if i == 0 else f"accuracy-{m['model']}.png"),
                          f"{m['model']}: synthetic temporal video-QA test ({cfg.videos} clips x {cfg.per_clip} q, "
                          f"{cfg.fmt})")
    if sweep:
        write_csv(out / "sweep.csv", sweep)
    if fid:
        write_csv(out / "fidelity.csv", fid, FIDELITY_COLUMNS)
        plot_fidelity(fid, out / "fidelity.png")
    command = command or "framescribe bench quality"
    if len(per_model) <= 1:
        m = per_model[0] if per_model else None
        meta = {"model_name": m["model"] if m else "random-7b-shape", "command": command}
        md = write_markdown(out / "quality.md", cfg, acc, fid, sweep, chosen, meta, by_type, paired, paired_loglik)
    else:  # one report per model, the 7B-shaped fidelity once at the end
        parts = [markdown_text(cfg, m["accuracy"], m["fidelity"] + (big_fid if i == len(per_model) - 1 else []),
                               m["sweep"], m["chosen"], {"model_name": m["model"], "command": command}, m["by_type"],
                               m["paired"], m["paired_loglik"]) for i, m in enumerate(per_model)]
        md = out / "quality.md"
        md.write_text("\n".join(parts))
    paths = [m["path"] for m in per_model]
    (out / "config.json").write_text(json.dumps({**{k: (str(v) if isinstance(v, Path) else v)
                                                     for k, v in asdict(cfg).items()},
                                                 "model": repo_relative(paths[0]) if paths else None,
                                                 **({"models": [repo_relative(p) for p in paths]} if cfg.models else {}),
                                                 "iwp_settings": chosen, "torch": torch.__version__}, indent=2))
    return {"accuracy": acc, "by_type": by_type, "fidelity": fid, "sweep": sweep, "chosen": chosen, "markdown": md,
            "paired": paired, "models": [m["model"] for m in per_model]}


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(x) for x in s.split(",") if x.strip())


def _names(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def command(
    model: Optional[str] = typer.Option(None, help="trained model directory (default: the shipped synthetic-QA model)"),
    models: str = typer.Option("", help="several models in one run, comma-separated: shipped (128 visual tokens "
                                        "per clip), shipped-168 (288), or model directories; tables per model"),
    seed: int = typer.Option(0, help="seed of the test clips, the random pruner and the 7B-shaped model"),
    videos: int = typer.Option(200, help="test clips for accuracy (0: only the 7B-shaped fidelity)"),
    per_clip: int = typer.Option(3, help="questions per clip"),
    fmt: str = typer.Option("mc", "--format", help="question format: mc | short"),
    retentions: str = typer.Option(",".join(f"{r:g}" for r in DEFAULT_RETENTIONS), help="comma-separated"),
    methods: str = typer.Option("", help="comma-separated pruners, `+bias` / `+merge` / `+bias+merge` for mass "
                                         "compensation (default: every pruner, and the main ones +bias)"),
    out: Path = typer.Option(Path("bench-out/quality"), help="directory for CSV, Markdown and PNG"),
    fidelity_videos: int = typer.Option(16, help="test clips for the trained model's fidelity (0: skip)"),
    big_videos: int = typer.Option(2, help="natural-looking clips for the 7B-shaped random model (0: skip)"),
    big_layers: int = typer.Option(2, help="LLM layers (and vision blocks) of the 7B-shaped model"),
    big_resolution: int = typer.Option(168, help="frame side for the 7B-shaped model (multiple of 28)"),
    sweep_videos: int = typer.Option(0, help="validation clips for the IWP λ/temperature/floor sweep (0: no sweep)"),
    lam: Optional[float] = typer.Option(None, help="IWP λ (default: iwp.IWPSettings)"),
    temperature: Optional[float] = typer.Option(None, help="IWP temperature"),
    floor: Optional[float] = typer.Option(None, help="IWP per-chunk floor"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    count_every: int = typer.Option(1, help="every k-th clip asks its counting question first (0: no forcing)"),
    bootstrap: int = typer.Option(2000, help="paired-bootstrap resamples for the confidence intervals"),
):
    """Accuracy (synthetic temporal video-QA) and attention-output fidelity of every pruner x retention."""
    import sys

    from rich.console import Console

    err = Console(stderr=True)
    try:
        cfg = QualityConfig(model=model, models=_names(models), seed=seed, videos=videos, per_clip=per_clip, fmt=fmt,
                            retentions=_floats(retentions), methods=_names(methods), out=out,
                            fidelity_videos=fidelity_videos, big_videos=big_videos, big_layers=big_layers,
                            big_resolution=big_resolution, sweep_videos=sweep_videos, lam=lam,
                            temperature=temperature, floor=floor, threads=threads, count_every=count_every,
                            bootstrap=bootstrap)
        if cfg.videos:
            cfg.model_paths()
    except (ValueError, FileNotFoundError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    res = run_quality(cfg, log=lambda m: err.print(m), command="framescribe bench quality " + " ".join(sys.argv[3:]))
    for name in res["models"]:
        rows = [r for r in res["accuracy"] if r["model"] == name]
        title = f" of {name}" if len(res["models"]) > 1 else ""
        print(f"{'' if name == res['models'][0] else chr(10)}Accuracy{title} (greedy exact match, %)\n")
        print(accuracy_table(rows, "accuracy"))
        print(f"\nAccuracy{title} (option log-likelihood, %)\n")
        print(accuracy_table(rows, "loglik_accuracy"))
    for model_name in dict.fromkeys(r["model"] for r in res["fidelity"]):
        print(f"\nFidelity ({model_name}): attention-output relative error, mean over layers\n")
        print(fidelity_table([r for r in res["fidelity"] if r["model"] == model_name], "attn_err_mean"))
    err.print(f"wrote {Path(cfg.out).resolve()}: "
              f"{'accuracy.csv, accuracy_by_type.csv, accuracy.png, ' if res['accuracy'] else ''}"
              f"{'fidelity.csv, fidelity.png, ' if res['fidelity'] else ''}quality.md")
