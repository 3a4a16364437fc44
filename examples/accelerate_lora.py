"""LNSR + LoRA on a Llama-style decoder with Accelerate (DDP / FSDP / mixed precision from its config).

    accelerate launch examples/accelerate_lora.py --model /path/to/llama --data-dir ../shared/data/SST-2
    accelerate launch --num_processes 2 --cpu examples/accelerate_lora.py --tiny   # tiny random Llama, 2 CPU ranks

The regulariser is attached to the unwrapped model before `accelerator.prepare` wraps it; each
rank draws its own noise (the rank is folded into the seed) and the penalty is part of the
single backward.  Trains a causal LM on the sentences of a GLUE-format SST-2 folder (or random
tokens with --tiny).
"""
import argparse
import csv
import os

import torch


def sentences(data_dir, limit):
    with open(os.path.join(data_dir, "train.tsv"), encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    col = rows[0].index("sentence")
    return [r[col].strip() for r in rows[1:limit + 1]]


def main(argv=None):
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model
    import transformers as tf

    import lnsr

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="Hugging Face causal LM (hub name or local path)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama and random tokens (no weights, no data)")
    ap.add_argument("--data-dir", default=os.environ.get("LNSR_SST2_DIR", "../shared/data/SST-2"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--lam", type=float, default=0.003)  # lnsr.config.DEFAULT_LAM
    ap.add_argument("--inject-at", type=int, default=-4)
    ap.add_argument("--noisy-fraction", type=float, default=1.0)
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--checkpointing", action="store_true")
    args = ap.parse_args(argv)
    if not args.tiny and not args.model:
        raise SystemExit("pass --model <causal LM name or path>, or --tiny for a random tiny Llama")
    accelerator = Accelerator()
    torch.manual_seed(0)
    if args.tiny:
        cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2)
        model, tok = tf.LlamaForCausalLM(cfg), None
    else:
        tok = tf.AutoTokenizer.from_pretrained(args.model)
        tok.pad_token = tok.pad_token or tok.eos_token
        model = tf.AutoModelForCausalLM.from_pretrained(args.model)
    if args.checkpointing:
        lnsr.enable_activation_checkpointing(model)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    reg = lnsr.LNSR(model, sigma=0.05, inject_at=args.inject_at, lam=args.lam,
                    noisy_fraction=args.noisy_fraction, every=args.every)          # before prepare()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model, opt = accelerator.prepare(model, opt)
    texts = None if args.tiny else sentences(args.data_dir, args.steps * args.batch_size * accelerator.num_processes)
    model.train()
    for step in range(args.steps):
        if args.tiny:
            g = torch.Generator().manual_seed(step * 100 + accelerator.process_index)
            ids = torch.randint(0, 128, (args.batch_size, 16), generator=g)
            enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        else:
            start = (step * accelerator.num_processes + accelerator.process_index) * args.batch_size
            enc = tok(texts[start:start + args.batch_size], padding=True, truncation=True, max_length=64,
                      return_tensors="pt")
        enc = {k: v.to(accelerator.device) for k, v in enc.items()}
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out = model(**enc, labels=labels)
        accelerator.backward(out.loss + reg.loss)
        opt.step()
        opt.zero_grad()
        if accelerator.is_main_process and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {out.loss.item():.4f}  lam*P {reg.loss.item():.5f}")
    reg.remove()
    return out.loss.item()


if __name__ == "__main__":
    main()
