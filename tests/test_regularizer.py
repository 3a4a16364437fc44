"""lnsr.LNSR on tiny Hugging Face models: the one-forward hooks against the two-pass definition."""
import copy

import pytest
import torch

import lnsr
from lnsr.models import enable_activation_checkpointing
from lnsr.twopass import two_pass
from tiny_models import batch, build

FAMILIES = ["bert", "roberta", "mpnet", "gpt2", "llama"]   # mpnet: the second study's BERT-base-size encoder
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
    _assert_zero(reg.loss)  # before any forward
    model.eval()
    assert torch.equal(model(**inputs).logits, ref_eval)
    model.train()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref_nograd)
    assert reg.steps == 0 and reg.penalty is None
    _assert_zero(reg.loss)
    out = model(**inputs)  # a training forward sets it
    assert reg.steps == 1 and reg.loss.requires_grad and reg.loss > 0
    torch.testing.assert_close(out.logits, ref_nograd, rtol=1e-5, atol=1e-6)
    # after a forward that is not regularised reg.loss is a zero without a graph, never the previous
    # step's tensor (a validation loss written as out.loss + reg.loss adds nothing stale)
    for mode in ("eval", "no_grad"):
        model(**inputs)
        assert reg.loss > 0
        if mode == "eval":
            model.eval()
            model(**inputs)
            model.train()
        else:
            with torch.no_grad():
                model(**inputs)
        _assert_zero(reg.loss)
        assert reg.steps == 1 + (mode == "no_grad") + 1 and reg.penalty > 0  # P of the latest regularised one
    reg.remove()


def _assert_zero(t):
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() == 0
    assert t.item() == 0.0 and not t.requires_grad and t.grad_fn is None


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
            enable_activation_checkpointing(model)
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


@pytest.mark.parametrize("mode", ["paired", "off"])
@pytest.mark.parametrize("family", ["bert", "mpnet", "gpt2", "llama"])
def test_dropout_modes_equal_the_two_pass_definition_with_dropout_on(family, mode):
    """Dropout 0.2 everywhere (embeddings, every block, attention, head).  The definition runs a
    clean pass and a noisy pass restarted at block k, whose nn.Dropout masks in blocks >= k are the
    clean pass's, replayed (paired), or where dropout there is off (off).  The same torch seed
    before both: the same masks below k and in the head, so the logits, P and the gradients agree
    only if LNSR applies one mask to both halves and keeps the task's dropout on the clean half."""
    model = build(family, dropout=0.2, seed=2)
    model.train()
    inputs = batch(family)
    opts = dict(sigma=0.1, inject_at=1)
    reg = lnsr.LNSR(model, lam=0.5, dropout=mode, backend="torch", **opts)
    torch.manual_seed(7)
    out = model(**inputs)
    (out.loss + reg.loss).backward()
    p_one, grads_one, seed_one = reg.penalty, _grads(model), reg.seed
    reg.remove()

    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    seed = lnsr.regularizer._draw_seed()  # the draw LNSR makes first, so torch's RNG is where it was
    assert seed == seed_one
    clean, p_def = two_pass(model, inputs, seed=seed, dropout=mode, **opts)
    (clean.loss + 0.5 * p_def).backward()
    torch.testing.assert_close(out.logits, clean.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p_one, p_def.detach(), rtol=1e-5, atol=0)
    _assert_grads_close(grads_one, _grads(model))
    # dropout really acts: the same forward without it gives other logits
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).logits, clean.logits, atol=1e-3)


def test_paired_and_off_differ_and_independent_masks_add_their_own_change():
    """At sigma = 0 paired masks and 'off' see no change between the halves (up to rounding:
    kernels may round a row differently at another position in the batch), independent masks
    measure dropout itself; with noise, paired and off are different penalties (the masks act)."""
    model = build("bert", dropout=0.2)
    model.train()
    inputs = batch("bert")
    penalties = {}
    for sigma in (0.0, 0.1):
        for mode in ("paired", "off", "independent"):
            with lnsr.LNSR(model, sigma=sigma, inject_at=0, dropout=mode) as reg:
                torch.manual_seed(0)
                model(**inputs)
                penalties[sigma, mode] = reg.penalty.item()
    assert penalties[0.0, "paired"] < 1e-9 and penalties[0.0, "off"] < 1e-9
    assert penalties[0.0, "independent"] > 1e-2
    assert abs(penalties[0.1, "paired"] - penalties[0.1, "off"]) > 1e-5 * penalties[0.1, "off"]  # >> rounding


@pytest.mark.parametrize("inject_at", [0, 1])
def test_layer_weights_and_normalize_against_hand_computation(inject_at):
    """Each normalisation against its formula, from the per-layer penalties P_j of the definition:
    weighted = sum w_j P_j, element = sum P_j / H, gain = sum P_j / (s^2 E_j) with s^2 the injected
    noise's energy relative to h_k and E_j the mean squared norm of block j's clean output, both
    over the valid tokens, computed here from the hidden states and the noise stream."""
    model = build("bert", layers=3)
    model.train()
    inputs = batch("bert")
    n_reg, sigma = 3 - inject_at, 0.1
    weights = [1.0, 0.0, 2.0][:n_reg]
    penalties, seeds = {}, {}
    for name, kw in {"token": {}, "weighted": {"layer_weights": weights}, "element": {"normalize": "element"},
                     "gain": {"normalize": "gain"}}.items():
        with lnsr.LNSR(model, sigma=sigma, inject_at=inject_at, backend="torch", **kw) as reg:
            torch.manual_seed(0)
            model(**inputs)
            penalties[name], seeds[name] = reg.penalty.item(), reg.seed
    seed = seeds["token"]
    assert set(seeds.values()) == {seed}
    per_layer = [two_pass(model, inputs, seed=seed, sigma=sigma, inject_at=inject_at,
                          layer_weights=[float(i == j) for i in range(n_reg)])[1].item() for j in range(n_reg)]
    assert all(p > 0 for p in per_layer)
    # the clean hidden states: block k's input and every block's output
    seen = {}
    blocks = model.bert.encoder.layer
    hooks = [blocks[inject_at].register_forward_pre_hook(lambda m, a: seen.__setitem__("h", a[0].detach()))]
    hooks += [blocks[j].register_forward_hook(lambda m, a, y, j=j: seen.__setitem__(j, y[0].detach() if
                                                                                   isinstance(y, tuple) else y.detach()))
              for j in range(inject_at, 3)]
    model(**inputs)
    for h in hooks:
        h.remove()
    m = inputs["attention_mask"].double()
    h = seen["h"].double()
    z = lnsr.ops.noise(h.numel(), seed).double().view(h.shape)
    eps = sigma * h.pow(2).mean(-1, keepdim=True).sqrt() * z  # relative noise
    s2 = ((eps ** 2).sum(-1) * m).sum() / ((h ** 2).sum(-1) * m).sum()
    energy = [((seen[j].double() ** 2).sum(-1) * m).sum() / m.sum() for j in range(inject_at, 3)]
    want = {"token": sum(per_layer), "weighted": sum(w * p for w, p in zip(weights, per_layer)),
            "element": sum(per_layer) / 32, "gain": sum(p / float(s2 * e) for p, e in zip(per_layer, energy))}
    for name, value in want.items():
        assert penalties[name] == pytest.approx(value, rel=1e-4), name
    assert 0.5 < float(s2) / sigma**2 < 2  # relative noise: s^2 is about sigma^2


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


def test_detach_clean_equals_the_definition():
    """detach_clean: the gradient of lam * P equals the definition's with the clean outputs
    detached, and differs from the gradient without it."""
    model = build("bert")
    model.train()
    inputs = batch("bert")
    grads = {}
    for detach in (False, True):
        model.zero_grad(set_to_none=True)
        with lnsr.LNSR(model, sigma=0.1, inject_at=1, lam=0.5, detach_clean=detach, backend="torch") as reg:
            torch.manual_seed(0)
            model(**inputs)
            reg.loss.backward()
            grads[detach], seed = _grads(model), reg.seed
        model.zero_grad(set_to_none=True)
        _, p_def = two_pass(model, inputs, seed=seed, sigma=0.1, inject_at=1, detach_clean=detach)
        (0.5 * p_def).backward()
        _assert_grads_close(grads[detach], _grads(model))
    w = "bert.encoder.layer.2.output.dense.weight"
    assert not torch.allclose(grads[False][w], grads[True][w])


@pytest.mark.parametrize("noise", ["gaussian", "relative", "manifold"])
def test_injected_noise_is_the_definitions(noise):
    """The noisy copy entering block k minus the clean rows is the definition's eps, built here from
    the stream lnsr.ops.noise: its kind and its scale (manifold: sigma / sqrt(anchors) times the
    span of the centred anchor tokens, the anchors drawn among the valid tokens only)."""
    from lnsr.twopass import definition_eps

    model = build("bert", layers=2)
    model.train()
    inputs = batch("bert", b=4, t=11)
    seen = []
    with lnsr.LNSR(model, sigma=0.3, noise=noise, inject_at=1, n_anchors=5, backend="torch") as reg:
        # registered after LNSR's pre-hook, so it sees the block's input [h, h + eps]
        hook = model.bert.encoder.layer[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
        model(**inputs)
        seed = reg.seed
    hook.remove()
    h2 = seen[0]
    h, noisy = h2[:4], h2[4:]
    eps = definition_eps(h, seed, sigma=0.3, noise=noise, mask=inputs["attention_mask"], n_anchors=5)
    torch.testing.assert_close(noisy - h, eps, rtol=1e-4, atol=1e-6)
    if noise == "manifold":  # eps lies in the span of 5 valid tokens, centred: rank <= 4
        assert torch.linalg.matrix_rank(eps.reshape(-1, 32).double(), rtol=1e-6) == 4
    if noise == "gaussian":  # absolute: sigma * z
        torch.testing.assert_close(eps, 0.3 * lnsr.ops.noise(h.numel(), seed).view(h.shape))


def test_a_second_lnsr_on_the_same_model_is_refused():
    model = build("bert", layers=2)
    inputs = batch("bert")
    first = lnsr.LNSR(model, sigma=0.1)
    hooks = _hook_count(model)
    for target in (model, torch.nn.DataParallel(model)):
        with pytest.raises(RuntimeError, match=r"already has an lnsr.LNSR attached .*remove\(\)"):
            lnsr.LNSR(target, sigma=0.2)
    assert _hook_count(model) == hooks
    model.train()
    model(**inputs)
    assert first.steps == 1  # the first one is untouched and works
    first.remove()
    with lnsr.LNSR(model, sigma=0.2) as second:  # after remove(), a new one attaches
        model(**inputs)
        assert second.steps == 1


def test_config_or_keywords():
    """lnsr.LNSR(model, config) and lnsr.LNSR(model, **options) are the same; keywords override."""
    model = build("bert", layers=2)
    model.train()
    inputs = batch("bert")
    cfg = lnsr.LNSRConfig(sigma=0.2, lam=0.5, inject_at=-1, layer_weights=[2.0])
    penalties = []
    for make in (lambda: lnsr.LNSR(model, cfg), lambda: lnsr.LNSR(model, **cfg.to_dict()),
                 lambda: lnsr.LNSR(model, cfg.replace(sigma=0.1), sigma=0.2)):
        with make() as reg:
            assert reg.config == cfg and reg.lam == 0.5 and reg.sigma == 0.2 and reg.inject_at == 1
            assert reg.layer_weights == [2.0]
            torch.manual_seed(0)
            model(**inputs)
            penalties.append(reg.penalty.item())
    assert penalties[0] == penalties[1] == penalties[2] > 0
    with pytest.raises(Exception):
        cfg.lam = 1.0  # frozen: derive with replace(), which validates again
    with pytest.raises(ValueError, match="lam"):
        cfg.replace(lam=-1.0)
    assert cfg.layer_weights == (2.0,)


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
