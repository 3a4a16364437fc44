"""``lnsr.LNSR(model, add_to_loss=True)``: the penalty inside ``outputs.loss``, so that any trainer
that reads the model's loss is regularised by attaching alone."""
import copy

import pytest
import torch

import lnsr
from tiny_models import batch, build, pad_collate, ragged_rows

OPTS = dict(sigma=0.1, lam=0.3, inject_at=1, backend="torch")


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_same_params(a, b, rtol=1e-6, atol=1e-7):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=rtol, atol=atol, msg=n)


def _train(model, batches, *, add_to_loss, steps=3, lr=0.5):
    """SGD steps; with add_to_loss the loss is ``out.loss`` alone, else ``out.loss + reg.loss``."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    reg = lnsr.LNSR(model, add_to_loss=add_to_loss, **OPTS)
    seen = []
    for step in range(steps):
        torch.manual_seed(100 + step)  # the same dropout masks and noise seed in both loops
        out = model(**batches[step % len(batches)])
        loss = out.loss if add_to_loss else out.loss + reg.loss
        seen.append((float(loss.detach()), float(reg.loss.detach()), reg.seed))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    reg.remove()
    return seen


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_same_update_as_loss_plus_reg_loss(family):
    batches = [batch(family, b=3, seed=s) for s in (1, 2)]
    a = build(family, dropout=0.1, seed=5)
    b = copy.deepcopy(a)
    seen_a = _train(a, batches, add_to_loss=True)
    seen_b = _train(b, batches, add_to_loss=False)
    assert [s[2] for s in seen_a] == [s[2] for s in seen_b]  # same noise seeds
    for (la, pa, _), (lb, pb, _) in zip(seen_a, seen_b):
        assert pa > 0 and la == pytest.approx(lb, rel=1e-6) and pa == pytest.approx(pb, rel=1e-6)
    _assert_same_params(_params(a), _params(b))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in a.modules())


def test_output_loss_is_task_loss_plus_reg_loss():
    model = build("bert", dropout=0.1)
    model.train()
    inputs = batch("bert")
    with lnsr.LNSR(model, add_to_loss=True, **OPTS) as reg:
        torch.manual_seed(0)
        out = model(**inputs)
    with lnsr.LNSR(model, **OPTS) as plain:
        torch.manual_seed(0)
        ref = model(**inputs)
    assert reg.seed == plain.seed and reg.penalty > 0
    torch.testing.assert_close(out.loss, ref.loss + plain.loss, rtol=1e-6, atol=0)
    assert out.loss is out["loss"] and out[0] is out.loss  # attribute, key and index agree
    assert torch.equal(out.logits, ref.logits)


def test_nothing_is_added_when_not_regularised_or_without_a_loss():
    model = build("bert", dropout=0.1)
    inputs = batch("bert")
    model.eval()
    with torch.no_grad():
        ev = model(**inputs).loss
    with lnsr.LNSR(model, add_to_loss=True, **OPTS) as reg:
        with torch.no_grad():
            assert torch.equal(model(**inputs).loss, ev)  # eval: the model's own loss
        model.train()
        torch.manual_seed(3)
        with torch.no_grad():
            nograd = model(**inputs).loss
        torch.manual_seed(3)
        with torch.no_grad():
            assert torch.equal(model(**inputs).loss, nograd)
        assert reg.steps == 0
        out = model(**{k: v for k, v in inputs.items() if k != "labels"})  # no labels, no loss to add to
        assert out.loss is None and reg.steps == 1 and reg.penalty > 0
        torch.manual_seed(4)
        tup = model(**inputs, return_dict=False)
    with lnsr.LNSR(model, **OPTS):
        torch.manual_seed(4)
        ref = model(**inputs, return_dict=False)
    assert isinstance(tup, tuple) and torch.equal(tup[0], ref[0])  # a tuple's loss cannot be told apart: left alone


def test_dict_output_model():
    class Wrapper(torch.nn.Module):
        """A user's model that returns a plain dict with a loss."""

        def __init__(self):
            super().__init__()
            self.inner = build("bert")

        def forward(self, **kw):
            out = self.inner(**kw)
            return {"loss": out.loss, "logits": out.logits}

    model = Wrapper()
    model.train()
    inputs = batch("bert")
    with lnsr.LNSR(model, add_to_loss=True, **OPTS):
        torch.manual_seed(0)
        out = model(**inputs)
    with lnsr.LNSR(model, **OPTS) as plain:
        torch.manual_seed(0)
        ref = model(**inputs)
    torch.testing.assert_close(out["loss"], ref["loss"] + plain.loss, rtol=1e-6, atol=0)


def test_num_items_in_batch_weights_the_penalty_by_the_share_of_label_tokens():
    """Under accumulation the Trainer passes ``num_items_in_batch`` (label tokens of all the
    micro-batches; a causal LM counts ``labels[..., 1:]``) and no longer divides the loss by the
    steps: the penalty gets this micro-batch's share of the items."""
    model = build("llama")
    model.train()
    inputs = batch("llama")
    n_here = int((inputs["labels"][:, 1:] != -100).sum())
    total = 3 * n_here + 5
    with lnsr.LNSR(model, add_to_loss=True, **OPTS) as reg:
        torch.manual_seed(0)
        out = model(**inputs, num_items_in_batch=torch.tensor(total))
        term = reg.loss
    with lnsr.LNSR(model, **OPTS):
        torch.manual_seed(0)
        ref = model(**inputs, num_items_in_batch=torch.tensor(total))
    torch.testing.assert_close(out.loss, ref.loss + term * (n_here / total), rtol=1e-6, atol=0)
    # a classifier counts its labels as they are
    model = build("bert")
    model.train()
    inputs = batch("bert", b=4)
    with lnsr.LNSR(model, add_to_loss=True, **OPTS) as reg:
        torch.manual_seed(0)
        out = model(**inputs, num_items_in_batch=8)
        term = reg.loss
    torch.manual_seed(0)
    with lnsr.LNSR(model, **OPTS):
        ref = model(**inputs, num_items_in_batch=8)
    torch.testing.assert_close(out.loss, ref.loss + term / 2, rtol=1e-6, atol=0)


def test_bad_add_to_loss_is_a_clear_error():
    model = build("bert")
    with pytest.raises(TypeError, match="add_to_loss"):
        lnsr.LNSR(model, add_to_loss="yes")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# -- the plain Hugging Face Trainer ------------------------------------------------------------------
@pytest.mark.parametrize("accumulation", [1, 2])
def test_plain_trainer_with_add_to_loss_equals_lnsr_trainer(tmp_path, accumulation):
    pytest.importorskip("accelerate")
    import transformers as tf
    from lnsr.integrations import LNSRTrainer

    def args(name):
        return tf.TrainingArguments(output_dir=str(tmp_path / name), per_device_train_batch_size=2,
                                    gradient_accumulation_steps=accumulation, learning_rate=1e-2, max_steps=3,
                                    logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                                    disable_tqdm=True, dataloader_num_workers=0, optim="sgd")

    init = build("bert", layers=3, dropout=0.1, seed=2)
    data = ragged_rows(12)
    model_a = copy.deepcopy(init)
    reg = lnsr.LNSR(model_a, add_to_loss=True, **OPTS)  # the one line
    tr_a = tf.Trainer(model=model_a, args=args("a"), train_dataset=data, data_collator=pad_collate)
    tr_a.train()
    assert reg.steps == 3 * accumulation and reg.penalty > 0
    reg.remove()
    model_b = copy.deepcopy(init)
    tr_b = LNSRTrainer(model=model_b, args=args("b"), train_dataset=data, data_collator=pad_collate, lnsr=OPTS)
    tr_b.train()
    _assert_same_params(_params(model_a), _params(model_b), rtol=1e-5, atol=1e-7)
    assert not all(torch.equal(p, q) for p, q in zip(init.parameters(), model_a.parameters()))
    losses_a = [h["loss"] for h in tr_a.state.log_history if "loss" in h]
    losses_b = [h["loss"] for h in tr_b.state.log_history if "loss" in h]
    assert losses_a == pytest.approx(losses_b, rel=1e-5)  # both log task + lam * P


def test_lnsr_trainer_refuses_add_to_loss():
    pytest.importorskip("accelerate")
    import transformers as tf
    from lnsr.integrations import LNSRTrainer

    with pytest.raises(ValueError, match="add_to_loss"):
        LNSRTrainer(model=build("bert"), args=tf.TrainingArguments(output_dir="unused", report_to=[], use_cpu=True),
                    lnsr=dict(OPTS, add_to_loss=True))


# -- examples/sft_loop.py: an Accelerate SFT loop regularised by attaching alone -----------------------
def _load_example(name):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("accumulation", [1, 2])
def test_sft_example_learns_and_its_penalty_is_the_definition(accumulation):
    pytest.importorskip("accelerate")
    import transformers as tf
    from lnsr.twopass import two_pass

    mod = _load_example("sft_loop")
    steps = 30 // accumulation
    last = {}

    def on_step(i, batch, out, reg, model):  # after backward, before the update: the weights of this forward
        last.update(batch={k: v.clone() for k, v in batch.items()}, loss=float(out.loss.detach()), seed=reg.seed,
                    penalty=float(reg.penalty), state={k: v.clone() for k, v in model.state_dict().items()},
                    config=model.config)

    history = mod.main(["--tiny", "--steps", str(steps), "--accumulation", str(accumulation), "--log-every", "5",
                        "--lam", "0.5", "--sigma", "0.1"], on_step=on_step)
    losses = [h["loss"] for h in history]
    assert len(history) == steps // 5 and losses[-1] < 0.8 * losses[0]
    assert all(h["lnsr_penalty"] > 0 for h in history)
    # the last forward's penalty and loss, recomputed by the two-pass definition on the same weights and batch
    model = tf.LlamaForCausalLM(last["config"])
    model.load_state_dict(last["state"])
    model.train()
    clean, p_def = two_pass(model, last["batch"], seed=last["seed"], sigma=0.1, inject_at=0)
    assert last["penalty"] == pytest.approx(float(p_def.detach()), rel=1e-5)
    assert last["loss"] == pytest.approx(float(clean.loss.detach()) + 0.5 * float(p_def.detach()), rel=1e-5)
