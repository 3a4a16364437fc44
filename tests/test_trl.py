"""LNSRSFTTrainer: TRL's SFTTrainer with LNSR by one argument (tiny random Llama + LoRA, CPU).

The reference is the definition: each recorded micro-batch's SFT loss (the summed negative
log-likelihood of its labels over the accumulated batch's label count, as SFTTrainer computes it)
plus lam * P from ``lnsr.twopass.two_pass`` with the noise seed LNSR drew, divided by the
accumulation steps, on an untouched copy of the starting LoRA model; its gradients and SGD steps
must equal the trainer's.  Skipped without trl / peft / datasets.
"""
import copy
import subprocess
import sys
import types

import pytest
import torch

import lnsr
from lnsr.twopass import two_pass
from tiny_models import VOCAB, build

LNSR_KW = dict(sigma=0.5, lam=20.0, inject_at=1, backend="torch")


@pytest.fixture
def sft(monkeypatch):
    trl = pytest.importorskip("trl", reason="TRL is not installed (pip install 'lnsr[trl]')")
    peft = pytest.importorskip("peft", reason="peft is not installed")
    datasets = pytest.importorskip("datasets", reason="datasets is not installed")
    tokenizers = pytest.importorskip("tokenizers", reason="tokenizers is not installed")
    import transformers as tf
    from trl.trainer import base_trainer

    if hasattr(base_trainer._BaseTrainer, "_send_telemetry"):  # no network calls from the tests
        monkeypatch.setattr(base_trainer._BaseTrainer, "_send_telemetry", lambda self: None)
    datasets.disable_progress_bars()
    from lnsr.integrations import LNSRSFTTrainer

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = tf.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>")),
        pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    return types.SimpleNamespace(trl=trl, peft=peft, datasets=datasets, tf=tf, tok=tok, LNSRSFTTrainer=LNSRSFTTrainer)


def _rows(n, seed=0):
    """Pre-tokenised prompt/completion rows of ragged lengths: labels -100 on the 3-token prompt."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 9 - (i % 3)
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist() + [1]
        rows.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return rows


def _lora(sft):
    return sft.peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


def _args(sft, tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=4, gradient_accumulation_steps=1,
                max_steps=2, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
                max_grad_norm=1e9, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                seed=0, disable_tqdm=True, dataloader_num_workers=0, max_length=None)
    base.update(kw)
    return sft.trl.SFTConfig(**base)


class _Grads:
    """Callback: the trainable parameters' gradients right before each optimizer step."""

    def __init__(self, sft):
        parent = self

        class CB(sft.tf.TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
                parent.steps.append({n: p.grad.detach().clone() for n, p in model.named_parameters()
                                     if p.requires_grad and p.grad is not None})

        self.steps, self.callback = [], CB()


def _recording(cls):
    class Recording(cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            rec = None
            if model.training:
                rec = {k: v.detach().clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
                rec["_items"] = num_items_in_batch
                self.seen = getattr(self, "seen", []) + [rec]
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if rec is not None and getattr(self, "lnsr_reg", None) is not None:
                rec["_seed"], rec["_penalty"] = self.lnsr_reg.seed, float(self.lnsr_reg.penalty)
            return out
    return Recording


def _sft_nll(logits, labels, items):
    """SFTTrainer's nll loss by its definition: -sum log p(label) over the labels != -100 of the
    shifted sequence, over the label count of the accumulated batch."""
    labels = labels[:, 1:]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    mask = labels != -100
    picked = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return -(picked * mask).sum() / items


def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("accumulation", [1, 2])
def test_sft_updates_equal_the_two_pass_definition(sft, tmp_path, accumulation):
    """2 SGD steps on tiny Llama + LoRA (q_proj, v_proj), SFTTrainer's defaults elsewhere (activation
    checkpointing on, its fused LM head): per-step gradients and final adapter weights equal the
    definition's, with the penalty weighted under accumulation as the Trainer weights the SFT loss."""
    torch.manual_seed(0)
    model = sft.peft.get_peft_model(build("llama", layers=3), _lora(sft))
    ref = copy.deepcopy(model)  # before SFTTrainer patches the fused LM head onto the model
    grads = _Grads(sft)
    args = _args(sft, tmp_path, per_device_train_batch_size=4 // accumulation, gradient_accumulation_steps=accumulation)
    tr = _recording(sft.LNSRSFTTrainer)(model=model, args=args, train_dataset=sft.datasets.Dataset.from_list(_rows(8)),
                                         processing_class=sft.tok, lnsr=LNSR_KW, callbacks=[grads.callback])
    assert tr.args.gradient_checkpointing  # SFTConfig's default: LNSR's recomputation path is exercised
    tr.train()
    assert len(tr.seen) == 2 * accumulation and len(grads.steps) == 2
    assert tr.lnsr_reg is None  # detached at the end of training
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(h["lnsr_penalty"] > 0 and "mean_token_accuracy" in h for h in logs)
    for step, log in enumerate(logs):
        ps = [r["_penalty"] for r in tr.seen[step * accumulation:(step + 1) * accumulation]]
        assert log["lnsr_penalty"] == pytest.approx(sum(ps) / accumulation, rel=1e-6)

    ref.train()
    params = _trainable(ref)
    opt = torch.optim.SGD(params.values(), lr=args.learning_rate)
    for step in range(2):
        opt.zero_grad()
        plain = None  # the same step's gradient without the penalty: it must differ measurably
        for rec in tr.seen[step * accumulation:(step + 1) * accumulation]:
            batch = {k: rec[k] for k in ("input_ids", "attention_mask", "labels")}
            items = rec["_items"] if rec["_items"] is not None else (batch["labels"][:, 1:] != -100).sum()
            assert rec["_items"] is not None  # the Trainer counts the accumulated batch's labels
            clean, p_def = two_pass(ref, {k: batch[k] for k in ("input_ids", "attention_mask")}, seed=rec["_seed"],
                                    sigma=LNSR_KW["sigma"], inject_at=LNSR_KW["inject_at"])
            assert float(p_def.detach()) == pytest.approx(rec["_penalty"], rel=1e-4)
            task = _sft_nll(clean.logits, batch["labels"], items)
            g_task = torch.autograd.grad(task, list(params.values()), retain_graph=True, allow_unused=True)
            g_task = [torch.zeros_like(p) if g is None else g for g, p in zip(g_task, params.values())]
            plain = g_task if plain is None else [a + b for a, b in zip(plain, g_task)]
            (task + LNSR_KW["lam"] * p_def / accumulation).backward()
        got = grads.steps[step]
        for (name, p), g_plain in zip(params.items(), plain):
            want = p.grad if p.grad is not None else torch.zeros_like(p)
            trainer_grad = got.get(name, torch.zeros_like(p))
            torch.testing.assert_close(trainer_grad, want, rtol=1e-4, atol=1e-6, msg=lambda m: f"step {step} {name}: {m}")
        diff = max(float((p.grad - g).abs().max()) for p, g in zip(params.values(), plain) if p.grad is not None)
        scale = max(float(p.grad.abs().max()) for p in params.values() if p.grad is not None)
        assert diff > 1e-3 * scale  # the penalty moves this update (so the comparison above can fail)
        opt.step()
    trained = _trainable(tr.model)
    for name, p in params.items():
        torch.testing.assert_close(trained[name].detach(), p.detach(), rtol=1e-4, atol=1e-6)


def test_lam_zero_updates_equal_plain_sft_trainer(sft, tmp_path):
    """lam=0: the penalty is computed (non-zero, logged) but the adapter weights after 2 steps are
    plain SFTTrainer's; LoRA through peft_config=, accumulation 2, AdamW."""
    ds = sft.datasets.Dataset.from_list(_rows(8))
    kw = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, optim="adamw_torch", learning_rate=1e-2,
              max_grad_norm=1.0)
    finals = {}
    for name, extra in (("plain", None), ("lnsr", dict(LNSR_KW, lam=0.0))):
        torch.manual_seed(0)
        model = build("llama", layers=3)
        if extra is None:
            tr = sft.trl.SFTTrainer(model=model, args=_args(sft, tmp_path / name, **kw), train_dataset=ds,
                                    processing_class=sft.tok, peft_config=_lora(sft))
        else:
            tr = _recording(sft.LNSRSFTTrainer)(model=model, args=_args(sft, tmp_path / name, **kw), train_dataset=ds,
                                                 processing_class=sft.tok, peft_config=_lora(sft), lnsr=extra)
        tr.train()
        finals[name] = {n: p.detach().clone() for n, p in _trainable(tr.model).items()}
        finals[name + "_logs"] = [h for h in tr.state.log_history if "loss" in h]
        if extra is not None:
            assert all(r["_penalty"] > 0 for r in tr.seen) and len(tr.seen) == 4
    assert finals["plain"].keys() == finals["lnsr"].keys() and any("lora_B" in n for n in finals["plain"])
    for name, p in finals["plain"].items():
        torch.testing.assert_close(finals["lnsr"][name], p, rtol=1e-5, atol=1e-6)
    assert all(h["lnsr_penalty"] > 0 and h["lnsr_loss"] == 0.0 for h in finals["lnsr_logs"])
    for a, b in zip(finals["plain_logs"], finals["lnsr_logs"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["mean_token_accuracy"] == pytest.approx(a["mean_token_accuracy"])


def test_compute_loss_with_outputs_keeps_the_penalty(sft, tmp_path):
    """A training caller that asks for (loss, outputs): SFTTrainer builds the logits with a second,
    no-grad forward, which would zero reg.loss; the loss still holds lam * P of the first."""
    torch.manual_seed(0)
    model = build("llama", layers=3)
    tr = sft.LNSRSFTTrainer(model=model, args=_args(sft, tmp_path), train_dataset=sft.datasets.Dataset.from_list(_rows(4)),
                            processing_class=sft.tok, peft_config=_lora(sft), lnsr=LNSR_KW)
    batch = tr.data_collator([tr.train_dataset[i] for i in range(4)])
    tr._lnsr_attach()
    try:
        tr.model.train()
        vals = []
        for want in (False, True):
            torch.manual_seed(7)
            out = tr.compute_loss(tr.model, dict(batch), return_outputs=want)
            loss, outputs = out if want else (out, None)
            vals.append((float(loss), float(tr.lnsr_reg.loss)))
            if want:
                assert outputs.logits.shape[:2] == batch["input_ids"].shape
        assert vals[0][1] > 0 and vals[1][1] == pytest.approx(vals[0][1], rel=1e-6)
        assert vals[1][0] == pytest.approx(vals[0][0], rel=1e-6)
        with torch.no_grad():  # the plain SFT loss, without the penalty: lower by lam * P
            tr.model.eval()
            plain = float(tr.compute_loss(tr.model, dict(batch)))
        assert vals[0][0] == pytest.approx(plain + vals[0][1], rel=1e-5)
    finally:
        tr._lnsr_detach()


def test_without_lnsr_and_bad_options(sft, tmp_path):
    ds = sft.datasets.Dataset.from_list(_rows(4))
    tr = sft.LNSRSFTTrainer(model=build("llama", layers=2), args=_args(sft, tmp_path, max_steps=1), train_dataset=ds,
                            processing_class=sft.tok)
    assert isinstance(tr, sft.trl.SFTTrainer) and tr.lnsr_config is None
    tr.train()
    assert tr.lnsr_reg is None and not any("lnsr_penalty" in h for h in tr.state.log_history)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['lamda'\]"):
        sft.LNSRSFTTrainer(model=build("llama", layers=2), args=_args(sft, tmp_path), train_dataset=ds,
                           processing_class=sft.tok, lnsr={"lamda": 1.0})
    with pytest.raises(ValueError, match="adds lam \\* P to the loss itself"):
        sft.LNSRSFTTrainer(model=build("llama", layers=2), args=_args(sft, tmp_path), train_dataset=ds,
                           processing_class=sft.tok, lnsr=dict(lam=0.1, add_to_loss=True))
    cfg = lnsr.LNSRConfig(**LNSR_KW)
    tr = sft.LNSRSFTTrainer(model=build("llama", layers=2), args=_args(sft, tmp_path), train_dataset=ds,
                            processing_class=sft.tok, lnsr=cfg)
    assert tr.lnsr_config is cfg


def test_lnsr_imports_without_trl():
    """lnsr and lnsr.integrations import without TRL; LNSRSFTTrainer then says what to install."""
    code = ("import sys\n"
            "sys.modules['trl'] = None\n"  # import trl raises ImportError
            "import lnsr, lnsr.integrations\n"
            "assert 'trl' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
            "try:\n"
            "    lnsr.integrations.LNSRSFTTrainer\n"
            "except ImportError as e:\n"
            "    assert 'pip install' in str(e) and 'trl' in str(e), e\n"
            "else:\n"
            "    raise AssertionError('no ImportError')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


# -- examples/sft_lora.py: the SST-2 reader, the label-word scorer, and a whole run on a tiny model ----------
def _example():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "sft_lora.py")
    spec = importlib.util.spec_from_file_location("sft_lora_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


WORDS = ["good", "bad", "fun", "dull", "movie", "plot", "very", "a", "the", "not"]


def _glue_folder(root, n_train=8, n_dev=8):
    sst = root / "SST-2"
    sst.mkdir(parents=True)
    g = torch.Generator().manual_seed(3)
    for name, n in (("train", n_train), ("dev", n_dev)):
        lines = ["sentence\tlabel"]
        for i in range(n):
            words = [WORDS[j] for j in torch.randint(0, len(WORDS), (3 + i % 4,), generator=g).tolist()]
            lines.append(f"{' '.join(words)} \t{i % 2}")  # GLUE's trailing space before the tab
        (sst / f"{name}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_sft_lora_example_reader_errors(tmp_path):
    ex = _example()
    with pytest.raises(SystemExit, match="is not a folder"):
        ex.sst2_file(str(tmp_path / "missing"), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"has no SST-2/train.tsv .*the folder holds: nothing"):
        ex.sst2_file(str(tmp_path / "empty"), "train")
    root = _glue_folder(tmp_path / "glue")
    assert ex.sst2_file(str(root), "dev") == str(root / "SST-2" / "dev.tsv")
    assert ex.sst2_file(str(root / "SST-2"), "dev") == str(root / "SST-2" / "dev.tsv")  # SST-2 itself
    rows = ex.read_sst2(str(root / "SST-2" / "train.tsv"))
    assert len(rows) == 8 and rows[1][1] == 1 and not rows[0][0].endswith(" ")
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\nfine \"quoted\t1\nworse\t3\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"bad.tsv:3: label '3' is not 0 or 1"):
        ex.read_sst2(str(bad))
    bad.write_text("index\tsentence\nx\ty\n", encoding="utf-8")  # SST-2's test.tsv: no labels
    with pytest.raises(SystemExit, match="lacks 'sentence' and 'label'"):
        ex.read_sst2(str(bad))


def _word_tokenizer(sft):
    import tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for w in ["Review", ":", "Sentiment", "positive", "negative", *WORDS]:
        vocab[w] = len(vocab)
    t = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return sft.tf.PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def test_sft_lora_example_runs_on_a_tiny_model(sft, tmp_path):
    """The whole script on a saved tiny random Llama: the label-word scores equal a direct computation,
    and a run writes its record with metrics before and after, the LNSR log and the versions."""
    import json

    ex = _example()
    tok = _word_tokenizer(sft)
    model = build("llama", layers=2).eval()
    pairs, short = ex.make_pairs([("good fun movie", 1), ("dull plot", 0), ("not very good", 0)], tok, 64)
    assert short == 0 and pairs[0]["prompt"] == "Review: good fun movie\nSentiment:"
    got = ex.label_word_accuracy(model, tok, pairs, batch_size=2)
    margins = []
    with torch.no_grad():
        for p in pairs:
            ids = tok(p["prompt"])["input_ids"]
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], -1)
            margins.append(float(logp[tok.convert_tokens_to_ids("positive")] - logp[tok.convert_tokens_to_ids("negative")]))
    assert got["margin_mean"] == pytest.approx(sum(margins) / len(margins), rel=1e-5, abs=1e-6)
    want = sum((m > 0) == bool(p["label"]) for m, p in zip(margins, pairs)) / len(pairs)
    assert got["label_word_accuracy"] == pytest.approx(want)
    # reviews too long for --max-length lose words at the end, and the completion still fits
    long, short = ex.make_pairs([(" ".join(WORDS * 3), 1)], tok, 16)
    assert short == 1 and len(tok(long[0]["prompt"] + " positive")["input_ids"]) + 1 <= 16

    model_dir = tmp_path / "tiny"
    build("llama", layers=2).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = _glue_folder(tmp_path / "glue")
    record = ex.main(["--model", str(model_dir), "--data-dir", str(data), "--output-dir", str(tmp_path / "out"),
                      "--method", "lnsr", "--max-train-samples", "8", "--max-eval-samples", "4", "--batch-size", "4",
                      "--epochs", "1", "--lam", "0.5", "--logging-steps", "1", "--lr", "1e-3"])
    saved = json.loads((tmp_path / "out" / "sft_lora_lnsr_seed0.json").read_text())
    assert saved["config"]["n_train"] == 8 and saved["config"]["n_eval"] == 4
    assert saved["config"]["lnsr"] == {"lam": 0.5, "sigma": 0.05, "inject_at": 0, "normalize": "gain"}
    assert saved["config"]["optimizer_steps"] == 2 and len(saved["train_log"]) == 2
    assert all(h["lnsr_penalty"] > 0 for h in saved["train_log"]) and saved["metrics"]["lnsr_penalty_mean"] > 0
    for when in ("before", "after"):
        assert 0.0 <= saved["metrics"][when]["label_word_accuracy"] <= 1.0 and saved["metrics"][when]["heldout_loss"] > 0
    assert saved["versions"]["trl"] and saved["versions"]["torch"] and saved["time_s"]["wall"] > 0
    assert record["metrics"] == saved["metrics"]
