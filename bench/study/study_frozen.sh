#!/bin/bash
# Run the pre-registered study (docs/results.md) from the frozen commit its runs use, in the
# background, resumably, committing finished run records as they land.
#
#   bench/study/study_frozen.sh start     # worktree + driver + committer, both under nohup/nice
#   bench/study/study_frozen.sh status    # finished runs per stage, what is left (rough cost), what is running
#   bench/study/study_frozen.sh stop
#
# Why a frozen copy: the arms of one study must run the same code for all seeds, while the library
# keeps changing. The copy is a git worktree of STUDY_COMMIT (a7c2d42, the code of every run so far)
# beside this checkout; only orchestration files (bench/study/study.sh, bench/study/study.py) are taken
# from this checkout, never training code. The compiled lnsr._C is the development build (the copy
# has none); its CPU kernels were checked bit-identical to the frozen commit's own build
# (docs/runs/machine_check/). Runs land in $OUT of this checkout (default docs/runs/study); finished
# runs are skipped and killed runs resume from their epoch checkpoints, so `start` after a restart
# (or on a new machine, after installing this checkout as README says) continues where it stopped.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/../.." && pwd)
STUDY_COMMIT=${STUDY_COMMIT:-a7c2d42}
WORKTREE=${WORKTREE:-$HERE/../study}
LOGS=${LOGS:-$HERE/../study_logs}
DATA=${DATA:-$(cd "$HERE/../shared/data" 2>/dev/null && pwd || echo "$HERE/../shared/data")}
OUT=${OUT:-$HERE/docs/runs/study}
VENV=${VENV:-$HERE/.venv}

setup() {
  if [ ! -d "$WORKTREE" ]; then git -C "$HERE" worktree add --detach "$WORKTREE" "$STUDY_COMMIT"; fi
  [ "$(git -C "$WORKTREE" rev-parse --short=7 HEAD)" = "${STUDY_COMMIT:0:7}" ] || {
    echo "$WORKTREE is not at $STUDY_COMMIT" >&2; exit 2; }
  # the copy's own Triton kernels, not the development tree's (the editable install maps lnsr.kernels there)
  [ -e "$WORKTREE/lnsr/kernels" ] || ln -s "$WORKTREE/kernels" "$WORKTREE/lnsr/kernels"
  # the import path holds the copy's lnsr package and nothing else: the worktree root itself would put
  # its top-level kernels/ folder ahead of the PyPI package 'kernels' that transformers >= 5.25 imports
  mkdir -p "$LOGS/pypath"
  [ -e "$LOGS/pypath/lnsr" ] || ln -s "$WORKTREE/lnsr" "$LOGS/pypath/lnsr"
  mkdir -p "$WORKTREE/bench/study"
  cp "$HERE/bench/study/study.sh" "$HERE/bench/study/study.py" "$WORKTREE/bench/study/"
  mkdir -p "$LOGS"
}

driver() {
  export PYTHONPATH=$LOGS/pypath PYTHONSAFEPATH=1 DATA OUT MODELS=${MODELS:-$LOGS/models} LNSR=$VENV/bin/lnsr PYTHON=$VENV/bin/python
  export JOBS=${JOBS:-2} THREADS=${THREADS:-1}
  cd "$WORKTREE"
  echo "start $(date -u)"
  for r in mrpc1k sst2-1k rte1k rte; do
    task=$("$PYTHON" bench/study/study.py --runs "$OUT" task-of "$r")
    for stage in recipe strength final; do
      # a finished strength search is not ranked again: that would rewrite best.json's date
      if [ "$stage" = strength ] && [ -f "$OUT/strength/$r/$task/best.json" ]; then continue; fi
      # nor is a finished recipe search or final walked again (each finished run would be found and
      # skipped, one CLI start each: minutes per restart on 2 cores)
      if [ "$stage" != strength ] && "$PYTHON" bench/study/study.py --runs "$OUT" stage-done "$r" "$stage"; then continue; fi
      bash bench/study/study.sh "$stage" "$r"; echo "$r $stage done $(date -u)"
    done
  done
}

case "${1:-}" in
  start)
    [ -x "$VENV/bin/lnsr" ] || { echo "no $VENV/bin/lnsr: install this checkout first (README, Install)" >&2; exit 2; }
    setup
    export -f driver
    export WORKTREE LOGS DATA OUT VENV HERE
    # each in its own process group, so that `stop` ends exactly these (and their runs)
    setsid nohup nice -n 5 bash -c driver > "$LOGS/driver.log" 2>&1 < /dev/null & echo $! > "$LOGS/driver.pid"
    setsid nohup bash "$HERE/bench/tools/commit_runs.sh" "$OUT" study >> "$LOGS/committer.log" 2>&1 < /dev/null \
      & echo $! > "$LOGS/committer.pid"
    echo "study running from $WORKTREE ($STUDY_COMMIT); logs in $LOGS" ;;
  status)
    for r in mrpc1k sst2-1k rte1k rte; do
      "$VENV/bin/python" "$HERE/bench/study/study.py" --runs "$OUT" progress "$r" 2>/dev/null || true
    done
    "$VENV/bin/python" "$HERE/bench/study/study.py" --runs "$OUT" --jobs "${JOBS:-2}" remaining 2>/dev/null || true
    # one line per run in flight: its stage folder, arm, seed and recipe
    pgrep -af "lnsr finetune" | while read -r line; do
      opt() { grep -o -- "--$1 [^ ]*" <<< "$line" | head -1 | cut -d' ' -f2; }
      echo "running: $(opt output-dir | sed 's|.*/study/||') $(opt method) seed $(opt seeds), lr $(opt lr) x $(opt epochs) epochs"
    done || true ;;
  stop)
    for p in driver committer; do
      [ -f "$LOGS/$p.pid" ] && kill -- -"$(cat "$LOGS/$p.pid")" 2>/dev/null || true
      rm -f "$LOGS/$p.pid"
    done ;;
  *) echo "usage: $0 start|status|stop" >&2; exit 2 ;;
esac
