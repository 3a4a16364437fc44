"""Kernel microbenchmark: perturb and layer_penalty, every backend against eager PyTorch as a user
writes it, torch.compile of that, and the torch reference.

    python -m lnsr.benchmarks.bench_kernels                        # the device's default shapes
    python -m lnsr.benchmarks.bench_kernels --device cpu --quick   # tiny shape; Triton interpreted
    lnsr bench --only kernels                                      # the same, through the CLI

``main(argv)`` sets TRITON_INTERPRET (on the CPU) before any backend is loaded, which only works
in a process that has not loaded the Triton kernels yet: ``run_in_subprocess(argv)`` starts one
(``lnsr bench`` does; it also keeps the setting out of the step benchmark's processes).
Importing this module runs nothing.

Providers: ``lnsr-<backend>`` for every non-reference backend that loads on the device (so
lnsr-triton, lnsr-cuda, lnsr-cpu appear by themselves); ``torch``: eager PyTorch as a user writes
it (``user_perturb``: ``torch.randn_like`` noise; ``user_layer_penalty``: one masked mean of
``((noisy - clean)**2).sum(-1)`` per layer), the baseline of the ``x torch`` column;
``torch-compile``: ``torch.compile`` of that code (``x compile``); ``reference``:
``lnsr.ops.reference``, whose Philox is emulated with int64 tensor ops (the definition, slow; named
so that no speed-up is read against it by mistake).  The user code draws other noise than lnsr's
stream (which only lnsr's kernels and the reference compute), the same amount of work otherwise;
``manifold`` has no user version (NaN).  Bytes count each input read once and each
output written once; the fraction is of the device-to-device copy bandwidth measured in the same
run (bytes read + bytes written).  Rows are appended to ``--csv`` (default ./kernels.csv).
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import math
import os
import subprocess
import sys

import torch

import lnsr
from lnsr.utils import machine

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# (name, batch, seq, hidden): BERT-base up to a 7B decoder's hidden size.
SHAPES_GPU = [("bert-base", 32, 128, 768), ("7b", 8, 2048, 4096)]
SHAPES_CPU = [("bert-base", 32, 128, 768)]
SHAPES_QUICK = [("tiny", 2, 32, 768)]
INTERPRETER_MAX_ELEMS = 1 << 17  # Triton's interpreter takes seconds per call beyond this
N_LAYERS = 12


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="one tiny shape, few repetitions")
    p.add_argument("--dtype", default=None, help="comma list of fp32,fp16,bf16 (default bf16 on cuda, fp32 on cpu)")
    p.add_argument("--kinds", default="relative", help="noise kinds of perturb (comma list)")
    p.add_argument("--ops", default="perturb,layer_penalty")
    p.add_argument("--providers", default=None, help="comma list to keep (default: all available)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch-compile provider")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 gives stable numbers on a shared machine)")
    p.add_argument("--csv", default="kernels.csv", help="append rows here (default: ./kernels.csv)")
    p.add_argument("--extra-csv", default=None, help="also append the rows here (e.g. $OUT/kernels.csv)")
    p.add_argument("--summary", default=None, metavar="CSV",
                   help="only print a side-by-side table of the rows in CSV (e.g. of several runs) and exit")
    return p.parse_args(argv)


def summary(path):
    """Providers side by side per case: ms, the best lnsr backend's %copy, its speed-ups."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        print(f"(no rows in {path})")
        return
    cases, provs = {}, []
    for r in rows:
        key = (r["op"], r["pass"], r["shape"], r["dtype"])
        cases.setdefault(key, {})[r["provider"]] = float(r["median_ms"])
        cases[key]["_copy"] = float(r["copy_GBps"])
        cases[key]["_gbs_" + r["provider"]] = float(r["GBps"])
        if r["provider"] not in provs:
            provs.append(r["provider"])
    print(f"# {rows[-1]['device']} | copy {rows[-1]['copy_GBps']} GB/s | torch {rows[-1]['torch']} "
          f"triton {rows[-1]['triton']} | ms per provider; best lnsr: %copy, x torch (eager user code), "
          f"x torch-compile (of it)")
    head = f"{'op':<14}{'pass':<8}{'shape':<30}{'dtype':<9}" + "".join(f"{p:>14}" for p in provs)
    print(head + f"{'best':>13}{'%copy':>7}{'x torch':>9}{'x comp':>8}")
    for (op, pas, shape, dt), res in cases.items():
        line = f"{op:<14}{pas:<8}{shape[:29]:<30}{dt:<9}" + "".join(f"{res.get(p, math.nan):>14.3f}" for p in provs)
        lnsr_ms = {p: res[p] for p in provs if p.startswith("lnsr-") and res.get(p, math.nan) == res.get(p, math.nan)}
        if lnsr_ms:
            best = min(lnsr_ms, key=lnsr_ms.get)
            ms = lnsr_ms[best]
            line += (f"{best:>13}{100 * res['_gbs_' + best] / res['_copy']:>6.0f}%"
                     f"{res.get('torch', math.nan) / ms:>9.2f}{res.get('torch-compile', math.nan) / ms:>8.2f}")
        print(line)


def timeit(fn, device, quick: bool) -> float:
    """Median milliseconds of fn(): Triton's do_bench on a GPU (L2 flushed), else wall time."""
    if device == "cuda":
        try:
            import triton.testing
            return float(triton.testing.do_bench(fn, warmup=25, rep=100 if quick else 200, return_mode="median"))
        except ImportError:
            pass
    return machine.median_ms(fn, device, budget_s=0.5 if quick else 2.0)


def copy_bandwidth(device, quick: bool) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read + bytes written."""
    n = (1 << 28) if device == "cuda" else (1 << 25)  # 1 GiB / 128 MiB of fp32
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = timeit(lambda: dst.copy_(src), device, quick)
    return 2 * src.numel() * 4 / ms / 1e6


def device_name(device) -> str:
    if device == "cuda":
        return machine.device_name(device)
    return f"cpu ({machine.cpu_name()}, {os.cpu_count()} threads, torch {torch.get_num_threads()})"


def user_perturb(h, seed, *, sigma, kind="relative", mask=None, n_anchors=64):
    """``perturb`` as a user writes it in eager PyTorch: torch's own RNG, the rms in fp32."""
    if kind == "gaussian":
        eps = sigma * torch.randn_like(h, dtype=torch.float32)
    elif kind == "relative":
        rms = h.float().pow(2).mean(-1, keepdim=True).sqrt()
        eps = sigma * rms * torch.randn_like(h, dtype=torch.float32)
    else:
        raise NotImplementedError(f"no user-written baseline for kind={kind!r}")
    return torch.cat([h, (h.float() + eps).to(h.dtype)], dim=0)


def user_layer_penalty(ys, *, mask=None, weights=None, detach_clean=False):
    """``layer_penalty`` as a user writes it: per layer, the masked mean of ``((a - b)**2).sum(-1)``."""
    total = 0.0
    for j, y in enumerate(ys):
        b = y.shape[0] // 2
        clean, noisy = (y[:b].detach() if detach_clean else y[:b]), y[b:]
        sq = ((noisy.float() - clean.float()) ** 2).sum(-1)
        term = (sq * mask).sum() / mask.sum().clamp_min(1) if mask is not None else sq.mean()
        total = total + (1.0 if weights is None else weights[j]) * term
    return total


def providers(device, args):
    from lnsr.ops import available_backends, reference, resolve_backend

    out = {}
    for name in available_backends(device):
        if name != "torch":
            impl = resolve_backend(name, device)
            out[f"lnsr-{name}"] = (impl.perturb, impl.layer_penalty)
    out["torch"] = (user_perturb, user_layer_penalty)
    if not args.no_compile:
        out["torch-compile"] = (torch.compile(user_perturb, dynamic=False),
                                torch.compile(user_layer_penalty, dynamic=False))
    out["reference"] = (reference.perturb, reference.layer_penalty)
    if args.providers:
        keep = set(args.providers.split(","))
        out = {k: v for k, v in out.items() if k in keep}
    return out


def cases(device, dtypes, shapes, args):
    """(op, pass, label, dtype, fn builder, bytes) for every case."""
    kinds = args.kinds.split(",")
    ops = args.ops.split(",")
    for dtype in dtypes:
        esize = torch.empty((), dtype=dtype).element_size()
        for sname, b, t, hid in shapes:
            n = b * t * hid
            for op in ops:  # in the order asked for
                if op == "perturb":
                    for kind in kinds:
                        def build(perturb, _pl, backward, b=b, t=t, hid=hid, kind=kind, dtype=dtype):
                            h = torch.randn(b, t, hid, device=device, dtype=dtype, requires_grad=backward)
                            mask = torch.ones(b, t, device=device, dtype=torch.long)
                            g = torch.randn(2 * b, t, hid, device=device, dtype=dtype) if backward else None

                            def fn():
                                out = perturb(h, 12345, sigma=0.05, kind=kind, mask=mask, n_anchors=64)
                                if backward:
                                    torch.autograd.grad(out, h, g)
                            return fn
                        label = f"{sname} {b}x{t}x{hid} {kind}"
                        yield "perturb", "fwd", label, dtype, n, build, 3 * n * esize
                        yield "perturb", "fwd+bwd", label, dtype, n, build, 6 * n * esize  # + read g[2n], write grad[n]
                elif op == "layer_penalty":
                    def build(_pt, layer_penalty, backward, b=b, t=t, hid=hid, dtype=dtype):
                        ys = [torch.randn(2 * b, t, hid, device=device, dtype=dtype, requires_grad=backward)
                              for _ in range(N_LAYERS)]
                        mask = torch.ones(b, t, device=device, dtype=torch.long)
                        mask[:, int(0.9 * t):] = 0  # some padding, as in a real batch

                        def fn():
                            loss = layer_penalty(ys, mask=mask, weights=None, detach_clean=False)
                            if backward:
                                torch.autograd.grad(loss, ys)
                        return fn
                    label = f"{sname} {N_LAYERS}x{2 * b}x{t}x{hid}"
                    ybytes = N_LAYERS * 2 * n * esize
                    yield "layer_penalty", "fwd", label, dtype, 2 * n, build, ybytes
                    yield "layer_penalty", "fwd+bwd", label, dtype, 2 * n, build, 3 * ybytes  # + read ys, write grads
                else:
                    raise SystemExit(f"unknown op {op!r}; choose perturb, layer_penalty")


# --------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    args = parse_args(argv)
    if args.summary:
        summary(args.summary)
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        # Lets lnsr-triton run on CPU tensors (tiny shapes only); must precede loading the backend.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    try:
        import triton
    except ImportError:  # the torch providers still run
        triton = None
    dtypes = [getattr(torch, DTYPES[d]) for d in (args.dtype or ("bf16" if device == "cuda" else "fp32")).split(",")]
    shapes = SHAPES_QUICK if args.quick else SHAPES_GPU if device == "cuda" else SHAPES_CPU
    if args.threads:
        torch.set_num_threads(args.threads)
    provs = providers(device, args)
    name = device_name(device)
    copy_gbs = copy_bandwidth(device, args.quick)
    versions = dict(torch=torch.__version__, triton=getattr(triton, "__version__", "-"), lnsr=lnsr.__version__)
    date = _dt.datetime.now().isoformat(timespec="seconds")
    print(f"# {name} | copy bandwidth {copy_gbs:.1f} GB/s (read+write) | torch {versions['torch']} "
          f"triton {versions['triton']} | providers: {', '.join(provs)}", flush=True)

    fields = ["date", "device", "torch", "triton", "op", "pass", "shape", "dtype", "provider", "median_ms",
              "GBps", "frac_copy", "copy_GBps", "speedup_vs_torch", "note"]
    paths = [p for p in (args.csv, args.extra_csv) if p]
    for p in paths:
        os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)

    def write_rows(rows):
        for p in paths:
            new = not os.path.exists(p) or os.path.getsize(p) == 0
            with open(p, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=fields)
                if new:
                    w.writeheader()
                w.writerows(rows)

    table = []
    for op, pas, label, dtype, elems, build, nbytes in cases(device, dtypes, shapes, args):
        res = {}
        for prov, (pt, pl) in provs.items():
            note = ""
            if prov == "lnsr-triton" and device == "cpu" and elems > INTERPRETER_MAX_ELEMS:
                res[prov] = (math.nan, "skipped: interpreter")
                continue
            if prov in ("torch", "torch-compile") and op == "perturb" and label.endswith("manifold"):
                res[prov] = (math.nan, "no user-written baseline")
                continue
            try:
                fn = build(pt, pl, pas == "fwd+bwd")
                ms = timeit(fn, device, args.quick)
                if prov == "lnsr-triton" and device == "cpu":
                    note = "interpreter"
            except Exception as exc:  # one failing provider must not end the run
                ms, note = math.nan, f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
            res[prov] = (ms, note)
            if device == "cuda":
                torch.cuda.empty_cache()
        base = res.get("torch", (math.nan, ""))[0]
        rows = []
        for prov, (ms, note) in res.items():
            gbs = nbytes / ms / 1e6 if ms == ms else math.nan
            rows.append(dict(date=date, device=name, torch=versions["torch"], triton=versions["triton"], op=op,
                             **{"pass": pas}, shape=label, dtype=str(dtype).replace("torch.", ""), provider=prov,
                             median_ms=f"{ms:.4f}", GBps=f"{gbs:.4g}", frac_copy=f"{gbs / copy_gbs:.4g}",
                             copy_GBps=f"{copy_gbs:.1f}", speedup_vs_torch=f"{base / ms:.2f}", note=note))
        write_rows(rows)
        table.append((op, pas, label, str(dtype).replace("torch.", ""), res, nbytes))
        print(f"  done {op} {pas} {label}", flush=True)

    # A table with the providers side by side: ms, GB/s, fraction of copy bandwidth, speed-ups.
    print()
    print("# x torch: speed-up over eager PyTorch as a user writes it (torch.randn_like noise, one masked mean "
          "per layer); x compile: over torch.compile of that; x ref: over lnsr.ops.reference (emulated Philox)")
    print(f"{'op':<14}{'pass':<8}{'shape':<32}{'dtype':<9}{'provider':<15}{'ms':>10}{'GB/s':>9}{'%copy':>7}"
          f"{'x torch':>9}{'x compile':>10}{'x ref':>8}  note")
    for op, pas, label, dt, res, nbytes in table:
        base = res.get("torch", (math.nan,))[0]
        comp = res.get("torch-compile", (math.nan,))[0]
        ref = res.get("reference", (math.nan,))[0]
        for prov, (ms, note) in res.items():
            gbs = nbytes / ms / 1e6 if ms == ms else math.nan
            print(f"{op:<14}{pas:<8}{label:<32}{dt:<9}{prov:<15}{ms:>10.3f}{gbs:>9.3g}{100 * gbs / copy_gbs:>6.0f}%"
                  f"{base / ms:>9.2f}{comp / ms:>10.2f}{ref / ms:>8.2f}  {note}")
    print(f"\nrows appended to {', '.join(paths)}")
    return 0


def run_in_subprocess(argv=None) -> int:
    """``main(argv)`` in a fresh Python process (see the module docstring); its exit code."""
    return subprocess.run([sys.executable, "-m", "lnsr.benchmarks.bench_kernels", *(argv or [])]).returncode


if __name__ == "__main__":
    sys.exit(main())
