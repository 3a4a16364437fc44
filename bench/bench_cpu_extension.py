"""CPU benchmark of the compiled kernels (lnsr._C, backend ``cpu``) against the torch reference.

Times perturb and layer_penalty, forward + backward, at BERT-like sizes (B*T = 16*128, H = 384 and
768, 6 layers) and writes a markdown table to ``--out`` (default ./cpu_extension_<date>.md).  This is
what decides lnsr.ops.dispatch.AUTO_ORDER['cpu'].

    python bench/bench_cpu_extension.py [--reps N] [--out PATH]
"""
from __future__ import annotations

import argparse
import datetime
import os

import torch

from lnsr import ops
from lnsr.ops import reference as R
from lnsr.utils.machine import cpu_name, interleaved_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default=None, help="the markdown file (default: ./cpu_extension_<date>.md)")
    args = ap.parse_args()
    be = ops.resolve_backend("cpu", "cpu")  # raises, naming what to install, when lnsr._C is missing
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
            t = interleaved_ms({"lnsr-cpu": lambda: perturb(be), "torch": lambda: perturb(R)}, args.reps)
            rows.append((f"perturb {kind}", H, t["lnsr-cpu"], t["torch"]))
        ys = [torch.randn(2 * B, T, H, requires_grad=True) for _ in range(L)]

        def penalty(impl):
            impl.layer_penalty(ys, mask=mask, weights=None, detach_clean=False).backward()
        t = interleaved_ms({"lnsr-cpu": lambda: penalty(be), "torch": lambda: penalty(R)}, args.reps)
        rows.append((f"layer_penalty ({L} layers)", H, t["lnsr-cpu"], t["torch"]))

    date = datetime.date.today().isoformat()
    out = args.out or f"cpu_extension_{date}.md"
    lines = [
        f"# lnsr._C CPU kernels vs torch reference ({date})",
        "",
        f"- machine: {os.cpu_count()}-core CPU, model name: {cpu_name()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; shared machine (other jobs were running: load average "
        f"{os.getloadavg()[0]:.1f} at the end), median and min of {args.reps} interleaved reps",
        f"- sizes: B*T = {B}*{T}, fp32, forward + backward; perturb: one tensor [B, T, H]; layer_penalty: "
        f"{L} tensors [2B, T, H] with a padding mask",
        "- command: `python bench/bench_cpu_extension.py`",
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
