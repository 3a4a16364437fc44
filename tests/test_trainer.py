"""LNSRTrainer: one argument turns LNSR on; same penalty as lnsr.LNSR in a hand-written loop."""
import copy
import os

import pytest
import torch

pytest.importorskip("accelerate")
import transformers as tf  # noqa: E402

import lnsr  # noqa: E402
from lnsr.integrations import LNSRTrainer  # noqa: E402
from tiny_models import build, pad_collate, ragged_rows  # noqa: E402

LNSR_KW = dict(sigma=0.1, lam=0.3, inject_at=1, backend="torch")
SEED = 1234


class _FixSeed(tf.TrainerCallback):
    """torch.manual_seed right before each training step: the noise seed LNSR draws is then known."""

    def on_step_begin(self, args, state, control, **kw):
        torch.manual_seed(SEED + state.global_step)


class _Recording(LNSRTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.seen = getattr(self, "seen", [])
            self.seen.append({k: v.detach().clone() for k, v in inputs.items()})
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            self.seen[-1]["_seed"] = self.lnsr_reg.seed
            self.seen[-1]["_penalty"] = float(self.lnsr_reg.penalty)
        return out


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "tr"), per_device_train_batch_size=4, learning_rate=1e-3, max_steps=1,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                dataloader_num_workers=0)
    base.update(kw)
    return tf.TrainingArguments(**base)


def test_trainer_penalty_equals_hand_loop(tmp_path):
    model = build("bert", layers=3, dropout=0.1)
    init = copy.deepcopy(model)
    tr = _Recording(model=model, args=_args(tmp_path), train_dataset=ragged_rows(4), data_collator=pad_collate,
                    lnsr=LNSR_KW, callbacks=[_FixSeed()])
    tr.train()
    rec = tr.seen[0]
    logged = [h for h in tr.state.log_history if "loss" in h][0]

    # the hand-written loop: same weights, same batch, same torch seed before the forward
    hand = init
    hand.train()
    reg = lnsr.LNSR(hand, **LNSR_KW)
    inputs = {k: v for k, v in rec.items() if not k.startswith("_")}
    torch.manual_seed(SEED)
    out = hand(**inputs)
    assert reg.seed == rec["_seed"]
    assert float(reg.penalty) == pytest.approx(rec["_penalty"], rel=1e-6)
    assert logged["lnsr_penalty"] == pytest.approx(float(reg.penalty), rel=1e-6)
    assert logged["lnsr_loss"] == pytest.approx(LNSR_KW["lam"] * float(reg.penalty), rel=1e-6)
    total = float((out.loss + reg.loss).detach())
    assert logged["loss"] == pytest.approx(total, rel=1e-3, abs=1e-4)  # the Trainer logs task + lam*P
    assert logged["lnsr_ratio"] == pytest.approx(float(reg.loss.detach()) / float(out.loss.detach()), rel=1e-5)
    reg.remove()
    # hooks are gone after training: the model is a plain model again
    assert tr.lnsr_reg is None
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in model.bert.encoder.layer)


def test_trainer_without_lnsr_is_the_plain_trainer(tmp_path):
    model = build("bert", layers=2)
    tr = LNSRTrainer(model=model, args=_args(tmp_path), train_dataset=ragged_rows(4), data_collator=pad_collate)
    tr.train()
    assert tr.lnsr_reg is None and not any("lnsr_penalty" in h for h in tr.state.log_history)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['lamda'\]"):
        LNSRTrainer(model=model, args=_args(tmp_path), lnsr={"lamda": 1.0})
    # values are checked by LNSRConfig when the trainer is built, not when training starts
    with pytest.raises(ValueError, match="lam must be"):
        LNSRTrainer(model=model, args=_args(tmp_path), lnsr={"lam": -1.0})
    with pytest.raises(ValueError, match="noise must be one of"):
        LNSRTrainer(model=model, args=_args(tmp_path), lnsr=lnsr.LNSRConfig().to_dict() | {"noise": "uniform"})


def test_trainer_takes_an_lnsr_config(tmp_path):
    cfg = lnsr.LNSRConfig(**LNSR_KW)
    tr = _Recording(model=build("bert", layers=2), args=_args(tmp_path), train_dataset=ragged_rows(4),
                    data_collator=pad_collate, lnsr=cfg)
    assert tr.lnsr_config is cfg and tr.lnsr_kwargs == cfg.to_dict()
    tr.train()
    assert tr.seen[0]["_penalty"] > 0 and tr.lnsr_reg is None


def test_trainer_accumulation_eval_checkpoint(tmp_path):
    """Gradient accumulation (penalty averaged over the micro-batches), evaluation in eval mode
    during training (no penalty there), a checkpoint that loads."""
    model = build("bert", layers=2, dropout=0.1)
    args = _args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2,
                 eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=2,
                 per_device_eval_batch_size=4)
    tr = _Recording(model=model, args=args, train_dataset=ragged_rows(8), eval_dataset=ragged_rows(4, seed=5),
                    data_collator=pad_collate, lnsr=dict(LNSR_KW, lam=0.05))
    tr.train()
    assert len(tr.seen) == 4  # 2 optimizer steps x 2 micro-batches
    train_logs = [h for h in tr.state.log_history if "loss" in h]
    eval_logs = [h for h in tr.state.log_history if "eval_loss" in h]
    assert len(train_logs) == 2 and len(eval_logs) == 2
    for step, log in enumerate(train_logs):
        ps = [s["_penalty"] for s in tr.seen[2 * step:2 * step + 2]]
        assert log["lnsr_penalty"] == pytest.approx(sum(ps) / 2, rel=1e-6)
    assert not any(k.startswith("eval_lnsr") or k == "lnsr_penalty" for h in eval_logs for k in h)

    # evaluation loss is the plain model's: LNSR does nothing in eval mode
    ckpt = os.path.join(args.output_dir, "checkpoint-2")
    assert os.path.isfile(os.path.join(ckpt, "config.json"))
    reloaded = tf.BertForSequenceClassification.from_pretrained(ckpt).eval()
    batch = pad_collate(ragged_rows(4, seed=5))
    with torch.no_grad():
        plain = reloaded(**batch).loss
    assert tr.evaluate()["eval_loss"] == pytest.approx(float(plain), rel=1e-5)


@pytest.mark.parametrize("scaled_for_ga", [None, False])
def test_trainer_accumulated_gradient_matches_hand_loop(tmp_path, scaled_for_ga):
    """The gradient of one accumulated step (lr 0, so the logged grad_norm is the first step's).
    None: the Trainer's default for BERT in transformers 5 (task losses summed over micro-batches; the
    penalty is scaled as the Trainer believes the task loss is, i.e. divided by the steps).
    False: the Trainer divides the whole loss by the accumulation steps: the mean of task + lam*P."""
    model = build("bert", layers=2)
    init = copy.deepcopy(model)
    args = _args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=0.0,
                 max_grad_norm=1e9)
    tr = _Recording(model=model, args=args, train_dataset=ragged_rows(4), data_collator=pad_collate, lnsr=LNSR_KW,
                    callbacks=[_FixSeed()])
    if scaled_for_ga is not None:
        tr.loss_is_scaled_for_ga = scaled_for_ga
    tr.train()
    logged = [h for h in tr.state.log_history if "grad_norm" in h][0]

    hand = init
    hand.train()
    reg = lnsr.LNSR(hand, **LNSR_KW)
    torch.manual_seed(SEED)
    for rec in tr.seen:
        out = hand(**{k: v for k, v in rec.items() if not k.startswith("_")})
        assert reg.seed == rec["_seed"]
        if scaled_for_ga is None and tr.model_accepts_loss_kwargs:
            loss = out.loss + reg.loss / 2
        else:
            loss = (out.loss + reg.loss) / 2
        loss.backward()
    reg.remove()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in hand.parameters() if p.grad is not None))
    assert float(logged["grad_norm"]) == pytest.approx(float(norm), rel=1e-4)
