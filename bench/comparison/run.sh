#!/bin/bash
# Method comparison on digits (CPU): sgd sam asam aace x seeds 0 1 2 x training-label noise 0% and 20%, the demo
# recipe (scripts/configs/demo_digits.json) on WRN-10-1 for 15 epochs, each method with its default rho.
# One compare.py process per (noise, seed), all at nice 19 with one torch thread each, writing into one folder per
# noise level under bench/out/; then --summarize writes each folder's comparison files from all its runs.
# Run from the repository root: bash bench/comparison/run.sh
export OMP_NUM_THREADS=1  # six single-threaded processes: no OpenMP threads spinning against each other
mkdir -p bench/out
FLAGS="--dataset digits --methods sgd sam asam aace --model wide_resnet --depth 10 --widen_factor 1 --num_train_epochs 15 --per_device_train_batch_size 64 --per_device_eval_batch_size 512 --learning_rate 0.1 --optim sgd --optim_args momentum=0.9 --weight_decay 0.0005 --weight_decay_all_parameters true --lr_milestones 0.3 0.6 0.8 --lr_gamma 0.2 --max_grad_norm 0.0 --save_total_limit 1 --logging_steps 10 --use_cpu --disable_tqdm true"
date -u +"start %F %T"
START=$(date +%s)
for NOISE in 0.2 0; do
  NAME=noise$(python3 -c "print(round(100*$NOISE))")
  for SEED in 0 1 2; do
    nice -n 19 .venv/bin/python scripts/compare.py $FLAGS --seeds $SEED --label_noise $NOISE \
      --output_dir bench/out/compare-$NAME > bench/out/compare-$NAME-seed$SEED.log 2>&1 &
  done
done
wait
echo "training wall: $(( $(date +%s) - START )) s"
for NAME in noise20 noise0; do
  nice -n 19 .venv/bin/python scripts/compare.py --summarize bench/out/compare-$NAME --output_dir bench/out/compare-$NAME
done
date -u +"end %F %T"
echo "total wall: $(( $(date +%s) - START )) s"
