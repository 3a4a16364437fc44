#!/bin/bash
# docs/guide.md's `lnsr tune` figure: lam in {0.003, 0.01, 0.03} beside vanilla and the lam = 0 control on a
# held-out 20% of MRPC train (1000 training pairs, 3 seeds, README's main-job recipe, bf16).
#
#   bench/study/tune_mrpc.sh            # JOBS runs at a time (default 1), then the ranking and best.json
#
# It is exactly `lnsr tune $ARGS --seeds 1 2 3` (the last line); the runs are listed first only so
# that JOBS of them can run at once on a small CPU. DATA: GLUE folder (default ../shared/data).
set -euo pipefail
DATA=${DATA:-../shared/data}
OUT=${OUT:-docs/runs/tune_mrpc}
LNSR=${LNSR:-lnsr}
JOBS=${JOBS:-1}
THREADS=${THREADS:-$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 ))}
ARGS="--task mrpc --data-dir $DATA --max-train-samples 1000 --holdout 0.2 --epochs 2 --lr 1e-4 --bf16 \
  --no-progress --output-dir $OUT --threads $THREADS"
for seed in 1 2 3; do
  for arm in vanilla lnsr:lam=0 lnsr:lam=0.003 lnsr:lam=0.01 lnsr:lam=0.03; do
    echo "$LNSR finetune $ARGS --method $arm --seeds $seed"
  done
done | tr '\n' '\0' | xargs -0 -P "$JOBS" -I{} bash -c '{}'
$LNSR tune $ARGS --seeds 1 2 3 --rank-by accuracy   # accuracy: MRPC F1 rewards predicting "paraphrase" always
