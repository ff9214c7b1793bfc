#!/usr/bin/env bash
# Run on a machine WITH registry access: collect the wheels the GPU suite needs beyond PyTorch/torchvision
# (the GPU machine has no network; Ray, decord, PyAV, pyarrow, pydantic and matplotlib are not needed there:
# checked by importing the suite with those blocked). Carry bench/gpu/wheels along. For a different Python
# on the GPU machine add e.g. --python-version 3.11 --platform manylinux2014_x86_64.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip download --only-binary=:all: -d wheels "transformers>=5.24" "typer>=0.12" "rich>=13" "numpy>=1.26"
ls wheels
