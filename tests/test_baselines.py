"""The papers' baselines (lnsr.methods.baselines): each against a hand computation, clean detach, CLI runs."""
import json

import pytest
import torch
import torch.nn.functional as F

import tiny_models
from glue_tiny import save_tiny_bert, write_glue
from lnsr.cli import main
from lnsr.methods import METHODS, parse_method_spec
from lnsr.methods.baselines import L2SP, R3F, SMART, Mixout, output_divergence


def _model(dropout=0.0, hidden=32):
    return tiny_models.build("bert", layers=2, dropout=dropout, hidden=hidden)


def _batch(b=3, t=7, seed=1):
    return tiny_models.batch("bert", b=b, t=t, seed=seed)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, snap):
    sd = model.state_dict()
    return sd.keys() == snap.keys() and all(torch.equal(sd[k], snap[k]) for k in snap)


def test_registered_with_defaults():
    for name in ("l2sp", "mixout", "r3f", "smart"):
        assert name in METHODS
        label, got, opts = parse_method_spec(name, {"lam": 0.01, "sigma": 0.05})
        # LNSR's shared flags (--lam, --sigma) never leak into another method's options
        assert (label, got, opts) == (name, name, METHODS[name].DEFAULTS)
    assert parse_method_spec("r3f:lam=0.5,noise_type=normal", {})[2] == {"lam": 0.5, "eps": 1e-5, "noise_type": "normal"}
    assert parse_method_spec("lnsr", {"lam": 0.2})[2]["lam"] == 0.2


@pytest.mark.parametrize("spec,msg", [("l2sp:alpha=-1", "alpha must be >= 0"), ("mixout:p=1", r"p must be in \[0, 1\)"),
                                      ("r3f:noise_type=cauchy", "uniform or normal"), ("r3f:eps=nan", "eps must be"),
                                      ("smart:steps=0", "steps must be >= 1"), ("smart:alpha=1", "keys from lam"),
                                      ("smart:beta=1", r"beta must be in \[0, 1\)"),
                                      ("lnsr:lam=-1", "sigma and lam|lam must be")])
def test_bad_options_are_clear_errors(spec, msg):
    with pytest.raises(SystemExit, match=msg):
        parse_method_spec(spec, {})


def test_output_divergence_hand_computed():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    p, q = a.softmax(-1), b.softmax(-1)
    want = ((p * (p / q).log()).sum(-1) + (q * (q / p).log()).sum(-1)).mean()
    assert torch.allclose(output_divergence(a, b), want, atol=1e-6)
    assert float(output_divergence(a, a)) == 0.0
    r, s = torch.randn(5, 1), torch.randn(5, 1)
    assert torch.allclose(output_divergence(r, s), ((r - s) ** 2).mean())


def test_l2sp_penalty_and_gradient():
    model = _model()
    m = L2SP(alpha=0.3, beta=0.02)
    m.attach(model)
    head = [model.classifier.weight, model.classifier.bias]
    assert {id(p) for p in m.head} == {id(p) for p in head}  # the pooler is pretrained, the classifier is new
    out = model(**_batch())
    loss0 = m.extra_loss(model, None, out)
    assert torch.allclose(loss0, 0.01 * sum((p ** 2).sum() for p in head))  # at the start only the head term
    w = model.bert.encoder.layer[0].output.dense.weight
    d = torch.randn_like(w) * 0.1
    with torch.no_grad():
        w += d
    loss = m.extra_loss(model, None, out)
    assert torch.allclose(loss - loss0, 0.15 * (d ** 2).sum(), rtol=1e-4)
    assert m.stats()["penalty"] == pytest.approx(float((d ** 2).sum()), rel=1e-5)
    loss.backward()
    assert torch.allclose(w.grad, 0.3 * d, atol=1e-6)
    assert torch.allclose(model.classifier.weight.grad, 0.02 * model.classifier.weight.detach())
    assert model.bert.embeddings.word_embeddings.weight.grad.abs().max() == 0


def test_mixout_mixes_with_pretrained_and_detaches_cleanly():
    model = _model()
    params_before = [id(p) for p in model.parameters()]
    snap = _snapshot(model)
    lin = model.bert.encoder.layer[1].intermediate.dense
    w = lin.weight
    m = Mixout(p=0.4)
    m.attach(model)
    assert lin.weight is not w and lin.parametrizations.weight.original is w  # the optimizer's tensor is kept
    assert not hasattr(model.classifier, "parametrizations")  # the new head is not mixed
    with torch.no_grad():
        w += 1.0  # fine-tuned away from the pretrained value
    torch.manual_seed(0)
    seen = lin.weight.detach()
    w0 = snap["bert.encoder.layer.1.intermediate.dense.weight"]
    kept = torch.isclose(seen, w0 + 1.0 / 0.6)
    swapped = torch.isclose(seen, w0)
    assert bool((kept | swapped).all())
    assert abs(float(swapped.float().mean()) - 0.4) < 0.1  # each weight goes back to w0 with probability p
    model.eval()
    assert torch.equal(lin.weight, w)  # no mixing in evaluation
    model.train()
    out = model(**_batch())
    out.logits.sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    m.detach()
    assert [id(p) for p in model.parameters()] == params_before and lin.weight is w
    with torch.no_grad():
        w.copy_(w0)
    assert _same_state(model, snap)


def test_mixout_p0_is_plain():
    model, batch = _model(), _batch()
    with torch.no_grad():
        want = model(**batch).logits
    m = Mixout(p=0.0)
    m.attach(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, want)
    m.detach()


def test_r3f_matches_hand_computation():
    model, batch = _model(), _batch()
    m = R3F(lam=2.0, eps=0.5, noise_type="normal")
    m.attach(model)
    out = model(**batch)
    torch.manual_seed(5)
    loss = m.extra_loss(model, batch, out)
    torch.manual_seed(5)
    emb = model.bert.embeddings.word_embeddings(batch["input_ids"])
    z = torch.randn_like(emb) * 0.5
    noisy = model(inputs_embeds=emb + z, attention_mask=batch["attention_mask"]).logits
    p, q = out.logits.softmax(-1), noisy.softmax(-1)
    want = 2.0 * ((p * (p / q).log()).sum(-1) + (q * (q / p).log()).sum(-1)).mean()
    assert float(loss.detach()) > 0 and torch.allclose(loss, want, rtol=1e-3)
    loss.backward()
    assert model.bert.encoder.layer[0].output.dense.weight.grad.abs().sum() > 0
    m0 = R3F(lam=1.0, eps=0.0, noise_type="uniform")
    m0.attach(model)
    assert float(m0.extra_loss(model, batch, model(**batch)).detach()) == pytest.approx(0.0, abs=1e-7)  # no dropout, no noise


def _symkl(a, b):
    """The symmetric KL written out, in fp64: sum_c p log(p/q) + q log(q/p), mean over the batch."""
    p, q = a.double().softmax(-1), b.double().softmax(-1)
    return ((p * (p / q).log()).sum(-1) + (q * (q / p).log()).sum(-1)).mean()


def _symkl_grad_logits(adv, clean):
    """d symKL(softmax(adv), p) / d adv with p = softmax(clean) fixed, in closed form: with
    q = softmax(adv) and L = sum_c (q_c - p_c)(log q_c - log p_c), dL/dq_c = log(q_c/p_c) + 1 - p_c/q_c
    and dL/dz_k = q_k (g_k - sum_c q_c g_c); divided by the batch for the mean."""
    p, q = clean.double().softmax(-1), adv.double().softmax(-1)
    g = (q / p).log() + 1 - p / q
    return (q * (g - (q * g).sum(-1, keepdim=True)) / adv.shape[0]).float()


@pytest.mark.parametrize("steps", [1, 2])
def test_smart_against_an_independent_formula_and_detaches(steps):
    """The adversarial term by its definition, computed another way: the noise enters through a
    forward hook on the embeddings (not SMART's pre-hook on block 0), the ascent gradient is the
    closed-form derivative of the symmetric KL pushed back by a vector-Jacobian product (not autograd
    through output_divergence), the divergence is written out in fp64."""
    model, batch = _model(), _batch()
    snap = _snapshot(model)
    with torch.no_grad():
        plain = model(**batch).logits
    # a step size at which the ascent direction, not the random start, decides where delta goes
    o = dict(lam=3.0, sigma=0.1, step_size=1e4, steps=steps, mu=0.0, beta=0.99)
    m = SMART(**o)
    m.attach(model)
    out = model(**batch)
    assert torch.equal(out.logits.detach(), plain)  # the hook is inert outside the adversarial forwards
    torch.manual_seed(7)
    loss = m.extra_loss(model, batch, out)

    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    added = {}
    h = model.bert.embeddings.register_forward_hook(lambda mod, a, y: y + added["delta"])
    try:
        torch.manual_seed(7)
        delta = torch.randn(3, 7, 32) * 0.1  # delta ~ N(0, sigma^2) per element, from torch's generator
        for _ in range(steps):
            d = delta.clone().requires_grad_()
            added["delta"] = d
            adv = model(**inputs).logits
            g, = torch.autograd.grad(adv, d, grad_outputs=_symkl_grad_logits(adv.detach(), plain))
            step = delta + 1e4 * g
            delta = step / (step.abs().amax(-1, keepdim=True) + 1e-6)  # per-token inf-norm 1
        added["delta"] = delta
        want = 3.0 * _symkl(plain, model(**inputs).logits)
    finally:
        h.remove()
    assert delta.abs().amax(-1).sub(1).abs().max() < 1e-4
    assert float(loss.detach()) > 0
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-4)
    loss.backward()
    assert model.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    m.detach()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, plain)
    assert _same_state(model, snap)


def test_smart_bregman_teacher_is_a_moving_average():
    model, batch = _model(), _batch()
    m = SMART(lam=0.0, sigma=1e-5, step_size=1e-3, steps=1, mu=2.0, beta=0.9)
    m.attach(model)
    assert all(not p.requires_grad for p in m.teacher.parameters()) and not m.teacher.training
    start = [p.detach().clone() for p in model.parameters()]
    # step 1: the teacher equals the model (no dropout here), so the proximal term is 0
    assert float(m.extra_loss(model, batch, model(**batch)).detach()) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():  # an optimiser step
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = model(**batch)
    loss = m.extra_loss(model, batch, out)
    for t, p, p0 in zip(m.teacher.parameters(), model.parameters(), start):
        assert torch.allclose(t, 0.9 * p0 + 0.1 * p.detach(), atol=1e-6)
    with torch.no_grad():
        target = m.teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert float(loss.detach()) > 0 and torch.allclose(loss, 2.0 * output_divergence(out.logits, target), rtol=1e-5)
    loss.backward()
    assert model.classifier.weight.grad.abs().sum() > 0
    m.detach()
    assert m.teacher is None


def test_baselines_need_a_classification_model():
    with pytest.raises(ValueError, match="ForSequenceClassification"):
        L2SP(alpha=0.1, beta=0.0).attach(tiny_models.build("bert").bert)


def test_baselines_end_to_end(tmp_path):
    """Each baseline through `lnsr finetune` (classification and regression): finite, logged, recorded."""
    model = save_tiny_bert(tmp_path / "m", layers=1)
    for task, folder in (("rte", "RTE"), ("stsb", "STS-B")):
        write_glue(tmp_path / "glue", task, n_train=16, n_dev=6)
        main(["finetune", "--task", task, "--data-dir", str(tmp_path / "glue"), "--model", model, "--output-dir",
              str(tmp_path / "out"), "--no-progress", "--method", "vanilla", "l2sp", "mixout:p=0.3", "r3f:eps=0.1",
              "smart", "--seeds", "1", "--epochs", "1", "--batch-size", "8", "--lr", "1e-3", "--warmup-ratio", "0"])
        runs = {}
        for label in ("vanilla", "l2sp", "mixout_p0.3", "r3f_eps0.1", "smart"):
            r = json.loads((tmp_path / "out" / task / label / "seed1.json").read_text())
            runs[label] = r
            assert all(map(lambda v: v == v, r["final"].values()))  # finite metrics
        assert runs["mixout_p0.3"]["config"]["method_options"] == {"p": 0.3}
        assert runs["r3f_eps0.1"]["config"]["method_options"] == {"lam": 1.0, "eps": 0.1, "noise_type": "uniform"}
        for label in ("l2sp", "r3f_eps0.1", "smart"):
            e = runs[label]["epochs"][0]
            assert e["penalty"] > 0
            assert e["train_loss"] == pytest.approx(e["task_loss"] + e["reg_loss"], rel=1e-6)
        md = (tmp_path / "out" / task / "summary.md").read_text()
        assert all(lbl in md for lbl in runs)
