#!/bin/bash
# Step cost and peak memory of the packaged pretrained models on this CPU, side by side in one run
# (issues #32 and #35): mpnet-base (the second study's encoder) and the LoRA decoders smollm2-135m and
# gemma3-270m, plain / two-pass / LNSR at k = 0 and k = L/2. Runs that this script finds in flight
# under docs/runs/stability or bench/sft_quality are paused (SIGSTOP) meanwhile, so the numbers are an
# idle machine's (other load is not: run it on an otherwise idle machine).
#
#   bash bench/step_packaged.sh [OUT]     # default OUT: bench/results/step_cpu_packaged_<date>
#   PARTS=decoders STEPS=4 bash bench/step_packaged.sh OUT   # only the decoders (PARTS: encoder decoders)
# Needs: lnsr models fetch mpnet-base smollm2-135m gemma3-270m; pip install -e ".[gguf,lora]".
set -euo pipefail
OUT=${1:-bench/results/step_cpu_packaged_$(date -u +%F)}
PARTS=${PARTS:-encoder decoders}
STEPS=${STEPS:-2}      # timed steps per decoder case (after one warm-up step)
mkdir -p "$OUT"
# pause the project's background experiments (the stability study, the SFT quality runs) meanwhile
pids=$(pgrep -f -- "--output-dir docs/runs/stability/|examples/sft_lora.py" || true)
[ -n "$pids" ] && kill -STOP $pids
trap '[ -n "$pids" ] && kill -CONT $pids || true' EXIT
{
  echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
  if [[ " $PARTS " == *" encoder "* ]]; then
  # the encoder at the study's setting: one thread (each study run has one), batch 16 x 64, fp32
  OMP_NUM_THREADS=1 lnsr bench --only step --models mpnet-base --batch 16 --seq 64 --steps 3 --best-only \
    --precision fp32 --out "$OUT"
  # bf16 autocast on a CPU without AVX-512 BF16 / AMX: plain only, to show the factor (one timed step)
  OMP_NUM_THREADS=1 python -m lnsr.benchmarks.step --models mpnet-base --batch 16 --seq 64 --steps 1 --warmup 1 \
    --precision bf16 --methods plain --csv "$OUT/step_cpu.csv"
  fi
  if [[ " $PARTS " == *" decoders "* ]]; then
  # the decoders with LoRA r 8 on q/k/v/o, batch 8 x 64, fp32, both cores; with and without checkpointing
  for ck in "" "--checkpointing"; do
    python -m lnsr.benchmarks.step --models smollm2-135m gemma3-270m --lora 8 --batch 8 --seq 64 --steps "$STEPS" \
      --warmup 1 --best-only --precision fp32 $ck --csv "$OUT/step_cpu.csv"
  done
  fi
} 2>&1 | grep -v -i "warn\|de-quantizing\|Loading weights" | tee "$OUT/step.txt"
