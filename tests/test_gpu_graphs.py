"""A training step captured in CUDA graphs: ``torch.compile(mode="reduce-overhead")`` (issue #14).

Skipped without a CUDA device.  LNSR passes its per-step seed to the compiled model as a device
seed (docs/design.md §2), so the graphs are captured (no CPU tensor, no host copy inside) and each
replay draws the new step's noise: the penalties differ from step to step and equal eager mode's.
"""
from __future__ import annotations

import pytest
import torch

from tiny_models import batch, build, lnsr_steps

pytestmark = pytest.mark.gpu


def _run(compile_mode, steps, backend="auto"):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    inputs = {k: v.cuda() for k, v in batch("bert").items()}
    model = build("bert", layers=2, seed=4).cuda()
    model.train()
    target = torch.compile(model, mode=compile_mode) if compile_mode else model
    vals = lnsr_steps(target, model, inputs, steps,
                      before_step=torch.compiler.cudagraph_mark_step_begin if compile_mode else None,
                      sigma=0.1, inject_at=0, lam=0.5, backend=backend)
    return vals, dict(counters["inductor"])


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_reduce_overhead_captures_the_step_and_draws_new_noise(backend):
    steps = 6
    vals, inductor = _run("reduce-overhead", steps, backend)
    assert inductor.get("cudagraph_skips", 0) == 0, f"CUDA graphs were skipped: {inductor}"
    penalties = [p for _, p in vals]
    assert len(set(penalties)) == steps, f"a replay reused a captured seed: {penalties}"
    for (l0, p0), (l1, p1) in zip(_run(None, steps, backend)[0], vals):
        assert l1 == pytest.approx(l0, rel=1e-3, abs=1e-5) and p1 == pytest.approx(p0, rel=1e-3, abs=1e-6)


def test_captured_perturb_reads_the_refilled_seed():
    """The kernel alone: a graph captured with a device seed, replayed after refilling the seed,
    gives the new seed's noise on every backend of the device (the torch reference too: its Philox
    runs in tensor ops keyed by the device seed)."""
    from lnsr.ops import backend as B
    from lnsr.ops import dispatch

    h = torch.randn(4, 7, 384, device="cuda")
    for name in dispatch.available_backends("cuda"):
        be = dispatch.resolve_backend(name, "cuda")
        seed_t = torch.zeros((), dtype=torch.int64, device="cuda")
        seed_t.fill_(B.seed_bits(11))
        be.perturb_seeded(h, seed_t, sigma=0.1, kind="relative")  # warm-up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = be.perturb_seeded(h, seed_t, sigma=0.1, kind="relative")
        for seed in (12, 2**63 + 5, 2**64 - 1):
            seed_t.fill_(B.seed_bits(seed))
            graph.replay()
            torch.testing.assert_close(out, be.perturb(h, seed, sigma=0.1, kind="relative"), rtol=0, atol=0,
                                       msg=f"{name}: replay with seed {seed}")
