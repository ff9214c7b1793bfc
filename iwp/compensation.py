"""Mass compensation: give every kept token the attention mass of the pruned tokens it stands for.

Pruning drops rank-1 terms v_j φ(k_j)ᵀ from the implicit weight W. Each pruned token is assigned to the
kept token it duplicates most (the IWP duplication kernel, globally or within its temporal chunk); a kept
token then stands for m_i tokens (itself + its assigned ones). The LLM sees log m_i as an additive bias
on that key's attention logits: for m identical copies Σ exp(q·k)v = exp(q·k + log m)v, exactly
(ToMe's proportional attention). Optionally the kept token's embedding is replaced by the size-weighted
mean of the tokens it stands for ("merge").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import TokenLayout
from .metric import DenseDuplication, token_features
from .registry import ASSIGNMENTS, COMPENSATIONS
from .settings import IWPSettings

_ASSIGN_BLOCK = 4096  # pruned tokens scored against the kept set per block


def uses_bias(compensation: str) -> bool:
    return compensation in ("bias", "bias+merge")


def uses_merge(compensation: str) -> bool:
    return compensation in ("merge", "bias+merge")


def check_compensation(compensation: str, assignment: str = "global") -> None:
    if compensation not in COMPENSATIONS:
        raise ValueError(f"compensation must be one of {COMPENSATIONS}, got {compensation!r}")
    if assignment not in ASSIGNMENTS:
        raise ValueError(f"compensation assignment must be one of {ASSIGNMENTS}, got {assignment!r}")


@dataclass
class Compensation:
    owner: torch.Tensor  # (N,) index into keep (0..K-1) of the kept token each visual token is counted in
    counts: torch.Tensor  # (K,) float32 m_i = tokens kept token i stands for (>= 1, sums to N)

    @property
    def log_counts(self) -> torch.Tensor:
        return self.counts.log()


def assign_to_kept(
    keys: torch.Tensor,
    values: torch.Tensor,
    keep: torch.Tensor,
    settings: IWPSettings = IWPSettings(),
    layout: TokenLayout | None = None,
    assignment: str = "global",
    duplication: torch.Tensor | None = None,
) -> Compensation:
    """Assign every pruned token to the kept token of highest IWP duplication (ties: the earlier kept token).

    assignment="chunk" only looks at kept tokens of the pruned token's temporal chunk (falling back to all
    kept tokens when its chunk kept none). `duplication`: the video's (N, N) duplication matrix when the
    selection already built it (`PruneResult.duplication`); otherwise the needed block is computed in matrix form.
    """
    check_compensation("none", assignment)
    n = keys.shape[0]
    keep = torch.as_tensor(keep, device=keys.device).long()
    k = keep.numel()
    if k < 1:
        raise ValueError("compensation needs at least one kept token")
    owner = torch.empty(n, dtype=torch.long, device=keys.device)
    owner[keep] = torch.arange(k, device=keys.device)
    dropped = torch.ones(n, dtype=torch.bool, device=keys.device)
    dropped[keep] = False
    dropped_idx = torch.nonzero(dropped).flatten()
    if dropped_idx.numel():
        chunk_of = layout.chunk_ids(keys.device) if (layout is not None and assignment == "chunk") else None
        kernel = DenseDuplication(token_features(keys, values, settings)) if duplication is None else None
        for start in range(0, dropped_idx.numel(), _ASSIGN_BLOCK):
            rows = dropped_idx[start : start + _ASSIGN_BLOCK]
            dup = kernel.block(rows, keep) if kernel is not None else duplication[rows][:, keep]  # (R, K)
            if chunk_of is not None:
                same = chunk_of[rows][:, None] == chunk_of[keep][None, :]
                has_any = same.any(dim=1, keepdim=True)
                dup = dup.masked_fill(~same & has_any, float("-inf"))
            owner[rows] = dup.argmax(dim=1)
    counts = torch.bincount(owner, minlength=k).float()
    return Compensation(owner=owner, counts=counts)


def merged_embeddings(embeds: torch.Tensor, comp: Compensation) -> torch.Tensor:
    """(K, D) size-weighted mean of the original embeddings each kept token stands for (every token has size 1)."""
    x = embeds.float()
    sums = x.new_zeros((comp.counts.numel(), x.shape[1]))
    sums.index_add_(0, comp.owner, x)
    return (sums / comp.counts.unsqueeze(1)).to(embeds.dtype)
