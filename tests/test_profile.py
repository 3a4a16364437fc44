"""`lnsr profile`: the noise-stability profile (per-block relative output change per injection point)."""
import csv

import numpy as np
import pytest

from glue_tiny import save_tiny_bert, write_glue
from lnsr.cli import main
from lnsr.profile import noise_profile
from tiny_models import batch, build


def _batches(n=2):
    out = []
    for s in range(n):
        b = batch("bert", b=3, t=9, seed=s)
        b.pop("labels")
        out.append(b)
    return out


def _hand_profile(model, batches, sigma, seed=0):
    """The profile by hand: block k's input replaced by ``h + sigma * rms(h) * z`` (z from the noise
    stream, the profile's seed per batch and injection point), per-token relative changes in fp64,
    averaged over the valid tokens of all batches."""
    import torch

    from lnsr import ops

    model.eval()
    blocks = list(model.bert.encoder.layer)
    n = len(blocks)
    sums, count = np.zeros((n, n + 1)), 0.0
    rec, swap = {}, {}

    def pre(j):
        def hook(module, args, kwargs):
            h = args[0] if args and torch.is_tensor(args[0]) else kwargs["hidden_states"]
            rec[("in", j)] = h
            if swap.get("k") != j:
                return None
            noisy = swap["noisy"](h)
            return ((noisy, *args[1:]), kwargs) if args and torch.is_tensor(args[0]) else \
                (args, {**kwargs, "hidden_states": noisy})
        return hook

    hooks = [b.register_forward_pre_hook(pre(j), with_kwargs=True) for j, b in enumerate(blocks)]
    hooks += [b.register_forward_hook(lambda mod, a, y, j=j: rec.__setitem__(j, y[0] if isinstance(y, tuple) else y))
              for j, b in enumerate(blocks)]

    def rel(a, b):
        return (a.double() - b.double()).norm(dim=-1) / b.double().norm(dim=-1)

    with torch.no_grad():
        for bi, b in enumerate(batches):
            m = b["attention_mask"].double()
            count += float(m.sum())
            swap.clear()
            model(**b)
            clean = dict(rec)
            for k in range(n):
                z_seed = seed * 1_000_003 + bi * 1009 + k
                h = clean[("in", k)]
                z = ops.noise(h.numel(), z_seed).view(h.shape)
                swap.update(k=k, noisy=lambda h, z=z: h + sigma * h.pow(2).mean(-1, keepdim=True).sqrt() * z)
                model(**b)
                sums[k, k] += float((rel(swap["noisy"](h), h) * m).sum())
                # relative noise: ||sigma rms(h) z|| / ||h|| = sigma ||z|| / sqrt(H), whatever h is
                width = h.shape[-1]
                torch.testing.assert_close(rel(swap["noisy"](h), h), sigma * z.double().norm(dim=-1) / width**0.5)
                for j in range(k, n):
                    sums[k, j + 1] += float((rel(rec[j], clean[j]) * m).sum())
    for hk in hooks:
        hk.remove()
    change = sums / count
    for k in range(n):
        change[k, :k] = np.nan
    return change, int(count)


def test_profile_values_equal_a_hand_computation():
    model = build("bert", layers=3, dropout=0.1)  # dropout is on in train mode: the profile must use eval mode
    model.train()
    prof = noise_profile(model, _batches(), sigma=0.05, backend="torch")
    assert model.training  # restored
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in model.bert.encoder.layer)
    assert prof["inject_at"] == [0, 1, 2] and prof["n_tokens"] == 2 * (3 * 9 - 3)  # the masked tokens do not count
    want, n_tokens = _hand_profile(model, _batches(), 0.05)
    assert n_tokens == prof["n_tokens"]
    np.testing.assert_allclose(prof["change"], want, rtol=1e-6, atol=0)  # NaN where they should be
    assert np.isnan(prof["change"][1, 0]) and np.all(prof["change"][:, -1] > 0)
    # sigma 0: no change anywhere (eval mode: no dropout either)
    zero = noise_profile(model, _batches(), sigma=0.0, backend="torch")["change"]
    assert np.all(np.nan_to_num(zero) == 0)
    # deterministic (fixed seeds), and one injection point is that row of the full profile
    again = noise_profile(model, _batches(), sigma=0.05, backend="torch")["change"]
    assert np.array_equal(np.nan_to_num(again), np.nan_to_num(prof["change"]))
    sub = noise_profile(model, _batches(), sigma=0.05, inject_at=[-1], backend="torch")
    assert sub["inject_at"] == [2] and np.array_equal(sub["change"][0, 2:], prof["change"][2, 2:])


def test_profile_cli_compares_finetuned_checkpoints(tmp_path, capsys):
    """finetune --save-model, then profile --compare on the two saved models: CSV + PNG."""
    model = save_tiny_bert(tmp_path / "m", layers=2, dropout=0.1)
    write_glue(tmp_path / "glue", "rte", n_train=16, n_dev=10)
    out = tmp_path / "ft"
    main(["finetune", "--task", "rte", "--data-dir", str(tmp_path / "glue"), "--model", model, "--output-dir", str(out),
          "--method", "vanilla", "lnsr", "--seeds", "1", "--epochs", "1", "--batch-size", "8", "--lr", "1e-3",
          "--save-model", "--no-progress", "--backend", "torch"])
    a, b = out / "rte" / "vanilla" / "seed1-model", out / "rte" / "lnsr" / "seed1-model"
    assert (a / "config.json").is_file() and (b / "tokenizer_config.json").is_file()
    capsys.readouterr()
    main(["profile", "--compare", str(a), str(b), "--task", "rte", "--data-dir", str(tmp_path / "glue" / "RTE"),
          "--max-samples", "6", "--batch-size", "4", "--output-dir", str(tmp_path / "prof")])
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "prof" / "profile.csv")))
    labels = sorted({r["model"] for r in rows})
    assert labels == ["lnsr/seed1-model", "vanilla/seed1-model"]  # same folder names: the parent disambiguates
    # per model: injection k=0 gives rows for layers -1, 0, 1; k=1 for layers 0, 1
    for lab in labels:
        mine = [(int(r["inject_at"]), int(r["layer"])) for r in rows if r["model"] == lab]
        assert mine == [(0, -1), (0, 0), (0, 1), (1, 0), (1, 1)]
    # the CSV holds each saved model's profile on the dev examples, batched as the CLI batches them
    tok_batches = _cli_batches(str(a), tmp_path / "glue" / "RTE", n=6, size=4)
    for lab, path in zip(labels, (b, a)):
        from transformers import AutoModel
        want = noise_profile(AutoModel.from_pretrained(path), tok_batches, sigma=0.05)
        got = {(int(r["inject_at"]), int(r["layer"])): float(r["rel_change"]) for r in rows if r["model"] == lab}
        for (k, layer), v in got.items():
            assert v == pytest.approx(want["change"][k, layer + 1], rel=1e-5)
        assert {int(r["n_tokens"]) for r in rows if r["model"] == lab} == {want["n_tokens"]}
    png = (tmp_path / "prof" / "profile.png").read_bytes()
    assert png[:4] == b"\x89PNG" and len(png) > 5000
    assert "vanilla/seed1-model" in printed and "noise at 0" in printed
    # a finetuned model differs from the base: the two profiles are not identical
    va = [float(r["rel_change"]) for r in rows if r["model"] == labels[0]]
    vb = [float(r["rel_change"]) for r in rows if r["model"] == labels[1]]
    assert va != vb


def _cli_batches(model_path, data_dir, n, size):
    from transformers import AutoTokenizer

    from lnsr.data import collate, encode, get_task, load_task

    spec = get_task("rte")
    _, dev, _ = load_task(spec, str(data_dir))
    tok = AutoTokenizer.from_pretrained(model_path)
    feats = encode(tok, dev[:n], 128)
    out = []
    for s in range(0, len(feats), size):
        b = collate(feats[s:s + size], tok.pad_token_id or 0, spec.is_regression, tok.padding_side)
        b.pop("labels")
        out.append(b)
    return out


def test_profile_cli_errors(tmp_path):
    with pytest.raises(SystemExit, match="--label gives 1 names for 2 models"):
        main(["profile", "--model", "x", "y", "--label", "one", "--task", "rte", "--data-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown task"):
        main(["profile", "--task", "nope", "--model", "x"])
