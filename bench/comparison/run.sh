#!/bin/bash
# Method comparison on digits (CPU): METHODS x SEEDS x training-label noise NOISES, the demo recipe
# (scripts/configs/demo_digits.json) on WRN-10-1 for 15 epochs, each method with its default rho.
# One compare.py process per (noise, seed), at most JOBS at a time, all at nice 19 with one torch thread each, writing
# into one folder per noise level, bench/out/compare-noiseNN$SUFFIX; then --summarize writes each folder's comparison
# files from all its runs and copies them into bench/comparison/noiseNN$SUFFIX/.
# Run from the repository root. Section 5 of bench/RESULTS.md (six processes at once):
#   bash bench/comparison/run.sh
# Section 11, the cheaper steps (two processes at once):
#   NOISES="0.2 0.4" METHODS="sgd sam aace aace:k=5 aace:f=0.5" JOBS=2 SUFFIX=-cheaper bash bench/comparison/run.sh
NOISES=${NOISES:-0.2 0}
METHODS=${METHODS:-sgd sam asam aace}
SEEDS=${SEEDS:-0 1 2}
JOBS=${JOBS:-6}
SUFFIX=${SUFFIX:-}
export OMP_NUM_THREADS=1  # single-threaded processes: no OpenMP threads spinning against each other
mkdir -p bench/out
FLAGS="--dataset digits --methods $METHODS --model wide_resnet --depth 10 --widen_factor 1 --num_train_epochs 15 --per_device_train_batch_size 64 --per_device_eval_batch_size 512 --learning_rate 0.1 --optim sgd --optim_args momentum=0.9 --weight_decay 0.0005 --weight_decay_all_parameters true --lr_milestones 0.3 0.6 0.8 --lr_gamma 0.2 --max_grad_norm 0.0 --save_total_limit 1 --logging_steps 10 --use_cpu --disable_tqdm true"
name() { echo "noise$(python3 -c "print(round(100*$1))")$SUFFIX"; }
date -u +"start %F %T"
START=$(date +%s)
for NOISE in $NOISES; do
  for SEED in $SEEDS; do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
    NAME=$(name "$NOISE")
    nice -n 19 .venv/bin/python scripts/compare.py $FLAGS --seeds $SEED --label_noise $NOISE \
      --output_dir bench/out/compare-$NAME > bench/out/compare-$NAME-seed$SEED.log 2>&1 &
  done
done
wait
echo "training wall: $(( $(date +%s) - START )) s"
for NOISE in $NOISES; do
  NAME=$(name "$NOISE")
  nice -n 19 .venv/bin/python scripts/compare.py --summarize bench/out/compare-$NAME --methods $METHODS \
    --output_dir bench/out/compare-$NAME
  mkdir -p bench/comparison/$NAME
  cp bench/out/compare-$NAME/comparison.{json,md,png} bench/comparison/$NAME/
done
date -u +"end %F %T"
echo "total wall: $(( $(date +%s) - START )) s"
