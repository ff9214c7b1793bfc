"""Model assets shipped inside the package (small enough to keep in git)."""
from __future__ import annotations

from pathlib import Path

# A tiny Qwen2.5-VL trained on the synthetic temporal video-QA set (`bench.train_tiny`); see its README.md.
SYNTHQA_MODEL = Path(__file__).resolve().parent / "tiny-qwen2_5_vl-synthqa"


def shipped_synthqa_model() -> Path | None:
    """The shipped trained tiny model's directory, or None when this install has no copy of it."""
    return SYNTHQA_MODEL if (SYNTHQA_MODEL / "config.json").is_file() else None
