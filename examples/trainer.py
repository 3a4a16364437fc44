"""LNSR with the Hugging Face Trainer: one argument, or one line.

    python examples/trainer.py --data-dir ../shared/data/MRPC --max-steps 40
    python examples/trainer.py --data-dir ../shared/data/MRPC --max-steps 40 --plain-trainer

Fine-tunes the packaged all-MiniLM-L6-v2 (or --model) on a GLUE-format MRPC folder with
``LNSRTrainer(..., lnsr=dict(lam=..., sigma=...))``; ``lnsr_penalty`` and ``lnsr_ratio`` are logged
next to ``loss``.  With ``--plain-trainer``: the plain ``transformers.Trainer`` and one line,
``lnsr.LNSR(model, lam=..., sigma=..., add_to_loss=True)``, which adds ``lam * P`` to the
``outputs.loss`` the Trainer reads (the same updates; the logged ``loss`` includes the penalty, and
no ``lnsr_*`` columns).  Needs ``accelerate`` (``pip install lnsr[trainer]``).
"""
import argparse
import os

import numpy as np
import torch
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                          TrainingArguments)

import lnsr
from lnsr.data import compute_metrics, get_task, load_local
from lnsr.finetune import default_model_path
from lnsr.integrations import LNSRTrainer


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("LNSR_MRPC_DIR", "../shared/data/MRPC"))
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-steps", type=int, default=40)
    ap.add_argument("--lam", type=float, default=0.003)  # lnsr.config.DEFAULT_LAM
    ap.add_argument("--sigma", type=float, default=0.05)
    ap.add_argument("--output-dir", default="runs/trainer-example")
    ap.add_argument("--max-eval-samples", type=int, default=200)
    ap.add_argument("--plain-trainer", action="store_true",
                    help="the plain transformers.Trainer with lnsr.LNSR(model, ..., add_to_loss=True) attached")
    args = ap.parse_args()

    spec = get_task("mrpc")
    train, dev, _ = load_local(spec, args.data_dir)
    path = args.model or default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(1)  # the new classifier head's initialisation: the same run every time
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=spec.num_labels)

    def enc(rows):
        e = tok([r[0] for r in rows], [r[1] for r in rows], truncation=True, max_length=128)
        return [{**{k: e[k][i] for k in e}, "labels": rows[i][2]} for i in range(len(rows))]

    def metrics(p):
        return compute_metrics(spec.metrics, np.argmax(p.predictions, -1), p.label_ids)

    targs = TrainingArguments(output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=16,
                              learning_rate=5e-5, warmup_steps=0.1, logging_steps=max(1, args.max_steps // 4), eval_strategy="steps",
                              eval_steps=args.max_steps, save_strategy="no", report_to=[], seed=1,
                              use_cpu=not torch.cuda.is_available())
    data = dict(train_dataset=enc(train), eval_dataset=enc(dev[:args.max_eval_samples]),
                data_collator=DataCollatorWithPadding(tok), compute_metrics=metrics)
    if args.plain_trainer:
        reg = lnsr.LNSR(model, lam=args.lam, sigma=args.sigma, add_to_loss=True)   # the one line
        trainer = Trainer(model=model, args=targs, **data)
        trainer.train()
        reg.remove()
    else:
        trainer = LNSRTrainer(model=model, args=targs, lnsr=dict(lam=args.lam, sigma=args.sigma),   # the one argument
                              **data)
        trainer.train()
    for entry in trainer.state.log_history:
        print(entry)


if __name__ == "__main__":
    main()
