"""Selection cost, matrix form vs the elementwise reference, and whether their picks agree.

`python -m bench.pcmmr_form [--device cuda] [--selection pcmmr|cover]` prints one line per batch with the
median time of a whole selection (7B shapes: 4 KV heads × 128, N = 2048 tokens in 8 groups, 25 % kept) in
both forms and the share of videos whose picks equal the elementwise form's. `pcmmr`: the lockstep batched
PC-MMR (`iwp_pcmmr`); `cover`: the shipped IWP selection (`iwp.cover`, one video at a time). Needs only
PyTorch (and this repo's `iwp`).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from iwp import IWPSettings, TokenLayout, budget_for, select_tokens_pcmmr_batch
from iwp.cover import select_tokens_cover


def random_videos(batch: int, groups: int, per_group: int, heads: int, head_dim: int, seed: int, device):
    g = torch.Generator().manual_seed(seed)
    n = groups * per_group
    keys = [(torch.randn(n, heads, head_dim, generator=g) * 2.0).to(device) for _ in range(batch)]
    values = [torch.randn(n, heads, head_dim, generator=g).to(device) for _ in range(batch)]
    return keys, values, [TokenLayout((per_group,) * groups)] * batch


def select(keys, values, layouts, budgets, form: str, selection: str) -> list:
    if selection == "pcmmr":
        return select_tokens_pcmmr_batch(keys, values, layouts, budgets, IWPSettings(), form=form)
    return [select_tokens_cover(k, v, lay, b, IWPSettings(), form=form)
            for k, v, lay, b in zip(keys, values, layouts, budgets)]


def time_selection(keys, values, layouts, budgets, form: str, repeats: int, device, selection: str = "pcmmr"
                   ) -> tuple[float, list]:
    # CPU: this process's CPU time on one thread (a shared machine's load does not leak in); GPU: wall clock
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    times, picks = [], None
    for _ in range(repeats + 1):  # the first call warms up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = clock()
        picks = select(keys, values, layouts, budgets, form, selection)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((clock() - t0) * 1e3)
    return statistics.median(times[1:]), picks


def run(device: str = "cpu", batches=(1, 4), repeats: int = 3, groups: int = 8, per_group: int = 256,
        heads: int = 4, head_dim: int = 128, retention: float = 0.25, seed: int = 0, selection: str = "pcmmr",
        log=print) -> list[dict]:
    dev = torch.device(device)
    if dev.type == "cpu":
        torch.set_num_threads(1)
    rows = []
    for batch in batches:
        keys, values, layouts = random_videos(batch, groups, per_group, heads, head_dim, seed, dev)
        budgets = [budget_for(layout.n_tokens, retention) for layout in layouts]
        ms_e, ref = time_selection(keys, values, layouts, budgets, "elementwise", repeats, dev, selection)
        ms_m, got = time_selection(keys, values, layouts, budgets, "matrix", repeats, dev, selection)
        same = sum(a.tolist() == b.tolist() for a, b in zip(ref, got)) / batch
        row = {"device": device, "selection": selection, "batch": batch, "tokens": groups * per_group, "picks": budgets[0],
               "elementwise_ms": round(ms_e, 1), "matrix_ms": round(ms_m, 1),
               "speedup": round(ms_e / ms_m, 2), "same_picks": same}
        log(row)
        rows.append(row)
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokens-per-group", type=int, default=256)
    p.add_argument("--batches", default="1,4")
    p.add_argument("--selection", choices=("pcmmr", "cover"), default="pcmmr")
    a = p.parse_args()
    run(a.device, tuple(int(x) for x in a.batches.split(",")), a.repeats, per_group=a.tokens_per_group,
        selection=a.selection)
