"""The pruner registry: every method name `prune_tokens` accepts, in one torch-free place that config
validation and the CLI read (importing it does not load PyTorch)."""

PRUNERS = (
    "none",
    "random",
    "downsample",
    "uniform",
    "divprune",
    "visionzip",
    "dycoke",
    "fastv",
    "iwp",
    "iwp_magnitude",
    "iwp_duplication",
    "iwp_fixed",
    "iwp_pcmmr",
)

COMPENSATIONS = ("none", "bias", "merge", "bias+merge")  # mass compensation of the kept tokens (iwp.compensation)
ASSIGNMENTS = ("global", "chunk")  # where a pruned token looks for the kept token it is counted in

# The compensation a pruner runs with when none is asked for ("auto"): IWP's shipped defaults include the
# log-count bias (chosen on the validation split, docs/benchmarks.md); every other pruner runs as published.
DEFAULT_COMPENSATION = {"iwp": "bias"}


def default_compensation(pruner: str) -> str:
    return DEFAULT_COMPENSATION.get(pruner, "none")
