"""Where the visual tokens of one video sit: temporal chunks, their grid, and the token budget."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLayout:
    """Visual tokens of one video split into temporal groups, in sequence order."""

    chunk_sizes: tuple[int, ...]  # visual tokens per temporal group; sum == N
    grid_hw: tuple[int, int] | None = None  # (h, w) token grid shared by every chunk; h*w == chunk size

    def __post_init__(self) -> None:
        sizes = tuple(int(s) for s in self.chunk_sizes)
        object.__setattr__(self, "chunk_sizes", sizes)  # accept lists, keep the dataclass hashable
        if not sizes:
            raise ValueError("TokenLayout needs at least one chunk")
        if any(s < 1 for s in sizes):
            raise ValueError(f"chunk sizes must be >= 1, got {sizes}")
        if self.grid_hw is not None:
            h, w = (int(x) for x in self.grid_hw)
            object.__setattr__(self, "grid_hw", (h, w))
            if h < 1 or w < 1 or any(s != h * w for s in sizes):
                raise ValueError(f"grid_hw {self.grid_hw} does not match every chunk size {sizes}")

    @property
    def n_tokens(self) -> int:
        return sum(self.chunk_sizes)

    @property
    def n_chunks(self) -> int:
        return len(self.chunk_sizes)

    def chunk_ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Chunk index of every token, shape (N,)."""
        sizes = torch.tensor(self.chunk_sizes, dtype=torch.long, device=device)
        return torch.repeat_interleave(torch.arange(self.n_chunks, device=device), sizes)

    def chunk_starts(self) -> list[int]:
        """Index of the first token of every chunk."""
        starts, total = [], 0
        for size in self.chunk_sizes:
            starts.append(total)
            total += size
        return starts


def budget_for(n_tokens: int, retention: float) -> int:
    """K = ceil(retention * N), clamped to [1, N]."""
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    if not math.isfinite(retention):
        raise ValueError(f"retention must be finite, got {retention}")
    exact = retention * n_tokens
    # Subtract a relative epsilon so fp error (0.7*10 = 7.000000000000001) does not round up a whole token.
    k = math.ceil(exact - 1e-9 * max(1.0, abs(exact)))
    return min(max(k, 1), n_tokens)
