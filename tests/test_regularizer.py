"""lnsr.LNSR on tiny Hugging Face models: the one-forward hooks against the two-pass definition."""
import copy

import pytest
import torch

import lnsr
from lnsr.twopass import two_pass
from tiny_models import batch, build

FAMILIES = ["bert", "roberta", "gpt2", "llama"]
LAYERS = 3


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(g1, g2, rtol=1e-4, atol=1e-6):
    assert g1.keys() == g2.keys() and g1
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("noise", ["gaussian", "relative", "manifold"])
@pytest.mark.parametrize("inject_at", [0, 1, LAYERS - 1])
@pytest.mark.parametrize("family", FAMILIES)
def test_one_forward_equals_two_pass_definition(family, inject_at, noise):
    model = build(family, layers=LAYERS)
    model.train()
    inputs = batch(family)
    lam = 0.7
    sigma = 0.3 if noise == "gaussian" else 0.1  # gaussian is absolute: the tiny models' states are O(1)
    opts = dict(sigma=sigma, noise=noise, inject_at=inject_at, n_anchors=8)

    reg = lnsr.LNSR(model, lam=lam, backend="torch", **opts)
    out = model(**inputs)
    (out.loss + reg.loss).backward()
    seed, one_forward_p = reg.seed, reg.penalty
    grads_one = _grads(model)
    reg.remove()

    model.zero_grad(set_to_none=True)
    clean, p_def = two_pass(model, inputs, seed=seed, **opts)
    (clean.loss + lam * p_def).backward()
    grads_def = _grads(model)

    assert one_forward_p.dtype == torch.float32 and one_forward_p > 0
    torch.testing.assert_close(one_forward_p, p_def.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.logits, clean.logits, rtol=1e-5, atol=1e-6)
    _assert_grads_close(grads_one, grads_def)


@pytest.mark.parametrize("family", ["distilbert", "mistral", "qwen2"])
def test_other_families_match_definition(family):
    model = build(family, layers=2)
    model.train()
    inputs = batch(family)
    reg = lnsr.LNSR(model, sigma=0.1, inject_at=1, backend="torch")
    assert "fallback" not in reg.blocks_found
    out = model(**inputs)
    seed, p = reg.seed, reg.penalty
    reg.remove()
    clean, p_def = two_pass(model, inputs, seed=seed, sigma=0.1, inject_at=1)
    torch.testing.assert_close(p, p_def.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.logits, clean.logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_and_no_grad_are_untouched(family):
    model = build(family)
    inputs = batch(family)
    model.eval()
    ref_eval = model(**inputs).logits
    model.train()
    with torch.no_grad():
        ref_nograd = model(**inputs).logits
    reg = lnsr.LNSR(model, sigma=0.1, inject_at=1)
    model.eval()
    assert torch.equal(model(**inputs).logits, ref_eval)
    model.train()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref_nograd)
    assert reg.loss is None and reg.steps == 0
    out = model(**inputs)  # a training forward sets it
    assert reg.loss is not None and reg.steps == 1
    torch.testing.assert_close(out.logits, ref_nograd, rtol=1e-5, atol=1e-6)
    before = reg.loss
    model.eval()
    model(**inputs)
    assert reg.loss is before
    reg.remove()


def _hook_count(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_remove_restores_the_model_exactly(family):
    model = build(family, dropout=0.1)
    pristine = copy.deepcopy(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = batch(family)
    hooks_before = _hook_count(model)
    with lnsr.LNSR(model, sigma=0.1, inject_at=0, dropout="paired") as reg:
        model.train()
        out = model(**inputs)
        (out.loss + reg.loss).backward()
        assert _hook_count(model) > hooks_before
    assert not reg.attached
    assert _hook_count(model) == hooks_before
    assert all("forward" not in vars(m) for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    for a, b in zip(model.modules(), pristine.modules()):
        if hasattr(b, "p"):
            assert a.p == b.p
        if hasattr(b, "attention_dropout") and isinstance(b.attention_dropout, float):
            assert a.attention_dropout == b.attention_dropout
    model.eval()
    pristine.eval()
    assert torch.equal(model(**inputs).logits, pristine(**inputs).logits)
    model.train()
    pristine.train()
    torch.manual_seed(5)
    a = model(**inputs).logits
    torch.manual_seed(5)
    b = pristine(**inputs).logits
    assert torch.equal(a, b)


def test_exception_inside_with_removes_hooks():
    model = build("bert", dropout=0.1)
    hooks_before = _hook_count(model)
    with pytest.raises(KeyError):
        with lnsr.LNSR(model) as reg:
            model.train()
            model(**batch("bert"))
            raise KeyError("user error")
    assert _hook_count(model) == hooks_before and not reg.attached
    assert all(m.p == 0.1 for m in model.modules() if isinstance(m, torch.nn.Dropout))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_gradient_checkpointing_gives_the_same_penalty_and_gradients(family, dropout):
    inputs = batch(family)
    results = []
    for checkpointing in (False, True):
        model = build(family, dropout=dropout, seed=3)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        reg = lnsr.LNSR(model, sigma=0.1, inject_at=1, lam=0.5)
        torch.manual_seed(11)
        out = model(**inputs)
        (out.loss + reg.loss).backward()
        results.append((reg.penalty, out.loss.detach(), _grads(model)))
        reg.remove()
    (p0, l0, g0), (p1, l1, g1) = results
    torch.testing.assert_close(p0, p1, rtol=1e-6, atol=0)
    torch.testing.assert_close(l0, l1, rtol=1e-6, atol=0)
    _assert_grads_close(g0, g1, rtol=1e-5, atol=1e-7)


def test_seed_reproducibility():
    model = build("bert", dropout=0.1)
    model.train()
    inputs = batch("bert")
    reg = lnsr.LNSR(model, sigma=0.1)
    losses, seeds = [], []
    for _ in range(2):
        torch.manual_seed(123)
        model(**inputs)
        losses.append(reg.loss.detach())
        seeds.append(reg.seed)
    torch.manual_seed(124)
    model(**inputs)
    assert seeds[0] == seeds[1] and torch.equal(losses[0], losses[1])
    assert reg.seed != seeds[0] and not torch.equal(reg.loss.detach(), losses[0])
    reg.remove()


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_paired_dropout_measures_noise_only(family):
    """With dropout on: sigma = 0 gives P = 0 exactly when masks are paired (or dropout off),
    and P > 0 from dropout alone with independent masks."""
    model = build(family, dropout=0.2)
    model.train()
    inputs = batch(family)
    penalties = {}
    for mode in ("paired", "off", "independent"):
        with lnsr.LNSR(model, sigma=0.0, inject_at=0, dropout=mode) as reg:
            torch.manual_seed(0)
            model(**inputs)
            penalties[mode] = reg.penalty.item()
    assert penalties["paired"] == 0.0 and penalties["off"] == 0.0
    assert penalties["independent"] > 0.0


def test_paired_dropout_keeps_task_dropout_on_the_clean_half():
    """Paired mode still applies hidden-state dropout to the clean half (the task loss sees it)."""
    model = build("bert", dropout=0.3)
    model.train()
    inputs = batch("bert")
    with lnsr.LNSR(model, sigma=0.0, dropout="paired"):
        outs = []
        for s in (0, 1):
            torch.manual_seed(s)
            outs.append(model(**inputs).logits)
    assert not torch.allclose(outs[0], outs[1])


def test_layer_weights_and_normalize():
    model = build("bert")
    model.train()
    inputs = batch("bert")
    penalties = {}
    for name, kw in {"token": {}, "weighted": {"layer_weights": [1.0, 0.0, 2.0]},
                     "element": {"normalize": "element"}, "gain": {"normalize": "gain"}}.items():
        with lnsr.LNSR(model, sigma=0.1, **kw) as reg:
            torch.manual_seed(0)
            model(**inputs)
            penalties[name] = reg.penalty.item()
    torch.testing.assert_close(penalties["element"], penalties["token"] / 32, rtol=1e-5, atol=0)
    assert penalties["weighted"] != penalties["token"] and penalties["weighted"] > 0
    # gain is scale-free: roughly the number of layers times an O(1) amplification
    assert 0.01 < penalties["gain"] < 1000


def test_gain_is_independent_of_sigma_to_first_order():
    model = build("bert")
    model.train()
    inputs = batch("bert")
    vals = []
    for sigma in (1e-3, 2e-3):
        with lnsr.LNSR(model, sigma=sigma, normalize="gain") as reg:
            torch.manual_seed(0)
            model(**inputs)
            vals.append(reg.penalty.item())
    torch.testing.assert_close(vals[0], vals[1], rtol=2e-2, atol=0)


def test_negative_inject_at_counts_from_the_top():
    model = build("bert", layers=4)
    reg = lnsr.LNSR(model, inject_at=-1)
    assert reg.inject_at == 3
    reg.remove()


def test_detach_clean_stops_gradients_on_the_clean_path():
    model = build("bert")
    model.train()
    inputs = batch("bert")
    grads = {}
    for detach in (False, True):
        model.zero_grad(set_to_none=True)
        with lnsr.LNSR(model, sigma=0.1, inject_at=1, detach_clean=detach) as reg:
            torch.manual_seed(0)
            model(**inputs)
            reg.loss.backward()
            grads[detach] = _grads(model)
    w = "bert.encoder.layer.2.output.dense.weight"
    assert not torch.allclose(grads[False][w], grads[True][w])


def test_backend_is_passed_through(monkeypatch):
    model = build("bert")
    with pytest.raises(ValueError, match="backend"):
        lnsr.LNSR(model, backend="nope")
    assert _hook_count(model) == 0


class _CheckpointedStack(torch.nn.Module):
    """Blocks called through torch.utils.checkpoint around their __call__, so that LNSR's block
    hooks run again during the recomputation (older transformers checkpoint this way)."""

    def __init__(self, checkpoint, h=16, n=3):
        super().__init__()
        self.checkpoint = checkpoint
        self.emb = torch.nn.Linear(6, h)
        self.layers = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(h, h), torch.nn.GELU(), torch.nn.Dropout(0.2)) for _ in range(n))
        self.head = torch.nn.Linear(h, 1)

    def forward(self, x, attention_mask=None):
        h = self.emb(x)
        for blk in self.layers:
            if self.checkpoint:
                h = torch.utils.checkpoint.checkpoint(blk, h, use_reentrant=False)
            else:
                h = blk(h)
        return self.head(h).mean()


@pytest.mark.parametrize("inject_at", [0, 2])
def test_hooks_inside_checkpointed_block_calls(inject_at):
    x = torch.randn(3, 5, 6)
    mask = torch.ones(3, 5)
    mask[0, 3:] = 0
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = _CheckpointedStack(ckpt)
        model.train()
        reg = lnsr.LNSR(model, sigma=0.1, inject_at=inject_at, lam=0.5)
        torch.manual_seed(1)
        out = model(x, attention_mask=mask)
        (out + reg.loss).backward()
        results.append((reg.penalty, _grads(model)))
        reg.remove()
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=0)
    _assert_grads_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)
