#!/usr/bin/env bash
# On the lent GPU machine (the device tool's `run`, carry [".whl"] from bench/device_wheels.sh): installs the carried
# wheels beside the image's torch, runs bench/gpu.sh, and packs its results into $OUT/gpu.tgz (the tool brings back
# at most 8 files). Under 10 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -c "import torch, transformers, accelerate, datasets; print(torch.__version__, transformers.__version__, \
accelerate.__version__, datasets.__version__, torch.cuda.get_device_name())" || exit 1
OUT_DIR=/tmp/gpu_out
OUT="$OUT_DIR" PYTHON=python3 bash bench/gpu.sh
status=$?
tar czf "${OUT:-.}/gpu.tgz" -C "$(dirname "$OUT_DIR")" "$(basename "$OUT_DIR")"
exit $status
