#!/bin/bash
# The pre-registered study of docs/results.md ("Does LNSR help, and where?", issue 12).
#
#   examples/study.sh recipe [REGIME...]   # vanilla recipe search on held-out train (lr x epochs, 3 seeds)
#   examples/study.sh summary              # every table rebuilt from the committed run files (trains nothing)
#
# Regimes: mrpc1k sst2-1k rte1k (1000 training examples, one fixed subset per task) and rte (full).
# Runs are resumable (finished runs are skipped); each run's JSON lands under $OUT as it finishes.
# DATA: GLUE-format folder (default ../shared/data); OUT: run records (default docs/runs/study).
set -euo pipefail
DATA=${DATA:-../shared/data}
OUT=${OUT:-docs/runs/study}
LNSR=${LNSR:-lnsr}
REGIMES_ALL="mrpc1k sst2-1k rte1k rte"
# fixed for every arm: batch 16, max length 128 (dynamic padding), warm-up 10%, weight decay 0.01,
# clipping 1.0, bf16 autocast, the last epoch's score
COMMON="--data-dir $DATA --batch-size 16 --max-length 128 --warmup-ratio 0.1 --weight-decay 0.01 --bf16 --no-progress"
SEEDS_SEARCH="1 2 3"
LRS="5e-5 1e-4"
EPOCHS="3 5 10"

regime_args() {  # task and training-set size of a regime
  case "$1" in
    mrpc1k) echo "--task mrpc --max-train-samples 1000" ;;
    sst2-1k) echo "--task sst2 --max-train-samples 1000" ;;
    rte1k) echo "--task rte --max-train-samples 1000" ;;
    rte) echo "--task rte" ;;
    *) echo "unknown regime $1 (choose from $REGIMES_ALL)" >&2; exit 2 ;;
  esac
}

recipe() {  # $1 regime, $2 = run|summary
  local r=$1 extra=""
  [ "$2" = summary ] && extra="--summary-only"
  for seed in $SEEDS_SEARCH; do  # seeds outer: every finished seed is a complete comparison
    for lr in $LRS; do
      for ep in $EPOCHS; do
        $LNSR finetune $(regime_args "$r") $COMMON --holdout 0.2 --method vanilla --seeds $seed --lr $lr \
          --epochs $ep --output-dir "$OUT/recipe/$r/lr${lr}_ep${ep}" $extra
      done
    done
    [ "$2" = summary ] && break
  done
}

cmd=${1:-}; shift || true
regimes=${*:-$REGIMES_ALL}
case "$cmd" in
  recipe) for r in $regimes; do recipe "$r" run; done ;;
  summary) python -m lnsr.finetune.study --runs "$OUT" ;;
  *) echo "usage: $0 recipe|summary [REGIME...]" >&2; exit 2 ;;
esac
