#!/bin/bash
# The second, pre-registered study of docs/results.md: does LNSR make fine-tuning more stable where
# plain fine-tuning fails (a BERT-base-size encoder, small data)?  Protocol: docs/results.md,
# "The second study".
#
#   bench/stability/stability.sh start     # the scan in the background from the frozen commit, resumable,
#                                          # committing finished run records every 5 minutes
#   bench/stability/stability.sh status    # finished scan runs per setting, what is running
#   bench/stability/stability.sh stop
#   bench/stability/stability.sh scan A|B  # (what `start` runs) one of the scan's two queues, in the foreground
#   bench/stability/stability.sh summary   # the scan table and the registered choice, from the run files
#
# Stage 1, the scan: vanilla only, held-out training data only (--holdout 0.2; dev is not opened), fp32,
# 3 epochs, seeds 1-5, batch 16, max length 128, warm-up 10%, weight decay 0.01, clipping 1.0:
#   mpnet-base (all-mpnet-base-v2, `lnsr models fetch mpnet-base`): MRPC and RTE, 1000 training examples,
#       lr 2e-5, 5e-5, 1e-4 (SST-2 last, if the budget allows);
#   MiniLM (the packaged all-MiniLM-L6-v2): MRPC and SST-2, 250 and 500 training examples, lr 1e-4, 3e-4, 1e-3.
# Two queues run at once, one torch thread each: A = mpnet MRPC then mpnet RTE; B = the MiniLM block,
# then the mpnet runs from the other end. A run in flight holds a lock, so the queues never run the
# same run twice; finished runs are skipped by `lnsr finetune` itself and killed runs resume from
# their epoch checkpoints.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/../.." && pwd)      # the checkout this script is in (the frozen copy under `start`)
DATA=${DATA:-../shared/data}                    # as typed: run records hold it verbatim
OUT=${OUT:-docs/runs/stability}
THREADS=${THREADS:-1}
LNSR=${LNSR:-lnsr}
PY=${PYTHON:-python}
# the commit whose code runs every run of the study (set when the protocol was registered); `start`
# checks a git worktree of it out beside this checkout
STABILITY_COMMIT=${STABILITY_COMMIT:-bab2745}
WORKTREE=${WORKTREE:-$HERE/../stability}
LOGS=${LOGS:-$HERE/../stability_logs}
VENV=${VENV:-$HERE/.venv}

COMMON="--data-dir $DATA --batch-size 16 --max-length 128 --warmup-ratio 0.1 --weight-decay 0.01 \
--no-progress --checkpoint-every 0 --threads $THREADS --epochs 3 --holdout 0.2 --method vanilla"
SEEDS="1 2 3 4 5"

# one line per scan setting: FAMILY TASK N LR (the run folder is OUT/scan/FAMILY/TASK_nN_lrLR)
mpnet_settings() {
  for task in mrpc rte; do for lr in 2e-5 5e-5 1e-4; do echo "mpnet-base $task 1000 $lr"; done; done
}
minilm_settings() {
  for task in mrpc sst2; do for n in 250 500; do for lr in 1e-4 3e-4 1e-3; do echo "minilm $task $n $lr"; done; done; done
}
mpnet_sst2_settings() { for lr in 2e-5 5e-5 1e-4; do echo "mpnet-base sst2 1000 $lr"; done; }

run_cmds() {  # settings on stdin -> one `lnsr finetune` command per (seed, setting), seeds outer
  local settings; settings=$(cat)
  for seed in $SEEDS; do
    while read -r fam task n lr; do
      local model="" extra=""
      [ "$fam" = mpnet-base ] && model="--model mpnet-base"
      # SST-2's held-out 20% is 13,470 sentences: its first 2000 (a random subset) are scored, as in the first study
      [ "$task" = sst2 ] && extra="--max-eval-samples 2000"
      echo "$LNSR finetune --task $task --max-train-samples $n --lr $lr $model $COMMON $extra --seeds $seed \
--output-dir $OUT/scan/$fam/${task}_n${n}_lr${lr}"
    done <<< "$settings"
  done
}

run_locked() {  # run one command unless another queue holds its lock
  local cmd=$1 key
  key=$(echo "$cmd" | md5sum | cut -c1-16)
  mkdir -p "$OUT/.locks"
  flock -n "$OUT/.locks/$key" bash -c "$cmd" || true
}

scan() {
  local q=${1:-A} cmds
  case "$q" in
    A) cmds=$( { mpnet_settings | run_cmds; mpnet_sst2_settings | run_cmds; } ) ;;
    B) cmds=$( { minilm_settings | run_cmds; { mpnet_settings | run_cmds; mpnet_sst2_settings | run_cmds; } | tac; } ) ;;
    *) echo "queue is A or B" >&2; exit 2 ;;
  esac
  while IFS= read -r cmd; do run_locked "$cmd"; done <<< "$cmds"
  echo "queue $q done $(date -u)"
}

committer() {  # every 5 minutes: commit the finished run records (never checkpoints or per-folder summaries)
  cd "$HERE"
  while true; do
    sleep 300
    files=$(git status --porcelain -uall -- "$OUT" | awk '{print $2}' | grep -v '\.ckpt\|/summary\.\(md\|png\)$\|/\.locks/' || true)
    [ -n "$files" ] || continue
    git add -- $files && git commit -q -m "stability runs: finished run records as of $(date -u +%H:%M) UTC" -- $files \
      && echo "$(date -u) committed $(echo "$files" | wc -l) files"
  done
}

case "${1:-}" in
  start)
    [ -n "$STABILITY_COMMIT" ] || { echo "STABILITY_COMMIT is not set in $0" >&2; exit 2; }
    [ -x "$VENV/bin/lnsr" ] || { echo "no $VENV/bin/lnsr: install this checkout first (README, Install)" >&2; exit 2; }
    "$VENV/bin/lnsr" models list | grep -q "^mpnet-base .*" && [ -d "${LNSR_CACHE:-$HOME/.cache/lnsr}/models/mpnet-base" ] \
      || { echo "mpnet-base is not fetched: lnsr models fetch mpnet-base" >&2; exit 2; }
    [ -d "$WORKTREE" ] || git -C "$HERE" worktree add --detach "$WORKTREE" "$STABILITY_COMMIT"
    [ "$(git -C "$WORKTREE" rev-parse --short=7 HEAD)" = "${STABILITY_COMMIT:0:7}" ] || {
      echo "$WORKTREE is not at $STABILITY_COMMIT" >&2; exit 2; }
    # the import path holds the frozen copy's lnsr package alone (see examples/study_frozen.sh)
    mkdir -p "$LOGS/pypath"
    [ -e "$WORKTREE/lnsr/kernels" ] || ln -s "$WORKTREE/kernels" "$WORKTREE/lnsr/kernels"
    [ -e "$LOGS/pypath/lnsr" ] || ln -s "$WORKTREE/lnsr" "$LOGS/pypath/lnsr"
    # runs land in this checkout's OUT (a link from the copy), so the committer finds them
    mkdir -p "$HERE/$OUT"; rm -rf "$WORKTREE/$OUT"; mkdir -p "$(dirname "$WORKTREE/$OUT")"; ln -s "$HERE/$OUT" "$WORKTREE/$OUT"
    export -f committer
    export HERE OUT
    for q in A B; do
      (cd "$WORKTREE" && PYTHONPATH=$LOGS/pypath PYTHONSAFEPATH=1 LNSR=$VENV/bin/lnsr PYTHON=$VENV/bin/python \
        setsid nohup nice -n 10 bash bench/stability/stability.sh scan $q > "$LOGS/queue$q.log" 2>&1 < /dev/null &
        echo $! > "$LOGS/queue$q.pid")
    done
    setsid nohup bash -c committer >> "$LOGS/committer.log" 2>&1 < /dev/null & echo $! > "$LOGS/committer.pid"
    echo "scan running from $WORKTREE ($STABILITY_COMMIT); logs in $LOGS" ;;
  status)
    "$VENV/bin/python" "$HERE/bench/stability/stability.py" --runs "$HERE/$OUT" progress || true
    pgrep -af "lnsr finetune" | grep -o -- "--output-dir [^ ]*\|--seeds [0-9]*" | paste - - | sed 's|.*/scan/|running: |' || true ;;
  stop)
    for p in queueA queueB committer; do
      [ -f "$LOGS/$p.pid" ] && kill -- -"$(cat "$LOGS/$p.pid")" 2>/dev/null || true
      rm -f "$LOGS/$p.pid"
    done
    # and whatever the queues started (killed runs resume from their last epoch checkpoint)
    pkill -f "bench/stability/stability.sh scan" || true
    pkill -f -- "--output-dir $OUT/scan/" || true ;;
  scan) scan "${2:-A}" ;;
  summary) $PY "$HERE/bench/stability/stability.py" --runs "$OUT" summary ;;
  *) echo "usage: $0 start|status|stop|scan A|B|summary" >&2; exit 2 ;;
esac
