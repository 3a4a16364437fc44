"""DDP and FSDP2 with the gloo backend, 2 processes: the same parameters after 3 steps as the
single-process computation that accumulates both ranks' micro-batches, each with its rank's noise."""
import os
import subprocess
import sys

import pytest
import torch

import lnsr
from lnsr.models import enable_activation_checkpointing
from dist_worker import STEPS, micro_batch
from tiny_models import build

HERE = os.path.dirname(os.path.abspath(__file__))


def single_process(checkpointing):
    model = build("bert", layers=3, seed=7)
    if checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    reg = lnsr.LNSR(model, sigma=0.1, inject_at=1, lam=0.5)
    for step in range(STEPS):
        for rank in (0, 1):
            reg.rank = rank
            torch.manual_seed(100 + step)
            out = model(**micro_batch(rank))
            ((out.loss + reg.loss) / 2).backward()  # DDP averages the ranks' gradients
        opt.step()
        opt.zero_grad(set_to_none=True)
    reg.remove()
    return model.state_dict()


def run_ranks(mode, checkpointing, tmp_path):
    out = tmp_path / f"{mode}.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "dist_worker.py"), "--mode", mode, "--out", str(out)]
    if checkpointing:
        cmd.append("--checkpointing")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_distributed_equals_accumulated_single_process(mode, checkpointing, tmp_path):
    dist_state = run_ranks(mode, checkpointing, tmp_path)
    ref = single_process(checkpointing)
    for k, v in ref.items():
        torch.testing.assert_close(dist_state[k], v, rtol=1e-5, atol=1e-5, msg=k)
    # the ranks' noise differs: folding the rank changes the seed
    assert lnsr.regularizer._fold_rank(5, 1) != lnsr.regularizer._fold_rank(5, 0)
