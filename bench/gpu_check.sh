#!/usr/bin/env bash
# One prepared check for a lent GPU machine (no network; python3 with torch, triton, transformers).
# Run from the repo root:  bash bench/gpu_check.sh
#   1. install lnsr with the machine's own torch (builds the C++/CUDA extension when csrc/ has it;
#      a failed build is logged and the pure-Python install retried without it)
#   2. pytest -m gpu (every GPU test of the project), then the backend contract on the cuda backends
#   3. the kernel benchmark (lnsr backends, torch; then torch-compile in what time is left)
#   4. a short table, printed last
# Logs and CSVs go to "$OUT" (default bench/results/gpu_check_<date>).
# Each step has a timeout; a failing step is logged and the script goes on.  Total < 8 minutes.
set -u

START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_BUDGET_S:-480}))   # leaves margin under 9 minutes
STAMP=$(date +%Y%m%d_%H%M%S)
OUT="${OUT:-bench/results/gpu_check_$STAMP}"
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

note() { echo "[gpu_check $(($(date +%s) - START))s] $*" | tee -a "$SUMMARY"; }

# run_step NAME CAP_SECONDS CMD... : runs CMD with min(CAP, time left) seconds, logs to $OUT/NAME.log
run_step() {
    local name=$1 cap=$2; shift 2
    local left=$((DEADLINE - $(date +%s) - 15))
    local limit=$(( cap < left ? cap : left ))
    if [ "$limit" -lt 10 ]; then
        note "$name: SKIPPED (no time left)"
        return 124
    fi
    note "$name: start (timeout ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    if [ $rc -eq 0 ]; then note "$name: ok"; else note "$name: FAILED rc=$rc (see $OUT/$name.log)"; tail -n 15 "$OUT/$name.log"; fi
    return $rc
}

# 0. the machine
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    $PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())" 2>&1
    $PY -c "import triton; print('triton', triton.__version__)" 2>&1
    $PY -c "import transformers; print('transformers', transformers.__version__)" 2>&1
    $PY -c "import pytest; print('pytest', pytest.__version__)" 2>&1
    git log --oneline -1 2>&1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | tee -a "$SUMMARY"

# 1. install (the extension build may fail on this machine: then the Python package alone)
if ! run_step install 240 $PY -m pip install --no-build-isolation --no-deps -e .; then
    LNSR_NO_EXT=1 run_step install_noext 90 $PY -m pip install --no-build-isolation --no-deps -e .
fi
$PY - <<'EOF' 2>&1 | tee "$OUT/backends.txt" | tee -a "$SUMMARY"
import torch
from lnsr.ops import dispatch
from lnsr.ops.dispatch import available_backends
dev = "cuda" if torch.cuda.is_available() else "cpu"
print("backends on", dev, ":", available_backends(dev), "| auto ->", dispatch.resolve_backend("auto", dev).name)
for name, err in dispatch._ERRORS.items():
    print(f"  {name} unavailable: {err}")
EOF

# 2. GPU tests (all of the project's, not only the Triton ones)
run_step pytest_gpu 150 $PY -m pytest -m gpu -q -rfEs -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml" tests
grep -E "passed|failed|error|skipped" "$OUT/pytest_gpu.log" | tail -n 3 | tee -a "$SUMMARY"
# the backend contract on the GPU's backends (cuda, triton): every kernel against the reference
run_step pytest_contract_cuda 120 $PY -m pytest -q -rfE -p no:cacheprovider -k "cuda" tests/test_backend_contract.py
grep -E "passed|failed|error" "$OUT/pytest_contract_cuda.log" | tail -n 3 | tee -a "$SUMMARY"

# the C++ tap vs the Python tap in a host-bound training step (a 12-block BERT of hidden 32)
run_step tap_step_ab 45 $PY bench/tap_step_ab.py --model tiny --device cuda --batch 4 --length 32 --reps 31
grep -E "median" "$OUT/tap_step_ab.log" | tee -a "$SUMMARY"

# 3. kernel benchmark: every lnsr backend and eager torch first (bounded time) ...
CSV="$OUT/kernels.csv"
run_step bench_kernels 110 $PY -m lnsr.benchmarks.bench_kernels --device cuda --dtype bf16,fp32 \
    --kinds relative,gaussian --no-compile --csv "$CSV"
# training step, bf16 autocast: BERT-base B=32 T=128; a 1.1B Llama with activation checkpointing
STEP_CSV="$OUT/step_gpu.csv"
run_step bench_step_bert 90 $PY -m lnsr.benchmarks.step --models bert-base --device cuda --batch 32 --seq 128 \
    --steps 10 --warmup 3 --best-only --csv "$STEP_CSV"
run_step bench_step_llama 100 $PY -m lnsr.benchmarks.step --models llama-1b --device cuda --batch 8 --seq 512 \
    --steps 6 --warmup 2 --best-only --checkpointing --csv "$STEP_CSV"
# ... then torch.compile of the reference, which may take long to compile: whatever time is left.
run_step bench_compile 120 $PY -m lnsr.benchmarks.bench_kernels --device cuda --dtype bf16 --kinds relative \
    --ops layer_penalty,perturb --providers torch-compile --csv "$CSV"

# 4. the table, last
note "done in $(($(date +%s) - START))s; logs in $OUT"
for f in "$OUT"/bench_step_*.log; do [ -f "$f" ] && grep -A 12 "^model" "$f"; done
if [ -s "$CSV" ]; then
    $PY -m lnsr.benchmarks.bench_kernels --summary "$CSV" 2>&1 | tee "$OUT/table.txt"
else
    echo "no benchmark rows (see $OUT/bench_kernels.log)"
fi
cat "$SUMMARY" | grep -E "FAILED|SKIPPED|passed|failed" || true
