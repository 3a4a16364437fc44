"""Peak tensor memory of one training step, counted exactly on the CPU (issue #14's memory bound).

    lnsr bench --only memory [--quick]
    python -m lnsr.benchmarks.memory [--models minilm bert-base llama-small] [--batch 8] [--seq 128]

Peak RSS (the step benchmark's column) includes the allocator's and the interpreter's own memory
and moves by tens of MB between runs.  Here every tensor allocation and free of one forward +
backward (after a warm-up step, with the parameter gradients allocated and zeroed in place, so that
what is counted is the step's activations and transients, not the gradients every case shares) is
read from the profiler's memory events, and the peak of their running sum is the step's peak tensor memory:
the same number every run.  Cases per model, fp32, the same batch:

  plain(B)     fine-tuning without a regulariser
  plain(2B)    the same on the batch twice over: plain plus doubled activations in every block
  two-pass(k)  ``lnsr.twopass`` (a clean pass, a noisy pass restarted at block k, a Python loss loop)
  lnsr(k)      ``lnsr.LNSR`` (cpu backend), k in {0, L/2}

and three figures: at k = 0, LNSR's peak minus plain(2B)'s in units of one layer's gradient
(``2B * T * H`` fp32 values; issue #14 asks for at most 1); LNSR over two-pass at each k; and LNSR
over the *doubling floor* ``plain + (plain(2B) - plain) * (L - k) / L``, the activations of plain
fine-tuning plus a second copy of those of blocks >= k (an estimate: it doubles the embeddings' and
the head's share in proportion).  No single-forward scheme without recomputation holds less than
the floor, so two-pass's own excess over the floor bounds how far below two-pass LNSR can go.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

from .step import build_model, make_batch

MODELS = ("minilm", "bert-base", "llama-small")


@contextlib.contextmanager
def _quiet_native_stderr():
    """Kineto prints a start and a stop line (and, without a GPU, a device-count error) on the
    process's stderr for every profiled region; they say nothing here.  Python exceptions still
    propagate; the warm-up step, run outside, shows any warning once."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_step_bytes(step) -> tuple[int, int]:
    """``(peak, end)``: the highest and the final net bytes of tensor memory allocated while ``step()``
    runs, from the profiler's allocation and free events in time order."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return peak, cur


def measure(model_name: str, batch: int, seq: int, methods=None) -> list[dict]:
    """The cases of one model; one row per case."""
    import lnsr
    from lnsr.twopass import two_pass

    model, decoder = build_model(model_name)
    model.train()
    n_layers = len(lnsr.find_blocks(model)[0])
    hidden = model.config.hidden_size
    rows = []
    for method, k in methods or cases(n_layers):
        b = 2 * batch if method == "plain2x" else batch
        data = make_batch(model.config.vocab_size, b, seq, decoder, "cpu")
        reg = lnsr.LNSR(model, sigma=0.05, inject_at=k, lam=0.01, backend="cpu") if method == "lnsr" else None

        def step():
            if method == "two-pass":
                out, p = two_pass(model, data, seed=1234, sigma=0.05, inject_at=k)
                loss = out.loss + 0.01 * p
            else:
                out = model(**data)
                loss = out.loss if reg is None else out.loss + reg.loss
            loss.backward()

        try:
            torch.manual_seed(0)
            step()  # warm-up: lazy state and the parameter gradients exist before the measured step
            model.zero_grad(set_to_none=False)
            torch.manual_seed(0)
            peak, _end = peak_step_bytes(step)
            model.zero_grad(set_to_none=True)
        finally:
            if reg is not None:
                reg.remove()
        rows.append({"model": model_name, "layers": n_layers, "hidden": hidden, "batch": batch, "seq": seq,
                     "method": method, "inject_at": k, "peak_mb": peak / 2**20,
                     "layer_grad_mb": 2 * batch * seq * hidden * 4 / 2**20})
    return rows


def cases(n_layers: int) -> list[tuple[str, int]]:
    half = n_layers // 2
    return [("plain", 0), ("plain2x", 0), ("two-pass", 0), ("lnsr", 0), ("two-pass", half), ("lnsr", half)]


def format_table(rows: list[dict]) -> str:
    """One line per model and k: the peaks side by side and the two checks."""
    out = ["# peak tensor memory of one fp32 training step (forward + backward), MB, exact (profiler events)",
           f"{'model':<12}{'B x T':>9}{'k':>4}{'plain':>9}{'plain(2B)':>11}{'floor':>9}{'two-pass':>10}{'lnsr':>9}"
           f"{'lnsr/2pass':>11}{'2pass/floor':>12}{'lnsr/floor':>11}{'(lnsr-plain2B)/layer grad':>27}"]
    by = {(r["model"], r["method"], r["inject_at"]): r for r in rows}
    for model in dict.fromkeys(r["model"] for r in rows):
        ks = sorted({r["inject_at"] for r in rows if r["model"] == model and r["method"] == "lnsr"})
        for k in ks:
            plain, plain2 = by.get((model, "plain", 0)), by.get((model, "plain2x", 0))
            two, ln = by.get((model, "two-pass", k)), by.get((model, "lnsr", k))
            if not (plain and two and ln):
                continue
            excess = (f"{(ln['peak_mb'] - plain2['peak_mb']) / ln['layer_grad_mb']:+.2f}"
                      if k == 0 and plain2 else "-")
            p2 = plain2["peak_mb"] if plain2 else float("nan")
            floor = plain["peak_mb"] + (p2 - plain["peak_mb"]) * (ln["layers"] - k) / ln["layers"]
            out.append(f"{model:<12}{str(ln['batch']) + 'x' + str(ln['seq']):>9}{k:>4}{plain['peak_mb']:9.1f}"
                       f"{p2:11.1f}{floor:9.1f}{two['peak_mb']:10.1f}{ln['peak_mb']:9.1f}"
                       f"{ln['peak_mb'] / two['peak_mb']:11.3f}{two['peak_mb'] / floor:12.3f}"
                       f"{ln['peak_mb'] / floor:11.3f}{excess:>27}")
    return "\n".join(out)


def run(models=MODELS, batch: int = 8, seq: int = 128, quick: bool = False) -> list[dict]:
    if quick:
        models, batch, seq = ("tiny-bert",), 8, 64
    rows = []
    for name in models:
        rows += measure(name, batch, seq)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="a tiny BERT only (seconds)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(format_table(run(args.models, args.batch, args.seq, args.quick)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
