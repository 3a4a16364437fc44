"""A backend's self-check against the torch reference, run before ``auto`` first uses it (issue #35).

Why: the CUDA kernels of ``lnsr._C`` and the Triton kernels may never have run on the GPU at hand
(a kernel can compile and still compute wrong values, or fail to launch, on an architecture no one
tested), and ``auto`` would pick them silently.  So on the device types of
``lnsr.ops.dispatch.SELFCHECK_DEVICES`` (CUDA), ``auto`` first runs ``selfcheck(backend, device)``
for every backend other than ``torch``, once per process per (backend, device): small fp32 inputs,
values and gradients compared with ``lnsr.ops.reference`` on the same device, of

- ``noise`` (an odd length, a seed above 2**63);
- ``perturb`` for every noise kind (``gaussian``, ``relative``, ``manifold`` with a padded mask),
  with an int seed, and for the dense kinds with a device seed (``perturb_seeded``, the kernel a
  captured CUDA graph replays);
- ``layer_penalty``: two layers of different widths, weights, a padded mask (zeros and one all-zero
  row), ``detach_clean`` off and on;
- the streaming penalty (``PenaltyStream``, LNSR's penalty): the taps ``PenaltyStream`` itself
  uses with this backend (lnsr._C's C++ tap where it has one) and the Python taps (what traced
  code uses).

A backend with a mismatch beyond ``TOLERANCE`` or with any exception (a launch error, a missing
kernel) is skipped by ``auto``, which takes the next of ``AUTO_ORDER``, with one RuntimeWarning per
backend per process naming what failed.  Before its first use under torch.compile the check runs
eagerly while Dynamo traces (``torch.compiler.assume_constant_result``); while a CUDA graph is being
captured it cannot run, and ``auto`` passes over unchecked backends for that call only.

- A backend named explicitly (``backend="cuda"``, ``LNSR_BACKEND=cuda``) is not checked: the choice
  is the caller's.  ``selfcheck("cuda", "cuda")`` (or ``python -m lnsr.ops.selfcheck``) checks it by hand.
- ``LNSR_SELFCHECK=0`` skips the check: ``auto`` then takes every backend that loads, as before.
- ``lnsr.ops.dispatch.selfcheck_results()`` lists the checks run in this process.

Cost: a few dozen small kernel launches per backend, plus the Triton kernels' first compilation for
these shapes (cached on disk by Triton).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time

import torch

from . import reference
from .backend import Backend, seed_bits

# fp32 inputs only: the kernels and the reference compute in fp32 but in different orders (sums,
# rms), and the noise transform's log/sqrt may differ in the last bits between libraries.  A wrong
# kernel is off by far more; a false alarm would cost a user the compiled backend.
TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-5)}
SEED = 2**63 + 17  # above 2**63: the int64 bit pattern is negative (seed_bits), and both key words are used
SIGMA = 0.1


@dataclasses.dataclass
class Failure:
    """One failed comparison: ``op`` (e.g. ``"perturb[relative] grad"``) and what went wrong."""

    op: str
    detail: str

    def __str__(self) -> str:
        return f"{self.op}: {self.detail}"


@dataclasses.dataclass
class SelfCheckResult:
    """What ``selfcheck`` found: ``ok`` when every comparison held and nothing raised."""

    backend: str
    device: str
    failures: list[Failure] = dataclasses.field(default_factory=list)
    checked: list[str] = dataclasses.field(default_factory=list)  # the comparisons made
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures

    def describe(self, limit: int = 3) -> str:
        """The first ``limit`` failures (op and max abs error, or the exception), or ``ok``."""
        if self.ok:
            return f"ok, {len(self.checked)} comparisons"
        more = len(self.failures) - limit
        return "; ".join(str(f) for f in self.failures[:limit]) + (f"; and {more} more" if more > 0 else "")

    def summary(self, limit: int = 3) -> str:
        return f"backend {self.backend!r} on {self.device}: {self.describe(limit)}"


class _Checker:
    def __init__(self, result: SelfCheckResult, device: torch.device):
        self.result, self.device = result, device
        self.gen = torch.Generator().manual_seed(35)  # a private CPU generator: the global RNG is untouched

    def randn(self, *shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen).to(self.device)

    def padded_mask(self, rows: int, tokens: int) -> torch.Tensor:
        m = (torch.rand((rows, tokens), generator=self.gen) > 0.3).to(torch.int64)
        m[0] = 0           # a sequence that is all padding
        m[-1, 0] = 1       # and at least one valid token
        m[-1, -1] = 0      # and a padded token in a valid row
        return m.to(self.device)

    def close(self, op: str, got, want) -> None:
        """Record a failure when ``got`` is not ``want`` within TOLERANCE (shape, NaN and value)."""
        self.result.checked.append(op)
        if not isinstance(got, torch.Tensor):
            self.result.failures.append(Failure(op, f"returned {type(got).__name__}, not a tensor"))
            return
        if got.shape != want.shape:
            self.result.failures.append(Failure(op, f"shape {tuple(got.shape)}, reference {tuple(want.shape)}"))
            return
        tol = TOLERANCE[torch.float32]
        got, want = got.detach().float(), want.detach().float()
        if torch.isclose(got, want, equal_nan=True, **tol).all():
            return
        err = (got - want).abs().nan_to_num(nan=math.inf)  # a NaN where the reference has a number: infinite
        err = err.masked_fill(got.isnan() & want.isnan(), 0.0)
        self.result.failures.append(Failure(op, f"max abs error {err.max().item():.3g} (tolerance "
                                                f"rtol={tol['rtol']:g}, atol={tol['atol']:g}; reference max abs "
                                                f"{want.abs().nan_to_num(0.0).max().item():.3g})"))

    def run(self, op: str, fn) -> None:
        """``fn()`` (which calls ``close``); an exception is a failure of ``op``, and the check goes on."""
        try:
            fn()
            _sync(self.device)  # a launch error surfaces here at the latest
        except Exception as exc:  # any exception at all: a kernel that raises must not be chosen either
            self.result.failures.append(Failure(op, f"raised {type(exc).__name__}: {_first_line(exc)}"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else "(no message)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _grads(out: torch.Tensor, inputs, upstream: torch.Tensor | None = None):
    return torch.autograd.grad(out, inputs, upstream, allow_unused=True)


@contextlib.contextmanager
def _eager_autograd(device: torch.device):
    # The caller may be in no_grad / inference_mode / autocast (an evaluation loop): the check needs
    # autograd and plain fp32 whatever the context.
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        with contextlib.suppress(RuntimeError, ValueError):  # a device type without autocast
            stack.enter_context(torch.autocast(device.type, enabled=False))
        yield


def _check_noise(c: _Checker, be) -> None:
    def body():
        c.close("noise", be.noise(1031, SEED, device=c.device), reference.noise(1031, SEED, device=c.device))
    c.run("noise", body)


def _check_perturb(c: _Checker, be) -> None:
    h0 = c.randn(3, 5, 33)
    up = c.randn(6, 5, 33)
    mask = c.padded_mask(3, 5)
    for kind in reference.NOISE_KINDS:
        def body(kind=kind):
            h, hr = h0.clone().requires_grad_(), h0.clone().requires_grad_()
            kw = dict(sigma=SIGMA, kind=kind, mask=mask if kind == "manifold" else None)
            out = be.perturb(h, SEED, **kw)
            ref = reference.perturb(hr, SEED, **kw)
            c.close(f"perturb[{kind}]", out, ref)
            c.close(f"perturb[{kind}] grad", _grads(out, h, up)[0], _grads(ref, hr, up)[0])
        c.run(f"perturb[{kind}]", body)
    if not hasattr(be, "perturb_seeded"):
        return
    for kind in ("gaussian", "relative"):
        def body(kind=kind):  # the device-seed kernel: what a captured CUDA graph replays
            h, hr = h0.clone().requires_grad_(), h0.clone().requires_grad_()
            seed_t = torch.full((), seed_bits(SEED), dtype=torch.int64, device=c.device)
            out = be.perturb_seeded(h, seed_t, sigma=SIGMA, kind=kind)
            ref = reference.perturb(hr, SEED, sigma=SIGMA, kind=kind)
            c.close(f"perturb_seeded[{kind}]", out, ref)
            c.close(f"perturb_seeded[{kind}] grad", _grads(out, h, up)[0], _grads(ref, hr, up)[0])
        c.run(f"perturb_seeded[{kind}]", body)


def _check_layer_penalty(c: _Checker, be) -> None:
    ys0 = [c.randn(6, 5, 33), c.randn(6, 5, 8)]
    mask = c.padded_mask(3, 5)
    for detach_clean in (False, True):
        op = f"layer_penalty[detach_clean={detach_clean}]"

        def body(detach_clean=detach_clean, op=op):
            ys = [y.clone().requires_grad_() for y in ys0]
            yr = [y.clone().requires_grad_() for y in ys0]
            kw = dict(mask=mask, weights=[1.0, 0.5], detach_clean=detach_clean)
            out = be.layer_penalty(ys, **kw)
            ref = reference.layer_penalty(yr, **kw)
            c.close(op, out, ref)
            for j, (g, gr) in enumerate(zip(_grads(out, ys), _grads(ref, yr))):
                c.close(f"{op} grad ys[{j}]", g if g is not None else torch.zeros_like(gr), gr)
        c.run(op, body)


def _check_stream(c: _Checker, be) -> None:
    from .stream import PenaltyStream, _compiled_tap  # lnsr.ops imports dispatch, which imports this lazily

    # LNSR's layout: batch 3, the last 2 rows with noisy copies: y is [first + 2m, T, H] with
    # first = 1, m = 2; the inner block passes every row on, the last block the clean batch.
    first, m = 1, 2
    ys0 = [c.randn(first + 2 * m, 5, 33), c.randn(first + 2 * m, 5, 8)]
    keeps = (first + 2 * m, first + m)
    ups = [c.randn(k, *y.shape[1:]) for k, y in zip(keeps, ys0)]
    mask = c.padded_mask(m, 5)
    weights = [1.0, 0.5]
    fast = _compiled_tap(be, mask)
    routes = [("penalty_stream", fast)] + ([("penalty_stream[python tap]", None)] if fast is not None else [])
    for name, route in routes:
        for detach_clean in (False, True):
            op = f"{name}[detach_clean={detach_clean}]"

            def body(route=route, detach_clean=detach_clean, op=op):
                stream = PenaltyStream(mask=mask, detach_clean=detach_clean, backend=be.name)
                stream._impl, stream._fast = be, route  # this backend object, not the one the name resolves to
                xs = [y.clone().requires_grad_() for y in ys0]
                zs = [stream.tap(x, first=first, keep=k) for x, k in zip(xs, keeps)]
                loss = stream.loss(weights)
                above = sum((z * u).sum() for z, u in zip(zs, ups))  # stands in for the model's gradient
                xr = [y.clone().requires_grad_() for y in ys0]
                ref = reference.layer_penalty([x[first:] for x in xr], mask=mask, weights=weights,
                                              detach_clean=detach_clean)
                above_r = sum((x[:k] * u).sum() for x, k, u in zip(xr, keeps, ups))
                c.close(op, loss, ref)
                for j, (g, gr) in enumerate(zip(_grads(above + loss, xs), _grads(above_r + ref, xr))):
                    c.close(f"{op} grad ys[{j}]", g if g is not None else torch.zeros_like(gr), gr)
            c.run(op, body)


def selfcheck(backend, device="cuda") -> SelfCheckResult:
    """Check ``backend`` (a name or a backend object) on ``device`` against the torch reference;
    never raises for what the backend does (its exceptions are failures of the result)."""
    if isinstance(backend, str):
        from .dispatch import load_backend
        backend = load_backend(backend)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if not backend.supports(device):
        raise ValueError(f"lnsr backend {backend.name!r} does not run on {device}; nothing to check")
    result = SelfCheckResult(backend=backend.name, device=str(device))
    t0 = time.perf_counter()
    c = _Checker(result, device)
    with _eager_autograd(device):
        _check_noise(c, backend)
        _check_perturb(c, backend)
        _check_layer_penalty(c, backend)
        if isinstance(backend, Backend) or hasattr(backend, "penalty_tap_backward"):
            _check_stream(c, backend)
    result.seconds = time.perf_counter() - t0
    return result


def main(argv=None) -> int:
    """``python -m lnsr.ops.selfcheck [DEVICE]``: check every backend that runs on DEVICE (default:
    cuda when present, else cpu), print the results; exit status 1 when one fails."""
    import argparse

    from .dispatch import available_backends

    parser = argparse.ArgumentParser(prog="python -m lnsr.ops.selfcheck", description=main.__doc__)
    parser.add_argument("device", nargs="?", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    failed = False
    for name in available_backends(args.device):
        res = selfcheck(name, args.device)
        failed |= not res.ok
        print(("ok    " if res.ok else "FAIL  ") + res.summary(limit=len(res.failures)) + f" [{res.seconds:.2f}s]")
    return int(failed)


if __name__ == "__main__":
    raise SystemExit(main())
