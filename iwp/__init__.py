"""IWP: query-agnostic visual-token pruning as implicit weight pruning (pure PyTorch).

Names load on first use (PEP 562), so `from iwp.registry import PRUNERS` stays free of PyTorch."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "ASSIGNMENTS": "compensation",
    "COMPENSATIONS": "compensation",
    "Compensation": "compensation",
    "assign_to_kept": "compensation",
    "merged_embeddings": "compensation",
    "uses_bias": "compensation",
    "uses_merge": "compensation",
    "compensated_residual": "metric",
    "PRUNERS": "registry",
    "IWPSettings": "settings",
    "PruneResult": "baselines",
    "prune_tokens": "baselines",
    "TokenLayout": "layout",
    "budget_for": "layout",
    "duplication": "metric",
    "log_magnitude": "metric",
    "relative_residual": "metric",
    "select_tokens_mmr_exact": "select",
    "select_tokens_pcmmr": "select",
    "select_tokens_pcmmr_batch": "select",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
