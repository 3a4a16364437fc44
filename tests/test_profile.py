"""`lnsr profile`: the noise-stability profile (per-block relative output change per injection point)."""
import csv
import math

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


def test_profile_values():
    model = build("bert", layers=3, dropout=0.1)  # dropout is on in train mode: the profile must use eval mode
    model.train()
    p0 = noise_profile(model, _batches(), sigma=0.0, backend="torch")
    p1 = noise_profile(model, _batches(), sigma=0.05, backend="torch")
    p2 = noise_profile(model, _batches(), sigma=0.2, backend="torch")
    assert model.training  # restored
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in model.bert.encoder.layer)
    c0, c1, c2 = p0["change"], p1["change"], p2["change"]
    assert c1.shape == (3, 4) and p1["inject_at"] == [0, 1, 2]
    assert p1["n_tokens"] == 2 * (3 * 9 - 3)  # the masked tokens do not count
    for i, k in enumerate(p1["inject_at"]):
        assert np.isnan(c1[i, :k]).all() and np.isfinite(c1[i, k:]).all()
        assert np.all(c0[i, k:] == 0)  # no noise, no change (eval mode: no dropout either)
        assert np.all(c1[i, k:] > 0) and np.all(c2[i, k:] > c1[i, k:])  # more noise, more change
        # the injected relative noise itself is about sigma (relative noise: sigma * rms(h) per token)
        assert c1[i, k] == pytest.approx(0.05, rel=0.3) and c2[i, k] == pytest.approx(0.2, rel=0.3)
    # deterministic: fixed seeds
    again = noise_profile(model, _batches(), sigma=0.05, backend="torch")["change"]
    assert np.array_equal(np.nan_to_num(again), np.nan_to_num(c1))
    sub = noise_profile(model, _batches(), sigma=0.05, inject_at=[-1], backend="torch")
    assert sub["inject_at"] == [2] and np.allclose(sub["change"][0, 2:], c1[2, 2:])


def test_profile_changes_stay_bounded_on_a_random_model():
    """Relative changes of a small random model stay O(sigma): a plausibility bound on the values."""
    model = build("bert", layers=2)
    prof = noise_profile(model, _batches(1), sigma=0.05, backend="torch")["change"]
    assert np.nanmax(prof) < 1.0


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
        vals = [float(r["rel_change"]) for r in rows if r["model"] == lab]
        assert all(0 < v < 1 and math.isfinite(v) for v in vals)
        assert int(rows[0]["n_tokens"]) > 0
    png = (tmp_path / "prof" / "profile.png").read_bytes()
    assert png[:4] == b"\x89PNG" and len(png) > 5000
    assert "vanilla/seed1-model" in printed and "noise at 0" in printed
    # a finetuned model differs from the base: the two profiles are not identical
    va = [float(r["rel_change"]) for r in rows if r["model"] == labels[0]]
    vb = [float(r["rel_change"]) for r in rows if r["model"] == labels[1]]
    assert va != vb


def test_profile_cli_errors(tmp_path):
    with pytest.raises(SystemExit, match="--label gives 1 names for 2 models"):
        main(["profile", "--model", "x", "y", "--label", "one", "--task", "rte", "--data-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown task"):
        main(["profile", "--task", "nope", "--model", "x"])
