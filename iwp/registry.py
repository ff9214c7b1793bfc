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
