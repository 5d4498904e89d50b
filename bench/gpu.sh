#!/usr/bin/env bash
# Both hf_aace benchmarks on one CUDA GPU, offline, in under 8 minutes; results under ${OUT:-bench/out}.
#
#   bash bench/gpu.sh               # on the GPU machine, from the repository root
#   bash bench/gpu.sh --cpu-smoke   # tiny versions of the same commands on the CPU (under a minute): checks the script
#
# Needs torch (CUDA), transformers, accelerate and datasets installed; downloads nothing. hf_aace is imported from the
# working tree through PYTHONPATH (no install). PYTHON overrides the interpreter (default: python).
set -uo pipefail

mode=gpu
case "${1:-}" in
  "") ;;
  --cpu-smoke) mode=cpu-smoke ;;
  -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
  *) echo "unknown argument: $1 (use --cpu-smoke or nothing)" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ "$mode" = gpu ]; then
  common=(--device cuda)
  step_models=(--models wrn-16-4 wrn-28-10 --batch_size 128 --steps 20 --warmup 5 --repeats 5)
  loop_sizes=(--model wrn-16-4 --batch_size 128 --num_images 20000 --steps 40 --warmup 10 --repeats 3 --num_workers 8)
  limit=150
else
  common=(--device cpu --threads 1)
  step_models=(--models wrn-10-1 pyramidnet-8-8 --batch_size 8 --steps 1 --warmup 1 --repeats 1)
  loop_sizes=(--model wrn-10-1 --batch_size 8 --num_images 64 --steps 1 --warmup 1 --repeats 1 --num_workers 1)
  limit=60
fi

failures=0
run() {  # run NAME COMMAND...: output to $OUT/NAME.log, a time limit, and keep going when one fails
  local name=$1
  shift
  echo "== $name: $*"
  if ! timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
    echo "!! $name failed (exit $?, see $OUT/$name.log):"
    tail -n 20 "$OUT/$name.log"
    failures=$((failures + 1))
  fi
}

{
  date -u
  uname -a
  grep -m1 "model name" /proc/cpuinfo
  echo "cores: $(nproc)"
  command -v nvidia-smi > /dev/null && nvidia-smi
  "$PYTHON" -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
} > "$OUT/machine.txt" 2>&1

"$PYTHON" -c "import hf_aace" || { echo "hf_aace does not import from $PWD" >&2; exit 1; }

run step_cost_bf16 "$PYTHON" bench/step_cost.py "${common[@]}" "${step_models[@]}" --bf16 \
  --output_md "$OUT/step_cost_bf16.md" --output_json "$OUT/step_cost_bf16.json"
run step_cost_bf16_channels_last "$PYTHON" bench/step_cost.py "${common[@]}" "${step_models[@]}" --bf16 \
  --channels_last --output_md "$OUT/step_cost_bf16_channels_last.md" \
  --output_json "$OUT/step_cost_bf16_channels_last.json"
run reference_loop "$PYTHON" bench/reference_loop.py "${common[@]}" "${loop_sizes[@]}" \
  --variants reference trainer trainer_bf16 --output_md "$OUT/reference_loop.md"

echo
for table in "$OUT"/step_cost_bf16.md "$OUT"/step_cost_bf16_channels_last.md "$OUT"/reference_loop.md; do
  [ -f "$table" ] && cat "$table" && echo
done
echo "machine: $OUT/machine.txt; logs and JSON: $OUT/"
exit $((failures > 0))
