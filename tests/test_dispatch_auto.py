"""``auto`` by measurement (lnsr.ops.dispatch.resolve_for): on a device with two or more compiled
backends the fastest one for an op and class of inputs is measured once and kept.  On this CPU-only
machine two stand-in backends (the torch reference, one of them made slow) play the candidates."""
from __future__ import annotations

import time

import pytest
import torch

import lnsr
from lnsr.ops import dispatch
from lnsr.ops import reference as R
from lnsr.ops.backend import TorchBackend


class _Counting(TorchBackend):
    def __init__(self, name, delay):
        self.name, self.delay, self.calls = name, delay, 0

    def perturb_forward(self, h, seed, sigma, kind):
        self.calls += 1
        time.sleep(self.delay)
        return super().perturb_forward(h, seed, sigma, kind)

    def penalty_forward(self, ys, mask, weights, detach_clean):
        self.calls += 1
        time.sleep(self.delay)
        return super().penalty_forward(ys, mask, weights, detach_clean)


@pytest.fixture
def measured(monkeypatch):
    slow, fast = _Counting("slow", 0.02), _Counting("fast", 0.0)
    monkeypatch.setattr(dispatch, "MEASURED", {"cpu"})
    monkeypatch.setattr(dispatch, "candidates", lambda device: [slow, fast])
    monkeypatch.setattr(dispatch, "_CHOICES", {})
    monkeypatch.setattr(dispatch, "_TIMINGS", {})
    monkeypatch.delenv("LNSR_BACKEND", raising=False)
    monkeypatch.delenv("LNSR_AUTO", raising=False)
    return slow, fast


def test_auto_measures_once_per_input_class_and_keeps_the_fastest(measured):
    slow, fast = measured
    h = torch.randn(3, 5, 16, requires_grad=True)
    out = lnsr.ops.perturb(h, 7, sigma=0.1, kind="relative")
    torch.testing.assert_close(out, R.perturb(h, 7, sigma=0.1, kind="relative"))
    (choice,) = dispatch.auto_choices()
    assert choice["op"] == "perturb" and choice["backend"] == "fast"
    assert choice["seconds"]["slow"] > choice["seconds"]["fast"]
    timed_slow = slow.calls
    assert timed_slow == 4  # one warm-up and three timed runs, once
    lnsr.ops.perturb(torch.randn(3, 5, 16), 8, sigma=0.1, kind="relative")  # same class: no new measurement
    lnsr.ops.perturb(torch.randn(2, 7, 13), 9, sigma=0.1, kind="relative")  # 13 -> 16, 182 -> 256: same class
    assert slow.calls == timed_slow and len(dispatch.auto_choices()) == 1
    lnsr.ops.perturb(torch.randn(3, 5, 64), 8, sigma=0.1, kind="gaussian")  # another class: measured
    assert slow.calls == timed_slow + 4 and len(dispatch.auto_choices()) == 2
    ys = [torch.randn(4, 3, 8, requires_grad=True) for _ in range(2)]
    loss = lnsr.ops.layer_penalty(ys, mask=torch.ones(2, 3))
    torch.testing.assert_close(loss, R.layer_penalty(ys, mask=torch.ones(2, 3)).float())
    assert [c["backend"] for c in dispatch.auto_choices() if c["op"] == "layer_penalty"] == ["fast"]


def test_the_penalty_stream_is_measured_too(measured):
    """LNSR's penalty (PenaltyStream: a value and per-layer tap backwards) picks its backend the same
    way, timed on the first tapped layer; the value and gradient are the reference's."""
    slow, fast = measured
    y = torch.randn(4, 3, 8, requires_grad=True)
    mask = torch.ones(2, 3)
    stream = lnsr.ops.PenaltyStream(mask=mask)
    z = stream.tap(y, first=0, keep=4)
    loss = stream.loss() + z.sum() * 0
    (choice,) = [c for c in dispatch.auto_choices() if c["op"] == "penalty_stream"]
    assert choice["backend"] == "fast" and stream._impl is fast and slow.calls == 4
    y2 = y.detach().clone().requires_grad_()
    ref = R.layer_penalty([y2], mask=mask).float()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(torch.autograd.grad(loss, y)[0], torch.autograd.grad(ref, y2)[0])


def test_rule_and_forced_backends_measure_nothing(measured, monkeypatch):
    slow, fast = measured
    h = torch.randn(3, 5, 16)
    monkeypatch.setenv("LNSR_AUTO", "rule")
    lnsr.ops.perturb(h, 7, sigma=0.1, kind="relative")
    monkeypatch.setenv("LNSR_AUTO", "measure")
    lnsr.ops.perturb(h, 7, sigma=0.1, kind="relative", backend="torch")  # an explicit backend
    lnsr.ops.perturb(h.double(), 7, sigma=0.1, kind="relative")  # float64: the reference, by the fallback rule
    monkeypatch.setenv("LNSR_BACKEND", "torch")
    lnsr.ops.perturb(h, 7, sigma=0.1, kind="relative")
    assert slow.calls == fast.calls == 0 and dispatch.auto_choices() == []


def test_a_failing_candidate_is_not_chosen(measured, monkeypatch):
    slow, fast = measured

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this shape")

    monkeypatch.setattr(fast, "perturb_forward", broken)
    lnsr.ops.perturb(torch.randn(3, 5, 16), 7, sigma=0.1, kind="relative")
    (choice,) = dispatch.auto_choices()
    assert choice["backend"] == "slow" and choice["seconds"]["fast"] == float("inf")
