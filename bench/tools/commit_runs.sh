#!/bin/bash
# Every 5 minutes, commit the finished run records under OUT (run JSON, CSV, best.json) of the checkout
# this script is in: never checkpoints, the queues' lock files, nor the per-folder summary.md/png,
# which each run rewrites from itself alone (the study's `summary` remakes them). Used by the
# background studies (bench/study/study_frozen.sh, bench/stability/stability.sh).
#
#   bash bench/tools/commit_runs.sh OUT NAME     # commits "NAME runs: finished run records as of HH:MM UTC"
set -uo pipefail
OUT=${1:?usage: commit_runs.sh OUT NAME}
NAME=${2:?usage: commit_runs.sh OUT NAME}
cd "$(dirname "$0")/../.."
while true; do
  sleep "${COMMIT_EVERY:-300}"
  files=$(git status --porcelain -uall -- "$OUT" | awk '{print $2}' | grep -v '\.ckpt\|/summary\.\(md\|png\)$\|/\.locks/' || true)
  [ -n "$files" ] || continue
  git add -- $files && git commit -q -m "$NAME runs: finished run records as of $(date -u +%H:%M) UTC" -- $files \
    && echo "$(date -u) committed $(echo "$files" | wc -l) files"
done
