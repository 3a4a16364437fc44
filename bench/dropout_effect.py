"""Re-measure docs/design.md §1's dropout figures on the packaged MiniLM and one MRPC batch.

    python bench/dropout_effect.py --data-dir ../shared/data/MRPC [--out dropout_effect.csv]

Prints the `token` penalty P from dropout alone (sigma 0, independent masks; hidden-state vs
attention-probability dropout), P from relative sigma-0.05 noise with paired masks, and the
gradient norms of the task loss and of P (lam = 1), each averaged over a few seeds, and appends
them to ``--out`` (default ./dropout_effect.csv).
"""
import argparse
import csv
import os
import statistics
from datetime import date

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import lnsr
from lnsr.data import get_task, load_task
from lnsr.finetune import default_model_path
from lnsr.utils.machine import cpu_name


def grad_norm(loss, params):
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default=os.environ.get("LNSR_MRPC_DIR", "../shared/data/MRPC"))
    ap.add_argument("--model", default=None, help="Hugging Face encoder path (default: the packaged MiniLM)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="dropout_effect.csv", help="append the rows here (default: ./dropout_effect.csv)")
    args = ap.parse_args()
    path = args.model or default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    rows = load_task(get_task("mrpc"), args.data_dir)[0][:16]  # (sentence1, sentence2, label) of train
    enc = tok([r[0] for r in rows], [r[1] for r in rows], padding=True, truncation=True, max_length=128,
              return_tensors="pt")
    labels = torch.tensor([r[2] for r in rows])
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    attn_dropouts = [m.dropout for m in model.modules() if type(m).__name__ == "BertSelfAttention"]

    def measure(sigma, mode, attn_on=True, grads=False):
        saved = [d.p for d in attn_dropouts]
        if not attn_on:
            for d in attn_dropouts:
                d.p = 0.0
        ps, gt, gp = [], [], []
        try:
            for s in range(args.seeds):
                torch.manual_seed(s)
                with lnsr.LNSR(model, sigma=sigma, dropout=mode, lam=1.0, backend="torch") as reg:
                    out = model(**enc, labels=labels)
                    ps.append(reg.penalty.item())
                    if grads:
                        gt.append(grad_norm(out.loss, params))
                        gp.append(grad_norm(reg.loss, params))
        finally:
            for d, p in zip(attn_dropouts, saved):
                d.p = p
        return statistics.mean(ps), (statistics.mean(gt) if gt else None), (statistics.mean(gp) if gp else None)

    res = {
        "P dropout alone (sigma 0, independent)": measure(0.0, "independent", grads=True),
        "P hidden-state dropout alone (attention dropout off)": measure(0.0, "independent", attn_on=False),
        "P relative 0.05, independent masks": measure(0.05, "independent"),
        "P relative 0.05, paired masks": measure(0.05, "paired", grads=True),
        "P relative 0.05, dropout off": measure(0.05, "off"),
    }
    tot, hid = res["P dropout alone (sigma 0, independent)"][0], res["P hidden-state dropout alone (attention dropout off)"][0]
    print(f"{'quantity':58s} {'P':>10s} {'|grad task|':>12s} {'|grad P|':>10s}")
    for k, (p, gt, gp) in res.items():
        print(f"{k:58s} {p:10.4f} {'' if gt is None else f'{gt:12.4f}':>12s} {'' if gp is None else f'{gp:10.4f}':>10s}")
    print(f"{'=> attention-probability dropout share':58s} {tot - hid:10.4f}")
    for name in ("P dropout alone (sigma 0, independent)", "P relative 0.05, paired masks"):
        p, gt, gp = res[name]
        print(f"gradient ratio |grad P| / |grad task| ({name}): {gp / gt:.1f}x")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    new = not os.path.exists(args.out)
    with open(args.out, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["date", "machine", "torch", "quantity", "P", "grad_task", "grad_P", "seeds"])
        for k, (p, gt, gp) in res.items():
            w.writerow([date.today().isoformat(), cpu_name(), torch.__version__,
                        k, f"{p:.6g}", "" if gt is None else f"{gt:.6g}", "" if gp is None else f"{gp:.6g}",
                        args.seeds])


if __name__ == "__main__":
    main()
