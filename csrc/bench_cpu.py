"""CPU benchmark of the compiled kernels (lnsr._C) against the torch reference.

Times perturb and layer_penalty, forward + backward, at BERT-like sizes (B*T = 16*128, H = 384 and
768, 6 layers) and writes bench/results/cpu_extension_<date>.md.  This is what decides
lnsr.ops.dispatch.AUTO_ORDER['cpu'].  Run: python csrc/bench_cpu.py [--reps N] [--out PATH]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import time

import torch

from lnsr.ops import extension
from lnsr.ops import reference as R


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def timeit(fns: dict, reps: int) -> dict:
    """(median, min) ms per callable; callables interleaved so that machine noise hits all alike."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: (1e3 * statistics.median(v), 1e3 * min(v)) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    be = extension.backend("cpu")
    torch.manual_seed(0)
    rows = []
    B, T, L = 16, 128, 6
    for H in (384, 768):
        h = torch.randn(B, T, H, requires_grad=True)
        mask = torch.ones(B, T)
        mask[:, 96:] = 0  # some padding, as in a real batch
        for kind in ("gaussian", "relative", "manifold"):
            def perturb(impl, kind=kind):
                out = impl.perturb(h, 1234, sigma=0.05, kind=kind, mask=mask)
                out.backward(torch.ones_like(out))
            t = timeit({"lnsr-cpu": lambda: perturb(be), "torch": lambda: perturb(R)}, args.reps)
            rows.append((f"perturb {kind}", H, t["lnsr-cpu"], t["torch"]))
        ys = [torch.randn(2 * B, T, H, requires_grad=True) for _ in range(L)]

        def penalty(impl):
            impl.layer_penalty(ys, mask=mask, weights=None, detach_clean=False).backward()
        t = timeit({"lnsr-cpu": lambda: penalty(be), "torch": lambda: penalty(R)}, args.reps)
        rows.append((f"layer_penalty ({L} layers)", H, t["lnsr-cpu"], t["torch"]))

    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(os.path.dirname(__file__), "..", "bench", "results", f"cpu_extension_{date}.md")
    lines = [
        f"# lnsr._C CPU kernels vs torch reference ({date})",
        "",
        f"- machine: {os.cpu_count()}-core CPU, `lscpu` model name: {cpu_model()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; shared machine (other jobs were running: load average "
        f"{os.getloadavg()[0]:.1f} at the end), median and min of {args.reps} interleaved reps",
        f"- sizes: B*T = {B}*{T}, fp32, forward + backward; perturb: one tensor [B, T, H]; layer_penalty: "
        f"{L} tensors [2B, T, H] with a padding mask",
        "- command: `python csrc/bench_cpu.py`",
        "",
        "| op | H | lnsr-cpu median (ms) | torch median (ms) | speed-up (median) | lnsr-cpu min (ms) | torch min (ms) | speed-up (min) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, H, a, b in rows:
        lines.append(f"| {name} | {H} | {a[0]:.2f} | {b[0]:.2f} | {b[0] / a[0]:.2f}x | {a[1]:.2f} | {b[1]:.2f} | "
                     f"{b[1] / a[1]:.2f}x |")
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
