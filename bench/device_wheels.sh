#!/usr/bin/env bash
# Fetches into .whl/ (kept out of git through .git/info/exclude) the wheels that the lent GPU machine lacks for
# bench/gpu.sh, at the versions this checkout's .venv holds (CI's: `make install` first). The machine's image has
# torch 2.11 (CUDA), pytest and an older transformers, accelerate and huggingface-hub, but no datasets or evaluate,
# and reaches no package index. Python 3.12, manylinux x86-64; dependencies are named here, not resolved.
#
#   bash bench/device_wheels.sh      # here, before a device session (about 30 MB)
#   then, with the device tool's `run` (carry [".whl"]):  bash bench/device_run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES="transformers huggingface-hub accelerate datasets evaluate tokenizers safetensors hf-xet dill multiprocess kernels
tomlkit fsspec httpx2 httpcore2 h11 anyio truststore typer shellingham click rich tqdm regex"
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
rm -rf .whl && mkdir .whl
pins=()
for name in $PACKAGES; do
  version=$(.venv/bin/python -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
  [ -n "$version" ] || { echo "$name is not in .venv: run make install first" >&2; exit 1; }
  pins+=("$name==$version")
done
platforms=()
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
.venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pins[@]}"
ls .whl
du -sh .whl
