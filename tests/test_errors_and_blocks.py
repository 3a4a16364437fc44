"""Bad input gets a clear error and leaves the model as it was; blocks are found per architecture."""
import pytest
import torch
from torch import nn

import lnsr
from lnsr.twopass import two_pass
from tiny_models import batch, build


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(g1, g2):
    assert g1.keys() == g2.keys() and g1
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-4, atol=1e-6, msg=name)


def _snapshot(model, inputs):
    model.eval()
    out = model(**inputs).logits.detach().clone()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    p = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    return out, params, p


def _assert_unchanged(model, inputs, snap):
    out, params, p = _snapshot(model, inputs)
    assert torch.equal(out, snap[0])
    assert all(torch.equal(v, snap[1][n]) for n, v in params.items())
    assert p == snap[2]
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == 0


@pytest.mark.parametrize("kwargs, exc, words", [
    ({"sigma": -0.1}, ValueError, "sigma"),
    ({"sigma": float("inf")}, ValueError, "sigma"),
    ({"inject_at": 3}, ValueError, "inject_at=3 is out of range"),
    ({"inject_at": -4}, ValueError, "out of range"),
    ({"inject_at": 1.0}, TypeError, "inject_at"),
    ({"noise": "uniform"}, ValueError, "noise"),
    ({"lam": -1.0}, ValueError, "lam"),
    ({"normalize": "l1"}, ValueError, "normalize"),
    ({"dropout": "shared"}, ValueError, "dropout"),
    ({"layer_weights": [1.0, 2.0]}, ValueError, "layer_weights"),
    ({"blocks": "encoder.nope"}, ValueError, "encoder.nope"),
    ({"sigma": "0.1"}, TypeError, "sigma"),
    ({"lam": float("nan")}, ValueError, "lam"),
    ({"layer_weights": [1.0, -1.0, 1.0]}, ValueError, "layer_weights"),
    ({"layer_weights": "abc"}, TypeError, "layer_weights"),
    ({"detach_clean": "no"}, TypeError, "detach_clean must be True or False"),
    ({"add_to_loss": 1}, TypeError, "add_to_loss"),
    ({"n_anchors": 0}, ValueError, "n_anchors"),
    ({"every": 0}, ValueError, "every"),
    ({"noisy_fraction": 0.0}, ValueError, "noisy_fraction"),
    ({"rank": -1}, ValueError, "rank"),
    ({"backend": "nope"}, ValueError, "backend must be one of"),
    ({"lamda": 0.1}, TypeError, r"unknown option\(s\) \['lamda'\]"),
    ({"config": 0.1}, TypeError, "config must be"),
])
def test_bad_arguments_change_nothing(kwargs, exc, words):
    model = build("bert")
    inputs = batch("bert")
    snap = _snapshot(model, inputs)
    if "config" in kwargs:
        with pytest.raises(exc, match=words):
            lnsr.LNSR(model, kwargs["config"])
    else:
        with pytest.raises(exc, match=words):
            lnsr.LNSR(model, **kwargs)
    _assert_unchanged(model, inputs, snap)
    # the same check in one place: LNSRConfig itself (the model-dependent ones in resolve)
    if "config" not in kwargs and "blocks" not in kwargs:
        with pytest.raises(exc, match=words):
            lnsr.LNSRConfig.make(**kwargs).resolve(3)


def test_model_without_blocks_names_what_to_pass():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="blocks="):
        lnsr.LNSR(model)


def _forward_error(family, call, match, *, exc=ValueError, reg_kwargs=None):
    model = build(family, dropout=0.1)
    inputs = batch(family)
    snap = _snapshot(model, inputs)
    reg = lnsr.LNSR(model, **(reg_kwargs or {}))
    model.train()
    with pytest.raises(exc, match=match):
        call(model, inputs)
    assert reg.loss.item() == 0.0 and not reg.loss.requires_grad and reg.steps == 0
    # nothing is left half-done: dropout restored, eval outputs unchanged, next forward works
    assert all(m.p == 0.1 for m in model.modules() if isinstance(m, nn.Dropout))
    model.train()
    model(**inputs)
    assert reg.loss > 0 and reg.steps == 1
    reg.remove()
    _assert_unchanged(model, inputs, snap)


def test_output_hidden_states_is_rejected():
    _forward_error("bert", lambda m, x: m(**x, output_hidden_states=True), "output_hidden_states")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_kv_cache_is_rejected(family):
    _forward_error(family, lambda m, x: m(**x, use_cache=True), "cache")


def test_past_key_values_is_rejected():
    from transformers import DynamicCache
    _forward_error("llama", lambda m, x: m(**x, past_key_values=DynamicCache()), "cache")


def test_non_finite_hidden_state_names_the_block():
    def call(m, x):
        emb = m.bert.embeddings.word_embeddings(x["input_ids"])
        emb[0, 2, 1] = float("nan")
        m(inputs_embeds=emb, attention_mask=x["attention_mask"], labels=x["labels"])
    _forward_error("bert", call, "non-finite .* block 1", reg_kwargs={"inject_at": 1})


def test_mask_of_the_wrong_shape_is_rejected():
    model = build("bert")
    inputs = batch("bert")
    reg = lnsr.LNSR(model, noise="manifold")
    model.train()
    # A [B, T] mask that does not match the hidden states' token dims (the model broadcasts it).
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(input_ids=inputs["input_ids"], attention_mask=torch.ones(1, inputs["input_ids"].shape[1] + 0)[:, :5])
    reg.remove()


@pytest.mark.parametrize("family, where", [
    ("bert", "encoder.layer"), ("roberta", "encoder.layer"), ("distilbert", "transformer.layer"),
    ("gpt2", "h"), ("llama", "layers"), ("mistral", "layers"), ("qwen2", "layers"),
])
def test_blocks_found_from_the_model_type_table(family, where):
    model = build(family, layers=2)
    blocks, found = lnsr.find_blocks(model)
    assert where in found and len(blocks) == 2


class _Block(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.lin = nn.Linear(h, h)

    def forward(self, x, scale=None):
        return torch.tanh(self.lin(x)) * (1 if scale is None else scale)


class _Custom(nn.Module):
    def __init__(self, h=8, n=3):
        super().__init__()
        self.emb = nn.Linear(4, h)
        self.stack = nn.ModuleList(_Block(h) for _ in range(n))
        self.extra = nn.ModuleList([nn.Linear(h, h)])
        self.head = nn.Linear(h, 1)

    def forward(self, x, scale=None):
        h = self.emb(x)
        for blk in self.stack:
            h = blk(h, scale)
        return self.head(h)


def test_fallback_and_explicit_blocks_on_a_custom_model():
    model = _Custom()
    blocks, found = lnsr.find_blocks(model)
    assert "fallback" in found and blocks == list(model.stack)
    blocks, _ = lnsr.find_blocks(model, blocks="stack")
    assert blocks == list(model.stack)
    with pytest.raises(ValueError, match="not part of the model"):
        lnsr.find_blocks(model, blocks=[_Block(8)])
    x = torch.randn(2, 5, 4)
    scale = torch.rand(2, 5, 1) + 0.5  # a batch-sized extra argument: doubled with the batch
    with torch.no_grad():
        plain = model(x, scale)
    for blocks in (None, "stack", list(model.stack)):  # fallback, attribute path, explicit list
        reg = lnsr.LNSR(model, blocks=blocks, inject_at=1, sigma=0.1, noise="gaussian", lam=0.5, backend="torch")
        model.train()
        out = model(x, scale)
        (out.sum() + reg.loss).backward()
        p, seed, grads = reg.penalty, reg.seed, _grads(model)
        reg.remove()
        model.zero_grad(set_to_none=True)
        clean, p_def = two_pass(model, {"x": x, "scale": scale}, seed=seed, sigma=0.1, noise="gaussian",
                                inject_at=1, blocks=blocks)
        (clean.sum() + 0.5 * p_def).backward()
        assert p > 0
        torch.testing.assert_close(p, p_def.detach(), rtol=1e-5, atol=0)
        torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-6)
        _assert_grads_close(grads, _grads(model))
        model.zero_grad(set_to_none=True)


def test_wrapped_models_are_unwrapped():
    model = build("bert")
    dp = nn.DataParallel(model)
    entry, inner = lnsr.unwrap(dp)
    assert entry is model and inner is model
    compiled = torch.compile(model)
    entry, inner = lnsr.unwrap(compiled)
    assert inner is model
    inputs = batch("bert")
    reg = lnsr.LNSR(dp, sigma=0.1, lam=0.5, backend="torch")
    dp.train()
    out = dp(**inputs)
    (out.loss + reg.loss).backward()
    p, seed, grads = reg.penalty, reg.seed, _grads(model)
    reg.remove()
    model.zero_grad(set_to_none=True)
    clean, p_def = two_pass(dp, inputs, seed=seed, sigma=0.1)
    (clean.loss + 0.5 * p_def).backward()
    torch.testing.assert_close(p, p_def.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.logits, clean.logits, rtol=1e-5, atol=1e-6)
    _assert_grads_close(grads, _grads(model))


def test_enable_activation_checkpointing_takes_either_transformers_name():
    """transformers 5's activation_checkpointing_enable when present, else the older name; non-reentrant
    both ways; a module with neither gets an error that says what to do."""
    import torch.nn as nn
    calls = []

    class New(nn.Module):
        def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None):
            calls.append(("new", activation_checkpointing_kwargs))

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            calls.append(("old", gradient_checkpointing_kwargs))

    class Old(nn.Module):
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            calls.append(("old", gradient_checkpointing_kwargs))

    lnsr.enable_activation_checkpointing(New())
    lnsr.enable_activation_checkpointing(Old())
    assert calls == [("new", {"use_reentrant": False}), ("old", {"use_reentrant": False})]
    with pytest.raises(TypeError, match="torch.utils.checkpoint"):
        lnsr.enable_activation_checkpointing(nn.Linear(2, 2))
