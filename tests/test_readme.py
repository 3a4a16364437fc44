"""README.md's Python snippets run as written (a newcomer copies them top to bottom): the API
snippet of "Use" on a small BERT, and the ops snippet of "The ops" on small tensors."""
from __future__ import annotations

import os
import re

import pytest
import torch

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def _block(after: str) -> str:
    """The first ```python block after the heading line ``after``."""
    text = open(README).read()
    start = text.index(after)
    m = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert m, f"no python block after {after!r}"
    return m.group(1)


def test_use_snippet_runs_as_written():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).train()
    batch = dict(input_ids=torch.randint(0, 97, (2, 9)), labels=torch.tensor([0, 1]))
    ns = {"model": model, "batch": batch}
    exec(compile(_block("## Use"), "README.md (Use)", "exec"), ns)
    # what the snippet promises: reg.loss was lam * P, the hooks are gone after each remove / with
    assert ns["loss"].requires_grad and torch.isfinite(ns["loss"])
    assert not model._forward_pre_hooks and not model._forward_hooks
    with ns["lnsr"].LNSR(model, lam=0.01) as reg:  # a new one attaches: nothing was left behind
        out = model(**batch)
        assert reg.loss.item() > 0 and torch.isfinite(out.loss)


def test_ops_snippet_runs_as_written():
    import lnsr

    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    y = torch.randn(4, 5, 8, generator=gen, requires_grad=True)
    ns = {"lnsr": lnsr, "numel": 10, "seed": 7, "h": torch.randn(2, 5, 8, generator=gen), "mask": mask,
          "ys": [torch.randn(4, 5, 8, generator=gen) for _ in range(2)], "y": y, "weights": None}
    exec(compile(_block("### The ops"), "README.md (The ops)", "exec"), ns)
    assert ns["z"].shape == (10,) and ns["hh"].shape == (4, 5, 8)
    # the streamed penalty of y equals layer_penalty of y, as the comment says
    torch.testing.assert_close(ns["p"], lnsr.ops.layer_penalty([y], mask=mask))
