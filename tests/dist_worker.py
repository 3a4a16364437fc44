"""One rank of the distributed tests (launched by tests/test_distributed.py through torchrun)."""
import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lnsr  # noqa: E402
from lnsr.models import enable_activation_checkpointing  # noqa: E402
from tiny_models import batch, build  # noqa: E402

STEPS = 3


def micro_batch(rank):
    return batch("bert", b=2, seed=10 + rank)


def train(model, wrapped, rank, checkpointing):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    reg = lnsr.LNSR(wrapped, sigma=0.1, inject_at=1, lam=0.5)
    for step in range(STEPS):
        torch.manual_seed(100 + step)
        out = wrapped(**micro_batch(rank))
        (out.loss + reg.loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    reg.remove()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["ddp", "fsdp"], required=True)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = build("bert", layers=3, seed=7)
    if args.checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    if args.mode == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        train(model, wrapped, rank, args.checkpointing)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    else:
        from torch.distributed.fsdp import fully_shard

        for block in model.bert.encoder.layer:
            fully_shard(block)
        fully_shard(model)
        train(model, model, rank, args.checkpointing)
        state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                 for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save(state, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
