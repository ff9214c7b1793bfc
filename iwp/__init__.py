"""IWP: query-agnostic visual-token pruning as implicit weight pruning (pure PyTorch)."""

from .baselines import PRUNERS, PruneResult, prune_tokens
from .compensation import ASSIGNMENTS, COMPENSATIONS, Compensation, assign_to_kept, merged_embeddings, uses_bias, uses_merge
from .layout import TokenLayout, budget_for
from .metric import compensated_residual, duplication, log_magnitude, relative_residual
from .select import select_tokens_mmr_exact, select_tokens_pcmmr, select_tokens_pcmmr_batch
from .settings import IWPSettings

__all__ = [
    "ASSIGNMENTS",
    "COMPENSATIONS",
    "Compensation",
    "assign_to_kept",
    "compensated_residual",
    "merged_embeddings",
    "uses_bias",
    "uses_merge",
    "PRUNERS",
    "IWPSettings",
    "PruneResult",
    "TokenLayout",
    "budget_for",
    "duplication",
    "log_magnitude",
    "prune_tokens",
    "relative_residual",
    "select_tokens_mmr_exact",
    "select_tokens_pcmmr",
    "select_tokens_pcmmr_batch",
]
