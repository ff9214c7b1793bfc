#!/usr/bin/env bash
# The whole GPU measurement set of docs/benchmarks.md in one go (expected < 5 minutes on an H100/H200;
# the timeouts cap it at 8), on a machine
# with only PyTorch + torchvision: installs bench/gpu/wheels offline, then writes CSVs and logs to $OUT.
#   bash bench/gpu/run_suite.sh            (from the repository root)
set -euo pipefail
OUT=${OUT:-bench-out/gpu}
mkdir -p "$OUT"
if ! python -c "import transformers, typer, rich" 2>/dev/null; then
  python -m pip install --no-index --find-links bench/gpu/wheels transformers typer rich
fi
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# 1. PC-MMR: matrix form vs elementwise reference, one video and a lockstep batch (7B shapes, N = 2048, 25 %)
timeout 60 python -m bench.pcmmr_form --device cuda --batches 1,4,16 --repeats 5 | tee "$OUT/pcmmr_form.txt"
#    and the shipped selection (temporal coverage, one video at a time), both forms
timeout 60 python -m bench.pcmmr_form --device cuda --selection cover --batches 1 --repeats 5 | tee "$OUT/cover_form.txt"
# 2. captioning, full-depth Qwen2.5-VL-7B shape, 16 frames 448 px, batch 4, 32 tokens: unpruned vs IWP 25 %,
#    each without and with the vision skip, on static-camera and panning clips
for content in static panning; do
  timeout 150 python -m bench.gpu_suite --content "$content" --out "$OUT" | tee "$OUT/speed_$content.txt"
done
# 3. decoding per step with the compensation bias on (a 4-D float mask: no flash kernel in any loop), IWP 25 %:
#    the dynamic loop, the static-cache loop, and the static loop with its step compiled (torch.compile
#    mode="reduce-overhead": CUDA graphs); the warm-up pass compiles
timeout 150 python -m bench.gpu_suite --content static --retentions 0.25 --no-vision-skip --compensation bias \
  --repeats 2 --decode-loops dynamic,static,compiled --out "$OUT" | tee "$OUT/decode_loops.txt"
echo "done: $OUT"
