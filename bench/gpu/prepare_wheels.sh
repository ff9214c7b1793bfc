#!/usr/bin/env bash
# Run on a machine WITH registry access: collect the wheels the GPU suite needs beyond PyTorch/torchvision
# (the GPU machine has no network; Ray and decord are not needed there). Carry bench/gpu/wheels along.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip download --only-binary=:all: -d wheels "transformers>=5.24" "typer>=0.12" "rich>=13" "numpy>=1.26"
ls wheels
