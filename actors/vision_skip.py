"""Which temporal groups of a video repeat an earlier one, decided from the uint8 frames before the vision tower.

Qwen2.5-VL's vision tower attends only within one temporal group (its cu_seqlens are per grid_t) and
LLaVA-OneVision's SigLIP within one frame, so a group whose pixels repeat an earlier group's can take that
group's embeddings instead of running the tower: exactly when the pixels are identical, approximately when
they are near-identical. IWP then sees the copies as exact duplicates and keeps only the floor of them.
"""
from __future__ import annotations

import numpy as np
import torch

# Mean absolute difference (0-255 scale, on a ~32 px downscaled copy) at or below which a group counts as a
# repeat of the last encoded group. Measured (docs/benchmarks.md, "Vision skip"): a still scene through h264
# differs by <= 0.1 between groups, a still scene with two small (1/16 side) moving objects by 0.13-0.64, a
# camera pan or a large (1/4 side) moving object by >= 5.6: 1.0 skips the first two and never the last two.
DEFAULT_SKIP_THRESHOLD = 1.0
DOWNSCALE_SIDE = 32  # the short side of the copy the difference is taken on


def downscaled(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 → (T, 3, h, w) float32 block means with h ≈ DOWNSCALE_SIDE (cheap, noise-averaging)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    k = max(1, min(x.shape[-2:]) // DOWNSCALE_SIDE)
    return torch.nn.functional.avg_pool2d(x, k, ceil_mode=True) if k > 1 else x


def downscaled_groups(frames: np.ndarray, group: int) -> torch.Tensor:
    """(G, group, 3, h, w): the downscaled frames in temporal groups; the frame count is padded with the last
    frame to a multiple of `group`, as the Qwen processor does."""
    small = downscaled(frames)
    pad = (-small.shape[0]) % group
    if pad:
        small = torch.cat([small, small[-1:].expand(pad, *small.shape[1:])])
    return small.view(-1, group, *small.shape[1:])


def group_differences(frames: np.ndarray, group: int) -> list[float]:
    """Mean absolute difference of every temporal group to the previous group (the first: inf)."""
    groups = downscaled_groups(frames, group)
    diffs = (groups[1:] - groups[:-1]).abs().flatten(1).mean(1)
    return [float("inf")] + diffs.tolist()


def repeat_sources(frames: np.ndarray, group: int, threshold: float | None) -> list[int]:
    """For each temporal group, the group whose embeddings it uses: itself when it is encoded, else the last
    encoded group, when the mean absolute difference to that group is <= threshold (None: every group is encoded)."""
    groups = downscaled_groups(frames, group)
    sources: list[int] = []
    last = 0
    for g in range(groups.shape[0]):
        # compared with the last ENCODED group, so slow drift cannot chain many small steps into a big one
        if g > 0 and threshold is not None and float((groups[g] - groups[last]).abs().mean()) <= threshold:
            sources.append(last)
        else:
            sources.append(g)
            last = g
    return sources


def encoded_groups(sources: list[int]) -> list[int]:
    """The groups that run through the tower, in order."""
    return [g for g, s in enumerate(sources) if s == g]


def expand_groups(encoded: torch.Tensor, sources: list[int]) -> torch.Tensor:
    """(E, P, D) embeddings of the encoded groups → (G·P, D) for all groups, copies placed at their own positions."""
    slot = {g: i for i, g in enumerate(encoded_groups(sources))}
    index = torch.tensor([slot[s] for s in sources], device=encoded.device)
    return encoded.index_select(0, index).reshape(-1, encoded.shape[-1])
