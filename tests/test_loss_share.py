"""``lnsr.loss_share``: the one rule by which the penalty enters a training loss under gradient
accumulation, used by ``LNSR(add_to_loss=True)`` and by ``LNSRTrainer`` (so ``LNSRSFTTrainer``),
checked on hand-computed numbers."""
import pytest
import torch

import lnsr
from lnsr import loss_share
from lnsr.loss_share import add_to_output_loss, label_items, penalty_term
from tiny_models import batch, build


def _loss(value=0.6):
    return torch.tensor(value, requires_grad=True)


def test_without_num_items_the_penalty_enters_as_it_is():
    loss = _loss()
    assert penalty_term(loss) is loss                      # the caller's division by the steps applies
    assert penalty_term(loss, items=3) is loss             # a count alone changes nothing
    assert penalty_term(loss, accumulation_steps=4) is loss  # nor do steps, the loss not being normalised


def test_the_share_of_the_items_when_both_counts_are_known():
    # 0.6 * 3 / 12 = 0.15
    loss = _loss()
    term = penalty_term(loss, items=3, num_items_in_batch=12)
    assert term.item() == pytest.approx(0.15, rel=1e-7)
    term.backward()
    assert loss.grad.item() == pytest.approx(0.25, rel=1e-7)  # d term / d loss = the share, no gradient in it
    # tensors, as the Trainer passes them (a 1-element num_items_in_batch, float labels count)
    assert penalty_term(_loss(), items=torch.tensor(3.0), num_items_in_batch=torch.tensor([12])).item() \
        == pytest.approx(0.15, rel=1e-7)
    # a zero total counts as 1: 0.6 * 2 / 1 = 1.2
    assert penalty_term(_loss(), items=2, num_items_in_batch=0).item() == pytest.approx(1.2, rel=1e-7)
    # the caller may say the loss is not normalised although it passed the counts: unchanged
    loss = _loss()
    assert penalty_term(loss, items=3, num_items_in_batch=12, normalized=False) is loss


def test_over_the_steps_when_only_the_trainer_knows_the_loss_is_normalised():
    # LNSRTrainer: 0.6 / 4 = 0.15
    assert penalty_term(_loss(), normalized=True, accumulation_steps=4).item() == pytest.approx(0.15, rel=1e-7)
    assert penalty_term(_loss(), num_items_in_batch=12, accumulation_steps=4).item() == pytest.approx(0.15, rel=1e-7)
    loss = _loss()
    for steps in (1, 0, None):  # no accumulation: the penalty as it is
        assert penalty_term(loss, normalized=True, accumulation_steps=steps) is loss


def test_equal_micro_batches_give_both_rules_the_same_term():
    # 4 micro-batches of 5 label items: the add_to_loss share 5/20 is the trainer's 1/4
    a = penalty_term(_loss(), items=5, num_items_in_batch=20)
    b = penalty_term(_loss(), normalized=True, accumulation_steps=4)
    assert a.item() == pytest.approx(b.item(), rel=1e-7) == pytest.approx(0.15, rel=1e-7)


def test_label_items_counts_as_the_trainer_does():
    labels = torch.tensor([[1, -100, 2, 3], [-100, -100, 5, 6]])
    assert label_items(labels).item() == 5.0 and label_items(labels).dtype == torch.float32
    assert label_items(labels, shifts=True).item() == 4.0          # a causal LM's labels[..., 1:]
    shift = torch.tensor([[-100, 7, 8], [9, -100, -100]])
    assert label_items(labels, shift, shifts=True).item() == 3.0   # shift_labels win
    assert label_items(None) is None and label_items([1, 2]) is None


def test_add_to_output_loss_only_where_the_model_computed_a_loss():
    out = {"loss": torch.tensor(1.0), "logits": torch.zeros(2)}
    assert add_to_output_loss(out, torch.tensor(0.6), items=3, num_items_in_batch=12)
    assert out["loss"].item() == pytest.approx(1.15, rel=1e-7)      # 1 + 0.6 * 3 / 12
    out = {"loss": torch.tensor(1.0)}
    assert add_to_output_loss(out, torch.tensor(0.6)) and out["loss"].item() == pytest.approx(1.6, rel=1e-7)
    for out in ({"logits": torch.zeros(2)}, {"loss": None}, (torch.tensor(1.0),)):
        assert not add_to_output_loss(out, torch.tensor(0.6))
    assert out == (torch.tensor(1.0),)


def test_lnsr_and_the_trainer_both_use_penalty_term(monkeypatch):
    """The one place: ``add_to_loss`` and ``LNSRTrainer.compute_loss`` call this same function."""
    pytest.importorskip("accelerate")
    from lnsr.integrations import trainer
    assert trainer.penalty_term is loss_share.penalty_term
    calls = []

    def spy(loss, **share):
        calls.append(share)
        return loss * 0.5

    monkeypatch.setattr(loss_share, "penalty_term", spy)
    model = build("bert")
    model.train()
    inputs = batch("bert", b=4)
    with lnsr.LNSR(model, add_to_loss=True, sigma=0.1, lam=0.3, backend="torch") as reg:
        torch.manual_seed(0)
        out = model(**inputs, num_items_in_batch=8)
        term = reg.loss
    torch.manual_seed(0)
    with lnsr.LNSR(model, sigma=0.1, lam=0.3, backend="torch"):
        ref = model(**inputs, num_items_in_batch=8)
    assert len(calls) == 1 and calls[0]["items"].item() == 4.0 and calls[0]["num_items_in_batch"] == 8
    torch.testing.assert_close(out.loss, ref.loss + term * 0.5, rtol=1e-6, atol=0)
