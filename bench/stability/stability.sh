#!/bin/bash
# The second, pre-registered study of docs/results.md: does LNSR make fine-tuning more stable where
# plain fine-tuning fails (a BERT-base-size encoder, small data)?  Protocol: docs/results.md,
# "The second study".
#
#   bench/stability/stability.sh start     # the study's runs in the background from the frozen commit, resumable,
#                                          # committing finished run records every 5 minutes
#   bench/stability/stability.sh status    # finished runs per stage and setting, what is running
#   bench/stability/stability.sh stop
#   bench/stability/stability.sh queue A|B # (what `start` runs) one of the two queues, in the foreground
#   bench/stability/stability.sh summary   # the tables and the registered choices, from the run files
#
# Stage 1, the scan: vanilla only, held-out training data only (--holdout 0.2; dev is not opened), fp32,
# 3 epochs, seeds 1-5, batch 16, max length 128, warm-up 10%, weight decay 0.01, clipping 1.0:
#   mpnet-base (all-mpnet-base-v2, `lnsr models fetch mpnet-base`): MRPC and RTE, 1000 training examples,
#       lr 2e-5, 5e-5, 1e-4 (SST-2 last, if the budget allows);
#   MiniLM (the packaged all-MiniLM-L6-v2): MRPC and SST-2, 250 and 500 training examples, lr 1e-4, 3e-4, 1e-3.
# Stages 2 (strength) and 3 (finals) follow as soon as the registered choice before them can be made
# (stability.py). Two queues run at once, one torch thread each: A takes mpnet-base first, B MiniLM
# first; both take each family's runs from the front (seeds outer), so a finished block is a complete
# paired comparison. A run in flight holds a lock, so the queues never run the same run twice; killed
# runs resume from their epoch checkpoints. The queues run this checkout's harness (stability.py) with
# the frozen commit's lnsr package on the import path.
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

# the runs themselves (the recipe, the three stages and their order, the two queues and their locks) are
# defined once, in stability.py: `stability.py commands A` lists what is still to run
STAGES="$PY $HERE/bench/stability/stability.py --runs $OUT --out $OUT --data $DATA --threads $THREADS --lnsr $LNSR"

case "${1:-}" in
  start)
    [ -n "$STABILITY_COMMIT" ] || { echo "STABILITY_COMMIT is not set in $0" >&2; exit 2; }
    [ -x "$VENV/bin/lnsr" ] || { echo "no $VENV/bin/lnsr: install this checkout first (README, Install)" >&2; exit 2; }
    "$VENV/bin/lnsr" models list | grep -q "^mpnet-base .*" && [ -d "${LNSR_CACHE:-$HOME/.cache/lnsr}/models/mpnet-base" ] \
      || { echo "mpnet-base is not fetched: lnsr models fetch mpnet-base" >&2; exit 2; }
    [ -d "$WORKTREE" ] || git -C "$HERE" worktree add --detach "$WORKTREE" "$STABILITY_COMMIT"
    [ "$(git -C "$WORKTREE" rev-parse --short=7 HEAD)" = "${STABILITY_COMMIT:0:7}" ] || {
      echo "$WORKTREE is not at $STABILITY_COMMIT" >&2; exit 2; }
    # the import path holds the frozen copy's lnsr package alone (see bench/study/study_frozen.sh)
    mkdir -p "$LOGS/pypath"
    [ -e "$WORKTREE/lnsr/kernels" ] || ln -s "$WORKTREE/kernels" "$WORKTREE/lnsr/kernels"
    [ -e "$LOGS/pypath/lnsr" ] || ln -s "$WORKTREE/lnsr" "$LOGS/pypath/lnsr"
    # runs land in this checkout's OUT (a link from the copy), so the committer finds them
    mkdir -p "$HERE/$OUT"; rm -rf "$WORKTREE/$OUT"; mkdir -p "$(dirname "$WORKTREE/$OUT")"; ln -s "$HERE/$OUT" "$WORKTREE/$OUT"
    # the harness is copied first, so that editing this checkout never changes a running queue
    cp "$HERE/bench/stability/stability.py" "$LOGS/stability.py"
    for q in A B; do
      (cd "$WORKTREE" && PYTHONPATH=$LOGS/pypath PYTHONSAFEPATH=1 setsid nohup nice -n 10 \
        "$VENV/bin/python" "$LOGS/stability.py" --runs "$OUT" --out "$OUT" --data "$DATA" --threads "$THREADS" \
        --lnsr "$VENV/bin/lnsr" queue $q >> "$LOGS/queue$q.log" 2>&1 < /dev/null &
        echo $! > "$LOGS/queue$q.pid")
    done
    setsid nohup bash "$HERE/bench/tools/commit_runs.sh" "$OUT" stability >> "$LOGS/committer.log" 2>&1 < /dev/null \
      & echo $! > "$LOGS/committer.pid"
    echo "study running from $WORKTREE ($STABILITY_COMMIT); logs in $LOGS" ;;
  status)
    "$VENV/bin/python" "$HERE/bench/stability/stability.py" --runs "$HERE/$OUT" progress || true
    pgrep -af "lnsr finetune" | grep -v "flock \|bash -c" | grep -o -- "--seeds [0-9]*\|--output-dir [^ ]*" | paste - - \
      | sed 's|--seeds \([0-9]*\).*--output-dir docs/runs/stability/\(.*\)|running: \2 seed \1|' || true ;;
  stop)
    for p in queueA queueB committer; do
      [ -f "$LOGS/$p.pid" ] && kill -- -"$(cat "$LOGS/$p.pid")" 2>/dev/null || true
      rm -f "$LOGS/$p.pid"
    done
    # and whatever the queues started (killed runs resume from their last epoch checkpoint)
    pkill -f "stability.py .*queue [AB]" || true
    pkill -f -- "--output-dir $OUT/" || true ;;
  queue) $STAGES queue "${2:-A}" ;;
  summary) $PY "$HERE/bench/stability/stability.py" --runs "$OUT" summary ;;
  *) echo "usage: $0 start|status|stop|queue A|B|summary" >&2; exit 2 ;;
esac
