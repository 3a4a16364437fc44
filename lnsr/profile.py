"""The noise-stability profile (the papers' error-ratio analysis) and ``lnsr profile``.

For noise injected into the hidden state entering block ``k`` (the same ``lnsr.ops.perturb`` noise
that training uses, relative sigma 0.05 by default, fixed seeds), the relative change of every block
output above it, ``||y~_j - y_j|| / ||y_j||`` per token, averaged over the valid (mask = 1) tokens of
a dataset.  The model runs in eval mode under ``torch.no_grad()`` (dropout off, so the change is due
to the noise alone); the noisy pass is a second forward whose block ``k`` input is replaced, as in
``lnsr.twopass`` — ``lnsr.LNSR`` itself does nothing in eval mode, by contract.
"""
from __future__ import annotations

import csv
import os

import numpy as np
import torch

from . import ops
from .config import LNSRConfig, add_lnsr_flags, flag_values
from .data import TASKS, collate, encode, get_task, load_task
from .models import find_blocks, replace_block_input, unwrap


def _first(output):
    return output if isinstance(output, torch.Tensor) else output[0]


@torch.no_grad()
def noise_profile(model, batches, config: LNSRConfig | None = None, *, seed: int = 0, inject_at=None,
                  **options) -> dict:
    """``{"change": [K, L+1] array, "inject_at": [...], "n_tokens": int}``.

    ``change[i, j + 1]`` is the mean relative change of block ``j``'s output for noise entering
    block ``inject_at[i]``; column 0 (layer -1 = the embeddings) and the columns ``j < k - 1`` are NaN,
    except column ``k`` (the hidden state entering block ``k``, i.e. the output of block ``k - 1``),
    which holds the relative size of the injected noise itself (about sigma for relative noise).
    ``batches``: an iterable of model keyword-argument dicts (``attention_mask`` masks the mean).
    The noise is ``lnsr.LNSR``'s: ``sigma``, ``noise``, ``n_anchors``, ``blocks`` and ``backend``
    from an ``lnsr.LNSRConfig`` and/or keywords (``LNSRConfig.make``; its other options do not enter
    an eval-mode profile); ``inject_at`` here is a list of blocks to scan (default: all).
    """
    cfg = LNSRConfig.make(config, **options)
    sigma, noise, blocks, backend = cfg.sigma, cfg.noise, cfg.blocks, cfg.backend
    _, inner = unwrap(model)
    block_list, _ = find_blocks(inner, blocks)
    n = len(block_list)
    ks = list(range(n)) if inject_at is None else [k % n for k in inject_at]
    sums = np.zeros((len(ks), n + 1))
    count = 0.0
    was_training = model.training
    model.eval()
    state = {"k": None, "seed": 0, "mask": None, "rec": {}, "in_change": None}

    def make_pre(j):
        def pre(module, args, kwargs):
            if state["k"] != j:
                return None
            def noisy(h):
                out = ops.perturb(h, state["seed"], sigma=sigma, kind=noise, mask=state["mask_bt"],
                                  n_anchors=cfg.n_anchors, backend=backend)[h.shape[0]:]
                state["in_change"] = _rel(out, h)
                return out
            return replace_block_input(args, kwargs, noisy, who=f"block {j} ({type(module).__name__})")
        return pre

    def make_post(j):
        def post(module, args, output):
            state["rec"][j] = _first(output)
        return post

    handles = []
    for j, b in enumerate(block_list):
        handles.append(b.register_forward_pre_hook(make_pre(j), with_kwargs=True))
        handles.append(b.register_forward_hook(make_post(j)))
    try:
        for bi, batch in enumerate(batches):
            mask = batch.get("attention_mask")
            state["k"], state["rec"] = None, {}
            model(**batch)
            clean = dict(state["rec"])
            y0 = clean[0]
            m = (mask.to(torch.float64) if isinstance(mask, torch.Tensor) and mask.dim() == 2
                 else torch.ones(y0.shape[:-1], dtype=torch.float64, device=y0.device))
            state["mask_bt"] = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
            count += float(m.sum())
            for i, k in enumerate(ks):
                state["k"], state["rec"] = k, {}
                state["seed"] = seed * 1_000_003 + bi * 1009 + k  # fixed per (batch, injection point)
                model(**batch)
                sums[i, k] += float((state["in_change"] * m).sum())
                for j in range(k, n):
                    sums[i, j + 1] += float((_rel(state["rec"][j], clean[j]) * m).sum())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    change = sums / max(count, 1.0)
    for i, k in enumerate(ks):
        change[i, :k] = np.nan
    return {"change": change, "inject_at": ks, "n_tokens": int(count), "sigma": sigma, "noise": noise}


def _rel(noisy, clean):
    """Per-token ``||noisy - clean|| / ||clean||`` in fp64: shape ``[B, T]``."""
    c = clean.to(torch.float64)
    return (noisy.to(torch.float64) - c).norm(dim=-1) / c.norm(dim=-1).clamp_min(1e-12)


# -- CSV / PNG ------------------------------------------------------------------------------------
def write_csv(path: str, profiles: dict) -> None:
    """Rows ``model, inject_at, layer, rel_change, n_tokens``; layer -1 = the embeddings' output."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "inject_at", "layer", "rel_change", "n_tokens", "sigma", "noise"])
        for label, prof in profiles.items():
            for i, k in enumerate(prof["inject_at"]):
                for col in range(k, prof["change"].shape[1]):
                    w.writerow([label, k, col - 1, f"{prof['change'][i, col]:.6g}", prof["n_tokens"],
                                prof["sigma"], prof["noise"]])


def plot(path: str, profiles: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(profiles), figsize=(5.2 * len(profiles), 4.0), sharey=True, squeeze=False)
    for ax, (label, prof) in zip(axes[0], profiles.items()):
        change = prof["change"]
        layers = np.arange(change.shape[1]) - 1
        cmap = plt.get_cmap("viridis")
        for i, k in enumerate(prof["inject_at"]):
            ax.plot(layers[k:], change[i, k:], marker="o", ms=3,
                    color=cmap(i / max(1, len(prof["inject_at"]) - 1)), label=f"noise at block {k}")
        ax.set_title(label if len(label) < 48 else "..." + label[-45:], fontsize=9)
        ax.set_xlabel("block output (-1 = embeddings)")
        ax.set_xticks(layers)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"mean ||y~ - y|| / ||y|| per token ({next(iter(profiles.values()))['noise']} "
                          f"sigma={next(iter(profiles.values()))['sigma']:g})")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line ----------------------------------------------------------------------------------
def add_profile_args(p) -> None:
    p.add_argument("--model", nargs="+", action="extend", default=None, metavar="NAME_OR_PATH",
                   help="one or more models side by side (e.g. a vanilla and an LNSR checkpoint saved by "
                        "`lnsr finetune --save-model`); default: the packaged all-MiniLM-L6-v2")
    p.add_argument("--compare", nargs=2, default=None, metavar=("A", "B"), help="same as --model A B")
    p.add_argument("--label", nargs="+", default=None,
                   help="names for the models in the plot and CSV (default: each model's folder name)")
    p.add_argument("--task", default="mrpc", help=f"GLUE task whose inputs are used: {', '.join(TASKS)}")
    p.add_argument("--data-dir", default=None, help="local GLUE-format folder (default: the hub via `datasets`)")
    p.add_argument("--split", choices=("dev", "train"), default="dev", help="the task's split whose inputs are used")
    p.add_argument("--max-samples", type=int, default=256, metavar="N", help="the first N examples of the split")
    p.add_argument("--max-length", type=int, default=128, help="truncation length")
    p.add_argument("--batch-size", type=int, default=32, help="examples per forward pass")
    add_lnsr_flags(p, ("sigma", "noise"))  # as lnsr finetune's: from LNSRConfig's schema
    p.add_argument("--inject-at", type=int, nargs="+", default=None, help="injection blocks (default: all)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--output-dir", default="runs/profile", help="writes profile.csv and profile.png here")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")


def profile_main(args) -> dict:
    from transformers import AutoModel, AutoTokenizer

    from .finetune.runner import default_model_path, load_pretrained

    from .packaged import resolve_model
    models = [resolve_model(m) for m in list(args.model or []) + list(args.compare or [])]
    if not models:
        models = [default_model_path()]
    packaged = None
    try:
        packaged = os.path.normpath(default_model_path())
    except SystemExit:
        pass

    def name(m):  # the packaged model's folder is just "model"
        return "all-MiniLM-L6-v2" if os.path.normpath(m) == packaged else os.path.basename(os.path.normpath(m)) or m

    labels = args.label or [name(m) for m in models]
    if len(labels) != len(models):
        raise SystemExit(f"--label gives {len(labels)} names for {len(models)} models")
    if len(set(labels)) != len(labels):  # e.g. two runs' seed1-model folders: use the parent folder too
        labels = [os.path.join(*os.path.normpath(m).split(os.sep)[-2:]) for m in models]
    try:  # checked before any model or data is loaded
        config = LNSRConfig.make(flag_values(args, ("sigma", "noise")))
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"lnsr profile: {exc}") from None
    spec = get_task(args.task)
    train, dev, source = load_task(spec, args.data_dir)
    examples = (dev if args.split == "dev" else train)[:args.max_samples]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    profiles = {}
    for label, path in zip(labels, models):
        tok = load_pretrained(AutoTokenizer, path)
        if tok.pad_token_id is None and tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        model = load_pretrained(AutoModel, path).to(device)
        feats = encode(tok, examples, args.max_length)
        side = getattr(tok, "padding_side", "right")
        batches = []
        for s in range(0, len(feats), args.batch_size):
            b = collate(feats[s:s + args.batch_size], tok.pad_token_id or 0, spec.is_regression, side)
            b.pop("labels")
            batches.append({k: v.to(device) for k, v in b.items()})
        profiles[label] = noise_profile(model, batches, config, seed=args.seed, inject_at=args.inject_at)
        profiles[label]["path"] = path
    os.makedirs(args.output_dir, exist_ok=True)
    csv_path = os.path.join(args.output_dir, "profile.csv")
    png_path = os.path.join(args.output_dir, "profile.png")
    write_csv(csv_path, profiles)
    plot(png_path, profiles)
    # a compact table: relative change at the top block for each injection point
    print(f"relative change of the last block's output ({args.noise} noise, sigma {args.sigma:g}, "
          f"{len(examples)} {spec.name} {args.split} examples from {source}):")
    ks = next(iter(profiles.values()))["inject_at"]
    print("| model | " + " | ".join(f"noise at {k}" for k in ks) + " |")
    print("|---|" + "---|" * len(ks))
    for label, prof in profiles.items():
        print(f"| {label} | " + " | ".join(f"{v:.4f}" for v in prof["change"][:, -1]) + " |")
    print(f"wrote {csv_path} and {png_path}")
    return profiles
