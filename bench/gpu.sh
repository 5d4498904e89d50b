#!/usr/bin/env bash
# The hf_aace benchmarks and the gpu-marked tests on one CUDA GPU, offline, in under 10 minutes; results under
# ${OUT:-bench/out}: step cost eager (bf16, channels_last) and with the step captured as a CUDA graph (bf16, and bf16
# without the Trainer's per-step loss check; channels_last, with the cheaper steps), end to end against the paper's
# loop (the Trainer eager and captured in fp32 and bf16), and tests/test_gpu.py.
#
#   bash bench/gpu.sh               # on the GPU machine, from the repository root
#   bash bench/gpu.sh --cpu-smoke   # tiny versions of the same commands on the CPU (under a minute): checks the script
#
# Needs torch (CUDA), transformers, accelerate, datasets and pytest installed; downloads nothing. hf_aace is imported
# from the working tree through PYTHONPATH (no install). PYTHON overrides the interpreter (default: python). On the
# device tool's lent machine, bench/device_run.sh installs what is missing and runs this.
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
  step_models=(--models wrn-16-4 wrn-28-10 --batch_size 128 --steps 20 --warmup 5 --repeats 3)
  capture_models=("${step_models[@]}")
  methods=(--methods sgd sam aace aace:k=5 aace:k=5:r=1)
  loop_sizes=(--model wrn-16-4 --batch_size 128 --num_images 20000 --steps 40 --warmup 10 --repeats 3 --num_workers 8)
  loop_variants=(reference trainer trainer_captured trainer_bf16_captured)
  limit=120
else
  common=(--device cpu --threads 1)
  step_models=(--models wrn-10-1 pyramidnet-8-8 --batch_size 8 --steps 1 --warmup 1 --repeats 1)
  capture_models=()
  methods=(--methods sgd aace aace:k=5:r=1)
  loop_sizes=(--model wrn-10-1 --batch_size 8 --num_images 64 --steps 1 --warmup 1 --repeats 1 --num_workers 1)
  loop_variants=(reference trainer)
  limit=60
fi

failures=0
run() {  # run NAME COMMAND...: output to $OUT/NAME.log, a time limit, and keep going when one fails
  local name=$1
  shift
  local started=$SECONDS
  echo "== $name: $*"
  if ! timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
    echo "!! $name failed (exit $?, see $OUT/$name.log):"
    tail -n 20 "$OUT/$name.log"
    failures=$((failures + 1))
  fi
  echo "   $name: $((SECONDS - started)) s"
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

# The eager step: the baseline of the captured runs below, same methods, same machine.
run step_cost_bf16_channels_last "$PYTHON" bench/step_cost.py "${common[@]}" "${step_models[@]}" --bf16 \
  --channels_last "${methods[@]}" --output_md "$OUT/step_cost_bf16_channels_last.md" \
  --output_json "$OUT/step_cost_bf16_channels_last.json"
# The captured step (CUDA only): the targets' figures, with the cheaper steps beside full aace.
if [ "$mode" = gpu ]; then
  # bf16, and bf16 without the Trainer's per-step loss check (its two host syncs a step); fp32 in the loop below.
  for setting in bf16 bf16_no_sync; do
    options=(--bf16)
    [ "$setting" = bf16_no_sync ] && options+=(--no_nan_inf_filter)
    run "step_cost_captured_$setting" "$PYTHON" bench/step_cost.py "${common[@]}" "${capture_models[@]}" \
      --channels_last --step_capture cuda_graph "${methods[@]}" "${options[@]}" \
      --output_md "$OUT/step_cost_captured_$setting.md" --output_json "$OUT/step_cost_captured_$setting.json"
  done
fi
run reference_loop "$PYTHON" bench/reference_loop.py "${common[@]}" "${loop_sizes[@]}" \
  --variants "${loop_variants[@]}" --output_md "$OUT/reference_loop.md"
if [ "$mode" = gpu ]; then
  run gpu_tests "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
  tail -n 3 "$OUT/gpu_tests.log"
fi

echo
for table in "$OUT"/step_cost_bf16_channels_last.md "$OUT"/step_cost_captured_bf16.md \
  "$OUT"/step_cost_captured_bf16_no_sync.md "$OUT"/reference_loop.md; do
  [ -f "$table" ] && cat "$table" && echo
done
echo "machine: $OUT/machine.txt; logs and JSON: $OUT/"
exit $((failures > 0))
