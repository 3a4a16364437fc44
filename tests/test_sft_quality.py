"""bench/sft_quality (issue #35, item 4): the summary's choice rule, paired differences and docs section
on synthetic run records, and examples/sft_lora.py's --holdout split, --method control and --resume
(without a model)."""
from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name, rel):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, rel))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def summary():
    return _load("sft_quality_summary", "bench/sft_quality/summary.py")


@pytest.fixture(scope="module")
def example():
    return _load("sft_lora_example_q", "examples/sft_lora.py")


def record(method, seed, acc, loss, lam=None, before=None, n_eval=200, train_s=10.0, eval_set="dev.tsv"):
    lnsr = None if method == "vanilla" else {"lam": 0.0 if method == "control" else lam, "sigma": 0.05,
                                             "inject_at": 0, "normalize": "gain"}
    return {"config": {"method": method, "seed": seed, "lam": lam if lam is not None else 0.003, "lnsr": lnsr,
                       "n_eval": n_eval, "n_train": 256, "optimizer_steps": 32, "batch_size": 8, "lr": 2e-4,
                       "lora_r": 8, "normalize": "gain", "sigma": 0.05, "inject_at": 0, "eval_set": eval_set},
            "metrics": {"before": before, "after": {"label_word_accuracy": acc, "heldout_loss": loss},
                        "lnsr_penalty_mean": None if method == "vanilla" else 5.0},
            "time_s": {"train": train_s, "wall": train_s + 60},
            "machine": {"device_name": "test CPU"}, "versions": {"torch": "x"},
            "date": f"2026-12-08 0{seed}:00:00 UTC"}


def write(folder, name, rec):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"sft_lora_{name}.json"), "w", encoding="utf-8") as f:
        json.dump(rec, f)


# -- the choice rule ---------------------------------------------------------------------------------
def _rows(summary, tmp_path, runs):
    for name, rec in runs.items():
        write(str(tmp_path / "tune"), name, rec)
    return summary.tune_rows(summary.load(str(tmp_path / "tune")))


def test_choose_highest_accuracy_among_lnsr_arms_only(summary, tmp_path):
    rows = _rows(summary, tmp_path, {
        "vanilla_seed1": record("vanilla", 1, 0.95, 0.1),   # better than every LNSR arm: not a candidate
        "control_seed1": record("control", 1, 0.94, 0.1),
        "lnsr_lam0.03_seed1": record("lnsr", 1, 0.80, 0.3, lam=0.03),
        "lnsr_lam0.1_seed1": record("lnsr", 1, 0.85, 0.9, lam=0.1),
        "lnsr_lam0.3_seed1": record("lnsr", 1, 0.82, 0.2, lam=0.3)})
    assert [r["label"] for r in rows] == ["vanilla", "control (lam 0)", "LNSR lam 0.03", "LNSR lam 0.1", "LNSR lam 0.3"]
    assert summary.choose(rows)["lam"] == 0.1


def test_choose_ties_lower_loss_then_smaller_lam(summary, tmp_path):
    rows = _rows(summary, tmp_path, {
        "lnsr_lam0.03_seed1": record("lnsr", 1, 0.85, 0.50, lam=0.03),
        "lnsr_lam0.1_seed1": record("lnsr", 1, 0.85, 0.40, lam=0.1),
        "lnsr_lam0.3_seed1": record("lnsr", 1, 0.85, 0.40, lam=0.3)})
    assert summary.choose(rows)["lam"] == 0.1      # same accuracy: lower loss; same loss too: smaller lam
    rows[1]["loss"] = 0.45
    assert summary.choose(rows)["lam"] == 0.3
    rows[2]["loss"] = 0.45
    assert summary.choose(rows)["lam"] == 0.1


def test_choose_means_over_tune_seeds_and_float_noise_is_a_tie(summary, tmp_path):
    # lam 0.03: (0.7 + 0.9) / 2; lam 0.1: (0.6 + 1.0) / 2: the same accuracy up to float noise
    rows = _rows(summary, tmp_path, {
        "lnsr_lam0.03_seed1": record("lnsr", 1, 0.7, 0.5, lam=0.03),
        "lnsr_lam0.03_seed2": record("lnsr", 2, 0.9, 0.5, lam=0.03),
        "lnsr_lam0.1_seed1": record("lnsr", 1, 0.6, 0.3, lam=0.1),
        "lnsr_lam0.1_seed2": record("lnsr", 2, 1.0 - 1e-13, 0.3, lam=0.1)})
    assert rows[0]["seeds"] == [1, 2] and rows[0]["acc"] == pytest.approx(0.8)
    assert summary.choose(rows)["lam"] == 0.1      # tied accuracy, lower loss


def test_choose_without_lnsr_runs_says_so(summary, tmp_path):
    rows = _rows(summary, tmp_path, {"vanilla_seed1": record("vanilla", 1, 0.9, 0.1)})
    with pytest.raises(SystemExit, match="no LNSR run"):
        summary.choose(rows)


# -- paired differences --------------------------------------------------------------------------------
FINAL = {  # seed: (vanilla, control, lnsr) accuracies
    1: (0.8500, 0.8525, 0.8600),
    2: (0.8400, 0.8400, 0.8450),
    3: (0.8700, 0.8650, 0.8650)}


def _finals(tmp_path, lam=0.1):
    for seed, (v, c, l_) in FINAL.items():
        write(str(tmp_path / "final"), f"vanilla_seed{seed}", record("vanilla", seed, v, 1.0 + seed / 10, n_eval=400,
                                                                     before={"label_word_accuracy": 0.8,
                                                                             "heldout_loss": 5.0} if seed == 1 else None))
        write(str(tmp_path / "final"), f"control_seed{seed}", record("control", seed, c, 1.0 + seed / 10, n_eval=400))
        write(str(tmp_path / "final"), f"lnsr_lam{lam:g}_seed{seed}",
              record("lnsr", seed, l_, 0.9 + seed / 10, lam=lam, n_eval=400))


def test_paired_differences_by_hand(summary, tmp_path):
    _finals(tmp_path)
    table, lam = summary.final_table(summary.load(str(tmp_path / "final")))
    assert lam == 0.1 and set(table) == {"vanilla", "control", "lnsr"}
    got = {(p["a"], p["b"]): p for p in summary.paired(table)}
    assert list(got) == [("lnsr", "control"), ("lnsr", "vanilla"), ("control", "vanilla")]
    t975_df2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom
    for (a, b), (ia, ib) in {("lnsr", "control"): (2, 1), ("lnsr", "vanilla"): (2, 0),
                             ("control", "vanilla"): (1, 0)}.items():
        d = [100 * (FINAL[s][ia] - FINAL[s][ib]) for s in (1, 2, 3)]
        mean = sum(d) / 3
        sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
        half = t975_df2 * sd / math.sqrt(3)
        c = got[(a, b)]["acc"]
        assert c["n"] == 3 and c["mean"] == pytest.approx(mean, abs=1e-9)
        assert c["ci95"] == pytest.approx([mean - half, mean + half], abs=1e-6)
    # lnsr - control: +0.75, +0.50, +0.00 points -> mean 0.4167, sd 0.3819, interval [-0.53, +1.37]
    assert got[("lnsr", "control")]["acc"]["ci95"] == pytest.approx([-0.5320, 1.3654], abs=1e-3)
    assert got[("lnsr", "vanilla")]["loss"]["mean"] == pytest.approx(-0.1)


def test_final_with_two_lams_is_refused(summary, tmp_path):
    _finals(tmp_path)
    write(str(tmp_path / "final"), "lnsr_lam0.3_seed1", record("lnsr", 1, 0.5, 1.0, lam=0.3))
    with pytest.raises(SystemExit, match="several lam"):
        summary.final_table(summary.load(str(tmp_path / "final")))


# -- the docs section ----------------------------------------------------------------------------------
def test_section_write_check_roundtrip(summary, tmp_path):
    for name, rec in {"vanilla_seed1": record("vanilla", 1, 0.80, 0.5, before={"label_word_accuracy": 0.75,
                                                                              "heldout_loss": 6.0}),
                      "control_seed1": record("control", 1, 0.81, 0.5),
                      "lnsr_lam0.03_seed1": record("lnsr", 1, 0.82, 0.5, lam=0.03),
                      "lnsr_lam0.1_seed1": record("lnsr", 1, 0.83, 0.5, lam=0.1)}.items():
        write(str(tmp_path / "tune"), name, rec)
    _finals(tmp_path)
    text = summary.section(str(tmp_path))
    assert text.startswith(summary.BEGIN) and text.rstrip().endswith(summary.END)
    assert "Exploratory: LoRA SFT of SmolLM2-135M (issue #35)" in text
    assert "| LNSR lam 0.1 (chosen) | 1 | 83.00 | 0.5000 |" in text
    assert "| before training | - | 75.00 | 6.0000 |" in text
    assert "| 1 | 85.00 / 1.1000 | 85.25 / 1.1000 | 86.00 / 1.0000 |" in text
    assert "| LNSR - control | 3 | +0.42 | [-0.53, +1.37] |" in text
    assert "| before training (every arm) | 80.00 / 5.0000 | | |" in text
    assert "no measurable effect" in text and "wide" in text
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nearlier text\n", encoding="utf-8")
    args = ["--runs", str(tmp_path), "--doc", str(doc)]
    assert summary.main(args + ["--check"]) == 1                   # missing
    assert summary.main(args + ["--write"]) == 0
    assert doc.read_text().startswith("# Results\n\nearlier text\n\n" + summary.BEGIN)
    assert summary.main(args + ["--check"]) == 0
    doc.write_text(doc.read_text() + "\nlater text\n")
    assert summary.main(args + ["--write"]) == 0 and summary.main(args + ["--check"]) == 0
    assert doc.read_text() == "# Results\n\nearlier text\n\n" + text + "\nlater text\n"   # in place, once
    write(str(tmp_path / "final"), "lnsr_lam0.1_seed3", record("lnsr", 3, 0.90, 1.2, lam=0.1, n_eval=400))
    assert summary.main(args + ["--check"]) == 1                   # a record changed: out of date


def test_docs_results_section_is_the_records(summary):
    """docs/results.md's sft_quality section is what summary.py makes of docs/runs/sft_quality."""
    with open(os.path.join(ROOT, summary.DOC), encoding="utf-8") as f:
        have = summary.current_section(f.read())
    if have is None:
        pytest.skip("docs/results.md has no sft_quality section yet")
    assert have == summary.section()


# -- examples/sft_lora.py: --holdout, --method control, --resume (no model) -------------------------------
def _glue(root, n_train=50, n_dev=10):
    sst = root / "SST-2"
    sst.mkdir(parents=True)
    for name, n in (("train", n_train), ("dev", n_dev)):
        lines = ["sentence\tlabel"] + [f"{name} sentence number {i}\t{i % 2}" for i in range(n)]
        (sst / f"{name}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(root)


def test_holdout_split_is_disjoint_and_seed_independent(example, tmp_path):
    data = _glue(tmp_path / "glue")
    got = {}
    for seed in (1, 2, 3):
        args = example.parse_args(["--data-dir", data, "--output-dir", "x", "--holdout", "0.2", "--seed", str(seed),
                                   "--max-train-samples", "20", "--max-eval-samples", "6"])
        got[seed] = example.select_rows(args)
    held = {s: {r[0] for r in g[1]} for s, g in got.items()}
    train = {s: {r[0] for r in g[0]} for s, g in got.items()}
    assert all(g[2] == "holdout 0.2 of train.tsv" for g in got.values())
    assert held[1] == held[2] == held[3] and len(held[1]) == 6           # the same held-out rows for every seed
    assert all(h.startswith("train ") for h in held[1])                    # from train.tsv, not dev
    assert len(train[1]) == 20 and train[1] != train[2]                    # the training subset follows the seed
    whole = set(r[0] for r in example.split_holdout(example.read_sst2(os.path.join(data, "SST-2", "train.tsv")), 0.2)[1])
    assert len(whole) == 10
    for s in (1, 2, 3):
        assert not train[s] & whole                                        # never trained on the held-out 20%
    # without --holdout: dev, a fixed subset for every seed
    dev = [example.select_rows(example.parse_args(["--data-dir", data, "--output-dir", "x", "--seed", str(s),
                                                   "--max-eval-samples", "4"])) for s in (1, 2)]
    assert dev[0][2] == "dev.tsv" and dev[0][1] == dev[1][1] and dev[0][1][0][0].startswith("dev ")


def test_control_is_lam_zero(example):
    args = example.parse_args(["--data-dir", "d", "--output-dir", "o", "--method", "control"])
    assert args.lam == 0.0
    assert example.parse_args(["--data-dir", "d", "--output-dir", "o"]).lam == 0.003
    with pytest.raises(SystemExit):
        example.parse_args(["--data-dir", "d", "--output-dir", "o", "--method", "control", "--lam", "0.1"])
    with pytest.raises(SystemExit):
        example.parse_args(["--data-dir", "d", "--output-dir", "o", "--holdout", "1.5"])


def test_resume_skips_only_the_same_configuration(example, tmp_path):
    argv = ["--data-dir", "d", "--output-dir", str(tmp_path), "--method", "lnsr", "--lam", "0.1", "--run-name",
            "lnsr_lam0.1_seed1", "--seed", "1"]
    args = example.parse_args(argv + ["--resume"])
    path = example.record_path(args)
    assert path == os.path.join(str(tmp_path), "sft_lora_lnsr_lam0.1_seed1.json")
    assert example.finished_record(args) is None                              # nothing there yet
    saved = {"config": {**vars(example.parse_args(argv + ["--threads", "4"])), "n_train": 8}, "metrics": {"x": 1}}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(saved, f)
    assert example.finished_record(args)["metrics"] == {"x": 1}               # threads and resume not compared
    assert example.finished_record(example.parse_args(argv)) is None          # no --resume: run again
    other = example.parse_args(argv[:-6] + ["--lam", "0.3", "--run-name", "lnsr_lam0.1_seed1", "--seed", "1", "--resume"])
    with pytest.raises(SystemExit, match="lam differ"):
        example.finished_record(other)
