#!/bin/bash
# The study of docs/results.md on a lent GPU machine: prepared here, run there in one command.
#
#   bash bench/study/study_gpu.sh prepare                 # here: .gpuwork/ (~50 MB, git-ignored)
#   bash bench/study/study_gpu.sh run STAGE [REGIME...]   # there: bench/study/study.sh STAGE on cuda
#
# The GPU machine has no network and takes at most 64 MiB of ignored files along, so `prepare`
# writes what it needs into .gpuwork/: the GLUE folders of the study (MRPC, RTE, SST-2; from DATA,
# default ../shared/data) and the packaged all-MiniLM-L6-v2 with its weights *stored* in fp16
# (it trains in fp32 from them: a relative change of about 5e-4 to each weight). Carry .gpuwork
# with the device tool, e.g. run(command="bash bench/study/study_gpu.sh run final mrpc1k",
# carry=[".gpuwork"], timeout_s=580).
#
# `run` installs lnsr without the C++ extension (Triton on CUDA; building it would cost minutes of
# device time) unless it is importable already, then runs the stage with JOBS runs at once
# (default 8 processes on the one GPU, THREADS=2 CPU threads each). Run records go to
# $OUT/study_gpu ($OUT: the device tool's return folder) or STUDY_OUT. The runs differ from CPU
# runs (other kernels, fp16-stored weights): a GPU block is a separate replica of the study, all
# of its arms and seeds run there, never mixed with CPU runs in one comparison. Runs are resumable;
# a stage cut by the time limit restarts its unfinished runs next time.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
WORK=${GPUWORK:-$ROOT/.gpuwork}
cmd=${1:-}; shift || true

case "$cmd" in
  prepare)
    DATA=${DATA:-$ROOT/../shared/data}
    mkdir -p "$WORK/data"
    for task in MRPC RTE SST-2; do
      [ -d "$DATA/$task" ] || { echo "no $DATA/$task (set DATA to the GLUE-format folder)" >&2; exit 2; }
      mkdir -p "$WORK/data/$task"
      cp "$DATA/$task"/train.tsv "$DATA/$task"/dev.tsv "$WORK/data/$task/"
    done
    python - "$WORK/minilm_fp16" <<'EOF'
import json, os, shutil, sys
import torch
from safetensors.torch import load_file, save_file
from lnsr.finetune import default_model_path

src, dst = default_model_path(), sys.argv[1]
os.makedirs(dst, exist_ok=True)
for name in os.listdir(src):  # tokenizer and config files as they are
    if name != "model.safetensors" and os.path.isfile(os.path.join(src, name)):
        shutil.copy(os.path.join(src, name), dst)
weights = load_file(os.path.join(src, "model.safetensors"))
save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()},
          os.path.join(dst, "model.safetensors"))
with open(os.path.join(dst, "config.json")) as f:
    cfg = json.load(f)
cfg["dtype"] = "float32"  # load (and train) in fp32 from the fp16-stored weights
with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)
print("wrote", dst)
EOF
    du -sh "$WORK"
    ;;
  run)
    [ -d "$WORK/minilm_fp16" ] || { echo "no $WORK: run 'bash bench/study/study_gpu.sh prepare' here and carry .gpuwork" >&2; exit 2; }
    PY=${PYTHON:-python3}
    if ! $PY -c "import lnsr" 2>/dev/null; then
      LNSR_NO_EXT=1 $PY -m pip install -q --no-build-isolation --no-deps -e "$ROOT" > /dev/null
    fi
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    export DATA="$WORK/data" MODEL="$WORK/minilm_fp16" DEVICE=cuda PYTHON=$PY
    export OUT="${STUDY_OUT:-${OUT:-$ROOT/runs}/study_gpu}" JOBS=${JOBS:-8} THREADS=${THREADS:-2}
    export PRECISION=${PRECISION:-bf16}  # one precision for the whole GPU replica (bf16 autocast, as the CPU runs began)
    export MODELS="$OUT/models"
    mkdir -p "$OUT"
    bash "$HERE/study.sh" "$@"
    ;;
  *) echo "usage: $0 prepare | run STAGE [REGIME...]   (STAGE as in bench/study/study.sh)" >&2; exit 2 ;;
esac
