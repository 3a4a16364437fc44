"""Bad input gets a clear error and leaves the model as it was; blocks are found per architecture."""
import pytest
import torch
from torch import nn

import lnsr
from tiny_models import batch, build


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
])
def test_bad_arguments_change_nothing(kwargs, exc, words):
    model = build("bert")
    inputs = batch("bert")
    snap = _snapshot(model, inputs)
    with pytest.raises(exc, match=words):
        lnsr.LNSR(model, **kwargs)
    _assert_unchanged(model, inputs, snap)


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
    assert reg.loss is None
    # nothing is left half-done: dropout restored, eval outputs unchanged, next forward works
    assert all(m.p == 0.1 for m in model.modules() if isinstance(m, nn.Dropout))
    model.train()
    model(**inputs)
    assert reg.loss is not None
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
    scale = torch.full((2, 5, 1), 0.5)  # a batch-sized extra argument: doubled with the batch
    reg = lnsr.LNSR(model, blocks=list(model.stack), inject_at=1, sigma=0.1, noise="gaussian")
    model.train()
    out = model(x, scale)
    assert out.shape == (2, 5, 1) and reg.penalty > 0
    reg.remove()


def test_wrapped_models_are_unwrapped():
    model = build("bert")
    dp = nn.DataParallel(model)
    entry, inner = lnsr.unwrap(dp)
    assert entry is model and inner is model
    compiled = torch.compile(model)
    entry, inner = lnsr.unwrap(compiled)
    assert inner is model
    reg = lnsr.LNSR(dp, sigma=0.1)
    dp.train()
    dp(**batch("bert"))
    assert reg.penalty > 0
    reg.remove()
