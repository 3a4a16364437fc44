"""Large-model features on tiny models: cheaper schedules, mixed precision, LoRA, torch.compile."""
import pytest
import torch

import lnsr
from lnsr.twopass import two_pass
from tiny_models import batch, build, lnsr_steps


def test_noisy_fraction_regularises_only_the_last_rows():
    model = build("bert")
    model.train()
    inputs = batch("bert", b=4)
    reg = lnsr.LNSR(model, sigma=0.1, inject_at=1, noisy_fraction=0.5)
    out = model(**inputs)
    seed, p = reg.seed, reg.penalty
    reg.remove()
    # The definition on rows 2:4 alone, with the same seed, is the same penalty.
    sub = {k: v[2:] for k, v in inputs.items()}
    _, p_def = two_pass(model, sub, seed=seed, sigma=0.1, inject_at=1)
    torch.testing.assert_close(p, p_def.detach(), rtol=1e-5, atol=0)
    model.eval()
    with torch.no_grad():
        ref = model(**inputs).logits
    assert out.logits.shape == ref.shape
    torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fraction, b, m", [(0.25, 4, 1), (0.3, 4, 2), (1e-6, 3, 1), (1.0, 3, 3)])
def test_noisy_fraction_row_count(fraction, b, m):
    model = build("bert", layers=2)
    model.train()
    seen = []
    reg = lnsr.LNSR(model, inject_at=0, noisy_fraction=fraction)
    h = model.bert.encoder.layer[1].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
    model(**batch("bert", b=b))
    h.remove()
    reg.remove()
    assert seen == [b + m]


def test_every_n_regularises_one_forward_in_n():
    model = build("bert", dropout=0.0)
    model.train()
    inputs = batch("bert")
    with torch.no_grad():
        pass
    reg = lnsr.LNSR(model, sigma=0.1, every=3)
    regularised = []
    for step in range(7):
        steps_before = reg.steps
        out = model(**inputs)
        regularised.append(reg.steps > steps_before)
        loss = out.loss + reg.loss  # always valid: a zero on plain steps
        loss.backward()
        if not regularised[-1]:
            assert reg.loss.item() == 0.0 and not reg.loss.requires_grad
    assert regularised == [True, False, False, True, False, False, True]
    reg.remove()
    with pytest.raises(ValueError, match="every"):
        lnsr.LNSR(model, every=0)
    with pytest.raises(ValueError, match="noisy_fraction"):
        lnsr.LNSR(model, noisy_fraction=1.5)


def test_bf16_autocast_penalty_is_fp32_and_close_to_fp32():
    model = build("llama")
    model.train()
    inputs = batch("llama")
    reg = lnsr.LNSR(model, sigma=0.1, inject_at=1)
    torch.manual_seed(0)
    model(**inputs)
    p32 = reg.penalty
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs)
        loss = out.loss + reg.loss
    loss.backward()
    assert reg.penalty.dtype == torch.float32 and reg.loss.dtype == torch.float32
    torch.testing.assert_close(reg.penalty, p32, rtol=5e-2, atol=0)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    reg.remove()


def test_lora_adapters_only_and_gradients_match_the_definition():
    peft = pytest.importorskip("peft")
    base = build("llama")
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(base, cfg)
    model.train()
    inputs = batch("llama")
    reg = lnsr.LNSR(model, sigma=0.1, inject_at=1, lam=0.5)
    assert "llama" in reg.blocks_found
    out = model(**inputs)
    (out.loss + reg.loss).backward()
    seed = reg.seed
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    reg.remove()
    model.zero_grad(set_to_none=True)
    clean, p_def = two_pass(model, inputs, seed=seed, sigma=0.1, inject_at=1)
    (clean.loss + 0.5 * p_def).backward()
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6)
    # train a few steps: the base weights stay bit-identical
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with lnsr.LNSR(model, sigma=0.1) as reg:
        for _ in range(3):
            loss = model(**inputs).loss + reg.loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    merged_keys = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                   for k, v in model.state_dict().items() if "lora_" not in k}
    for k, v in base_state.items():
        assert torch.equal(merged_keys[k], v), k


def _compiled_run(fullgraph, steps=3):
    """Train a tiny BERT through torch.compile (aot_eager) with LNSR attached to the compiled
    module; ``(losses and penalties per step, graphs compiled so far after each step, graph breaks)``.
    Graphs are counted by a backend that counts its own calls (one per graph Dynamo compiles)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    aot_eager = torch._dynamo.lookup_backend("aot_eager")
    compiled = []

    def counting_backend(gm, example_inputs):
        compiled.append(gm)
        return aot_eager(gm, example_inputs)

    inputs = batch("bert")
    model = build("bert", layers=2, seed=4)
    model.train()
    target = torch.compile(model, backend=counting_backend, fullgraph=fullgraph)
    graphs = []
    vals = lnsr_steps(target, model, inputs, steps, after_step=lambda: graphs.append(len(compiled)),
                      sigma=0.1, inject_at=0, lam=0.5)
    return vals, graphs, sum(counters["graph_break"].values())


def _eager_run(steps=3):
    inputs = batch("bert")
    model = build("bert", layers=2, seed=4)
    model.train()
    return lnsr_steps(model, model, inputs, steps, sigma=0.1, inject_at=0, lam=0.5)


@pytest.fixture(scope="module")
def compiled_run():
    return _compiled_run(fullgraph=False, steps=6)


@pytest.fixture(scope="module")
def eager_vals():
    return _eager_run(steps=6)


@pytest.mark.slow
def test_torch_compile_trains_like_eager_without_graph_breaks(compiled_run, eager_vals):
    """The model is compiled (graphs captured, no graph break) and trains as in eager mode."""
    vals, graphs, breaks = compiled_run
    assert graphs[0] >= 1 and breaks == 0  # Dynamo captured the forward; nothing fell back to eager
    for (l0, p0), (l1, p1) in zip(eager_vals, vals):
        assert l1 == pytest.approx(l0, rel=1e-5) and p1 == pytest.approx(p0, rel=1e-5)


@pytest.mark.slow
def test_torch_compile_does_not_recompile_every_step(compiled_run, eager_vals):
    """Six steps compile no new graph after the second (the first forward sets
    config.problem_type, which the second step's graph sees): neither the doubling cache nor the
    per-step seed is guarded on.  Each step's penalty is eager's (a stale seed would differ)."""
    vals, graphs, _ = compiled_run
    assert len(graphs) == 6 and graphs[1] >= 1
    assert graphs[2:] == [graphs[1]] * 4, f"compiled graphs after each step: {graphs}"
    penalties = [p for _, p in vals]
    assert len(set(penalties)) == len(penalties)  # a new seed, hence new noise, every step
    for (_, p0), (_, p1) in zip(eager_vals, vals):
        assert p1 == pytest.approx(p0, rel=1e-5)


@pytest.mark.slow
def test_torch_compile_inductor_default_backend(eager_vals):
    """``torch.compile(model)`` as a user writes it (Inductor, C++ codegen on the CPU): no graph
    break, no new graph after the second step, and eager's losses and penalties."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = build("bert", layers=2, seed=4)
    model.train()
    graphs = []
    vals = lnsr_steps(torch.compile(model), model, batch("bert"), 4,
                      after_step=lambda: graphs.append(counters["stats"]["unique_graphs"]),
                      sigma=0.1, inject_at=0, lam=0.5)
    assert sum(counters["graph_break"].values()) == 0
    assert graphs[2:] == [graphs[1]] * 2, f"graphs after each step: {graphs}"
    for (l0, p0), (l1, p1) in zip(eager_vals, vals):
        assert l1 == pytest.approx(l0, rel=1e-5) and p1 == pytest.approx(p0, rel=1e-5)


@pytest.mark.slow
def test_torch_compile_fullgraph():
    vals, _, breaks = _compiled_run(fullgraph=True, steps=2)
    assert breaks == 0
    for (l0, p0), (l1, p1) in zip(_eager_run(steps=2), vals):
        assert l1 == pytest.approx(l0, rel=1e-5) and p1 == pytest.approx(p0, rel=1e-5)


def test_accelerate_lora_example_equals_the_two_pass_definition():
    """examples/accelerate_lora.py --tiny (LoRA, gradient checkpointing, noisy_fraction 0.5, every 2)
    against a hand loop over the same model, data and optimiser whose penalty is the two-pass
    definition on the noisy rows, without checkpointing: the same final loss."""
    pytest.importorskip("accelerate")
    peft = pytest.importorskip("peft")
    import importlib.util
    import math
    import os

    import transformers as tf

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "accelerate_lora.py")
    spec = importlib.util.spec_from_file_location("accelerate_lora", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    steps, bs, every, fraction, lam = 6, 8, 2, 0.5, 3000.0  # large enough to move the final loss
    final = mod.main(["--tiny", "--steps", str(steps), "--noisy-fraction", str(fraction), "--every", str(every),
                      "--checkpointing", "--batch-size", str(bs), "--lam", str(lam)])

    # the hand loop: what the example does, with LNSR replaced by its definition
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2)
    model = peft.get_peft_model(tf.LlamaForCausalLM(cfg), peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    model.train()
    m = math.ceil(fraction * bs)
    for step in range(steps):
        ids = torch.randint(0, 128, (bs, 16), generator=torch.Generator().manual_seed(step * 100))
        enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        loss = task = model(**enc, labels=ids).loss
        if step % every == 0:  # LNSR's seed draw comes first in its forward; nothing else draws here
            seed = lnsr.regularizer._draw_seed()
            _, p_def = two_pass(model, {k: v[bs - m:] for k, v in enc.items()}, seed=seed, sigma=0.05, inject_at=0)
            loss = task + lam * p_def
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert final == pytest.approx(task.item(), rel=1e-6)  # without the penalty: 1.5e-5 off


def test_fp16_autocast_with_grad_scaler():
    model = build("bert")
    model.train()
    inputs = batch("bert")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with lnsr.LNSR(model, sigma=0.1, inject_at=1) as reg:
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.float16):
                out = model(**inputs)
                loss = out.loss + reg.loss
            assert reg.loss.dtype == torch.float32 and torch.isfinite(reg.loss)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
