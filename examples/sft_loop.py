"""Supervised fine-tuning of a causal LM with LNSR in one line: ``add_to_loss=True``.

    python examples/sft_loop.py --tiny                       # tiny random Llama + tiny made-up data, CPU, seconds
    accelerate launch examples/sft_loop.py --model /path/to/causal-lm --steps 200

The regulariser is attached once, before ``accelerator.prepare``; with ``add_to_loss=True`` it adds
``lam * P`` to the ``outputs.loss`` the model computes, so the loop below is an ordinary Accelerate
SFT loop that never mentions LNSR again (gradient accumulation, mixed precision and DDP come from
Accelerate, whose ``backward`` divides the whole loss, penalty included, by the accumulation steps).
The data are prompt/completion pairs (``"12+7="`` -> ``"19"``) made here; the loss is on the
completion tokens only (prompt and padding labels are -100).

The same one line regularises the plain Hugging Face ``Trainer`` and any loop or Lightning module
that reads ``outputs.loss``.  (TRL's ``SFTTrainer`` 1.x computes its loss from its own fused LM head's
``log_probs``, not from ``outputs.loss``, so attaching alone does not reach it; an Accelerate loop is
shown here instead.)
"""
import argparse
import random

import torch

CHARS = "0123456789+=\n"


class CharTokenizer:
    """Characters of ``CHARS`` -> ids 3.. (0 pad, 1 bos, 2 eos): a tokenizer without files or the hub."""
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __init__(self):
        self.vocab_size = 3 + len(CHARS)

    def encode(self, text):
        return [3 + CHARS.index(c) for c in text]


def make_pairs(n, seed):
    """Tiny SFT data made here: additions as prompt/completion text pairs."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        pairs.append((f"{a}+{b}=", f"{a + b}\n"))
    return pairs


def encode_pairs(pairs, tok, encode=None):
    """Rows ``input_ids`` = bos + prompt + completion + eos, ``labels`` = -100 on bos and the prompt."""
    encode = encode or tok.encode
    rows = []
    for prompt, completion in pairs:
        p, c = encode(prompt), encode(completion)
        ids = [tok.bos_token_id] + p + c + [tok.eos_token_id]
        rows.append({"input_ids": ids, "labels": [-100] * (1 + len(p)) + c + [tok.eos_token_id]})
    return rows


def collate(rows, pad_id):
    t = max(len(r["input_ids"]) for r in rows)
    pad = [t - len(r["input_ids"]) for r in rows]  # right padding
    return {"input_ids": torch.tensor([r["input_ids"] + [pad_id] * n for r, n in zip(rows, pad)]),
            "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * n for r, n in zip(rows, pad)]),
            "labels": torch.tensor([r["labels"] + [-100] * n for r, n in zip(rows, pad)])}


def main(argv=None, on_step=None):
    """Train; returns the logged ``[{"step", "loss", "lnsr_penalty"}, ...]``.  ``on_step(step, batch,
    outputs, reg, model)``, if given, runs after each backward and before the optimiser step."""
    from accelerate import Accelerator
    import transformers as tf

    import lnsr

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="Hugging Face causal LM (hub name or local path)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama and a character tokenizer (no weights)")
    ap.add_argument("--steps", type=int, default=40, help="optimiser steps")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--accumulation", type=int, default=1, help="gradient accumulation steps")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--lam", type=float, default=0.003)  # lnsr.config.DEFAULT_LAM
    ap.add_argument("--sigma", type=float, default=0.05)
    ap.add_argument("--inject-at", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not args.tiny and not args.model:
        raise SystemExit("pass --model <causal LM name or path>, or --tiny for a tiny random Llama")

    accelerator = Accelerator(gradient_accumulation_steps=args.accumulation)
    torch.manual_seed(args.seed)
    if args.tiny:
        tok = CharTokenizer()
        cfg = tf.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = tf.LlamaForCausalLM(cfg)
        encode = None
    else:
        tok = tf.AutoTokenizer.from_pretrained(args.model)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        model = tf.AutoModelForCausalLM.from_pretrained(args.model)
        encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        if tok.bos_token_id is None:
            tok.bos_token_id = tok.eos_token_id

    reg = lnsr.LNSR(model, sigma=args.sigma, lam=args.lam, inject_at=args.inject_at, add_to_loss=True)  # the one line

    rows = encode_pairs(make_pairs(args.steps * args.batch_size * args.accumulation, args.seed + 1), tok, encode)
    loader = torch.utils.data.DataLoader(rows, batch_size=args.batch_size, shuffle=False,
                                         collate_fn=lambda r: collate(r, tok.pad_token_id))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    model.train()
    history, window = [], []
    for i, batch in enumerate(loader):
        with accelerator.accumulate(model):
            out = model(**batch)          # out.loss = task loss + lam * P
            accelerator.backward(out.loss)
            if on_step is not None:
                on_step(i, batch, out, reg, model)
            opt.step()
            opt.zero_grad()
        window.append((float(out.loss.detach()), float(reg.penalty)))
        step = (i + 1) // args.accumulation
        if accelerator.sync_gradients and (step % args.log_every == 0 or step == args.steps):
            loss = sum(w[0] for w in window) / len(window)
            penalty = sum(w[1] for w in window) / len(window)
            history.append({"step": step, "loss": loss, "lnsr_penalty": penalty})
            window = []
            if accelerator.is_main_process:
                print(f"step {step:4d}  loss (task + lam*P) {loss:.4f}  P {penalty:.5f}")
    reg.remove()
    return history


if __name__ == "__main__":
    main()
