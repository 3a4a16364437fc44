"""Host overhead of the ops at host-bound sizes (issue #14, "What must be shown"; measured only).

    lnsr bench --only host [--quick]
    python -m lnsr.benchmarks.host_overhead

Side by side in one run, on CPU tensors and the ``cpu`` backend (lnsr._C):

- ``layer_penalty`` forward + backward over 12 layers of ``[4, 8, 64]`` (``2B = 4``) with a mask:
  through ``lnsr.ops`` and autograd (what ``LNSR`` does) vs the compiled ops called directly,
  ``torch.ops.lnsr.layer_penalty`` then ``torch.ops.lnsr.layer_penalty_backward``;
- ``perturb`` (relative) of ``[4, 8, 64]`` forward + backward: ``lnsr.ops.perturb`` and autograd vs
  ``torch.ops.lnsr.perturb`` then ``torch.ops.lnsr.perturb_backward``;

- ``penalty_stream``, what ``LNSR`` runs inside a model: 12 taps of ``lnsr.ops.PenaltyStream``, its
  loss and the backward vs the value op then one ``torch.ops.lnsr.penalty_tap_backward`` per layer;
  its "engine" column is lnsr._C's tap and loss node called without PenaltyStream's Python, and
  ``LNSR_PYTHON_TAP=1`` measures the Python tap instead of the C++ one (the ``python_tap`` column);

and a third column, the floor of any autograd path: the compiled op called with tensors that
require grad and ``torch.autograd.grad`` (torch's engine and the C++ autograd of lnsr._C, no
Python of lnsr).  The ratio is the time through ``lnsr.ops`` over the direct calls (design target:
at most 2x); ``vs engine`` splits it into what lnsr's Python adds and what the engine costs.
Two more columns put the target in scale: the same math in eager PyTorch through autograd (what a
user writes: ``torch.randn_like`` noise, one masked mean per layer; the same values), and the
cheapest autograd round trip there is, one builtin op on one tensor (``y.sum()`` then
``torch.autograd.grad``), which no path through autograd can undercut, and the same for a builtin op
with as many inputs as the op (``torch.stack(ys).sum()`` over 12 tensors): torch's own price of an
autograd round trip over that many tensors.  The
callables take turns, rep by rep (``lnsr.utils.machine.interleaved_ms``), so that other load on a
shared machine hits both alike; each timed call runs the pair ``inner`` times.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

N_LAYERS = 12
SHAPE = (4, 8, 64)  # [2B, T, H] of each layer; perturb's h is the same shape


def cases():
    """``{op: (through lnsr.ops, direct ops, op + torch's autograd, eager torch + autograd)}``: four
    callables per op, each one forward + backward, returning ``(forward output, [gradients])`` (the
    same values the first three ways; eager torch draws its noise from torch's RNG)."""
    import lnsr
    from lnsr.ops import backend as B
    from lnsr.benchmarks.bench_kernels import user_layer_penalty, user_perturb

    be = lnsr.ops.resolve_backend("cpu", "cpu")  # raises, naming the build command, without lnsr._C
    ops = torch.ops.lnsr
    gen = torch.Generator().manual_seed(0)
    ys = [torch.randn(SHAPE, generator=gen).requires_grad_() for _ in range(N_LAYERS)]
    ys_plain = [y.detach() for y in ys]
    mask = torch.ones(SHAPE[0] // 2, SHAPE[1], dtype=torch.long)
    mask[:, -2:] = 0
    weights = B.weights_tensor(None, N_LAYERS, "cpu")
    one = torch.ones(())

    def penalty_ops():
        loss = lnsr.ops.layer_penalty(ys, mask=mask, backend=be.name)
        return loss, torch.autograd.grad(loss, ys)

    def penalty_direct():
        loss, count = ops.layer_penalty(ys_plain, mask, weights, False)
        return loss, ops.layer_penalty_backward(one, count, ys_plain, mask, weights, False)

    def penalty_engine():
        loss, _count = ops.layer_penalty(ys, mask, weights, False)
        return loss, torch.autograd.grad(loss, ys)

    def penalty_eager():
        loss = user_layer_penalty(ys, mask=mask, weights=weights)
        return loss, torch.autograd.grad(loss, ys)

    h = torch.randn(SHAPE, generator=gen).requires_grad_()
    h_plain = h.detach()
    g = torch.randn((2 * SHAPE[0], *SHAPE[1:]), generator=gen)
    seed = 12345

    def perturb_ops():
        out = lnsr.ops.perturb(h, seed, sigma=0.05, kind="relative", backend=be.name)
        return out, torch.autograd.grad(out, h, g)

    def perturb_direct():
        return ops.perturb(h_plain, B.seed_bits(seed), 0.05, "relative"), [ops.perturb_backward(g)]

    def perturb_engine():
        out = ops.perturb(h, B.seed_bits(seed), 0.05, "relative")
        return out, torch.autograd.grad(out, h, g)

    def perturb_eager():
        out = user_perturb(h, seed, sigma=0.05, kind="relative")
        return out, torch.autograd.grad(out, h, g)

    # The streaming penalty, what LNSR runs inside a model: one tap per layer, the loss, backward.
    from lnsr.ops import extension
    C = extension.load()

    def stream_ops():
        stream = lnsr.ops.PenaltyStream(mask=mask, backend=be.name)
        for y in ys:
            stream.tap(y, first=0, keep=SHAPE[0])
        loss = stream.loss()
        return loss, torch.autograd.grad(loss, ys)

    def stream_direct():  # the value, then each layer's tap backward with its coef dP * w_j / N
        loss, count = ops.layer_penalty(ys_plain, mask, weights, False)
        coef = one / count
        return loss, [ops.penalty_tap_backward(None, coef, y, 0, mask, False) for y in ys_plain]

    def stream_engine():  # lnsr._C's tap and loss node without PenaltyStream's Python
        coefs = [C.penalty_tap(y, mask, 0, SHAPE[0], False)[1] for y in ys]
        value, count = ops.layer_penalty(ys_plain, mask, weights, False)
        loss = C.penalty_stream_loss(value, count, weights, coefs)
        return loss, torch.autograd.grad(loss, ys)

    return {"layer_penalty": (penalty_ops, penalty_direct, penalty_engine, penalty_eager),
            "perturb": (perturb_ops, perturb_direct, perturb_engine, perturb_eager),
            "penalty_stream": (stream_ops, stream_direct, stream_engine, penalty_eager)}


def min_autograd():
    """The cheapest autograd round trip: one builtin op on one tensor of the same shape."""
    y = torch.randn(SHAPE).requires_grad_()
    return lambda: torch.autograd.grad(y.sum(), y)


def builtin_autograd(n: int):
    """A builtin op on as many inputs as the op has (``torch.stack(ys).sum()``, then
    ``torch.autograd.grad`` to all ``n``): torch's own cost of an autograd round trip over n tensors."""
    ys = [torch.randn(SHAPE).requires_grad_() for _ in range(n)]
    return lambda: torch.autograd.grad(torch.stack(ys).sum(), ys)


def run(quick: bool = False) -> list[dict]:
    """One row per op: microseconds per forward + backward both ways and their ratio."""
    from lnsr.utils.machine import interleaved_ms

    inner, reps = (20, 15) if quick else (50, 41)
    rows = []
    for op, (via_ops, direct, engine, eager) in cases().items():
        def loop(fn):
            def timed():
                for _ in range(inner):
                    fn()
            return timed
        res = interleaved_ms({"ops": loop(via_ops), "direct": loop(direct), "engine": loop(engine),
                              "eager": loop(eager), "min": loop(min_autograd()),
                              "builtin": loop(builtin_autograd(1 if op == "perturb" else N_LAYERS))}, reps)
        us = {k: 1e3 * med / inner for k, (med, _best) in res.items()}
        rows.append(dict(op=op, shape=str(list(SHAPE)) if op == "perturb" else f"{N_LAYERS}x{list(SHAPE)}",
                         device="cpu", backend="cpu", python_tap=os.environ.get("LNSR_PYTHON_TAP") == "1",
                         threads=torch.get_num_threads(),
                         us_lnsr_ops=round(us["ops"], 2), us_direct=round(us["direct"], 2),
                         us_engine=round(us["engine"], 2), ratio=round(us["ops"] / us["direct"], 2),
                         engine_ratio=round(us["engine"] / us["direct"], 2),
                         ratio_vs_engine=round(us["ops"] / us["engine"], 2),
                         us_torch_eager=round(us["eager"], 2), us_min_autograd=round(us["min"], 2),
                         min_autograd_ratio=round(us["min"] / us["direct"], 2),
                         us_builtin_n=round(us["builtin"], 2), builtin_n_ratio=round(us["builtin"] / us["direct"], 2)))
    return rows


def format_table(rows) -> str:
    python_tap = bool(rows) and rows[0].get("python_tap")  # the test's fixture rows lack the column
    lines = ["# host overhead, forward + backward, CPU (lnsr._C), median us per call; ratio = lnsr.ops / "
             "direct torch.ops.lnsr calls (target <= 2x)"
             + ("; PenaltyStream with the Python tap (LNSR_PYTHON_TAP=1)" if python_tap else ""),
             f"{'op':<15}{'shape':<18}{'lnsr.ops + autograd':>21}{'direct ops':>12}{'ratio':>8}"
             f"{'op + engine':>13}{'engine/direct':>15}{'lnsr/engine':>13}{'eager torch':>13}"
             f"{'1-op autograd':>15}{'its /direct':>13}{'builtin, n inputs':>19}{'its /direct':>13}"]
    for r in rows:
        lines.append(f"{r['op']:<15}{r['shape']:<18}{r['us_lnsr_ops']:>21.1f}{r['us_direct']:>12.1f}"
                     f"{r['ratio']:>7.2f}x{r['us_engine']:>13.1f}{r['engine_ratio']:>14.2f}x"
                     f"{r['ratio_vs_engine']:>12.2f}x{r['us_torch_eager']:>13.1f}"
                     f"{r['us_min_autograd']:>15.1f}{r['min_autograd_ratio']:>12.2f}x"
                     f"{r['us_builtin_n']:>19.1f}{r['builtin_n_ratio']:>12.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: host cost, not kernels)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(format_table(run(quick=args.quick)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
