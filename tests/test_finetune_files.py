"""`lnsr finetune` on a user's own files, extra evaluation sets, `lnsr tune`, kill-and-resume."""
import csv
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from glue_tiny import save_tiny_bert, sentence, write_glue
from lnsr.cli import main
from lnsr.data import load_file_task
from lnsr.data.metrics import accuracy, f1, f1_macro, matthews


# -- files made in the test ------------------------------------------------------------------------------
def write_table(path, columns, rows):
    """rows: lists of values in ``columns`` order; the format follows the extension."""
    path = str(path)
    ext = os.path.splitext(path)[1]
    if ext in (".csv", ".tsv"):
        with open(path, "w", newline="") as f:
            if ext == ".csv":
                w = csv.writer(f)
                w.writerow(columns)
                w.writerows(rows)
            else:  # GLUE-style TSV: no quoting
                f.write("\t".join(columns) + "\n")
                f.writelines("\t".join(str(v) for v in r) + "\n" for r in rows)
    elif ext == ".jsonl":
        with open(path, "w") as f:
            f.writelines(json.dumps(dict(zip(columns, r))) + "\n" for r in rows)
    else:
        with open(path, "w") as f:
            json.dump([dict(zip(columns, r)) for r in rows], f)
    return path


def pairs(n, seed=0, labels=("no", "yes")):
    rng = random.Random(seed)
    return [[i, sentence(rng), sentence(rng), labels[rng.randrange(len(labels))]] for i in range(n)]


@pytest.mark.parametrize("ext", [".csv", ".tsv", ".json", ".jsonl"])
def test_formats_columns_and_labels(tmp_path, ext):
    # two text columns named sentence1/sentence2 beside an int id column; string labels
    rows = pairs(10)
    path = write_table(tmp_path / f"train{ext}", ["idx", "sentence1", "sentence2", "label"], rows)
    t = load_file_task(train_file=path)
    assert t.text_columns == ["sentence1", "sentence2"] and t.spec.labels == ("no", "yes")
    assert t.spec.metrics == ("accuracy", "f1_macro", "f1") and not t.spec.is_regression
    assert t.train == [(r[1], r[2], ("no", "yes").index(r[3])) for r in rows]
    assert t.spec.name == os.path.basename(tmp_path)  # train.<ext>: the folder names the task

    # one text column (the first non-label string column), int labels mapped in numeric order
    rng = random.Random(1)
    rows = [[sentence(rng), [10, 2, 7][i % 3], i] for i in range(9)]
    path = write_table(tmp_path / f"reviews{ext}", ["review", "stars", "n"], rows)
    t = load_file_task(train_file=path, label_column="stars")
    assert t.text_columns == ["review"] and t.spec.labels == ("2", "7", "10") and t.spec.name == "reviews"
    assert t.train == [(r[0], None, {2: 0, 7: 1, 10: 2}[r[1]]) for r in rows]
    assert t.spec.metrics == ("accuracy", "f1_macro") and t.id2label == {0: "2", 1: "7", 2: "10"}

    # float labels: regression (inferred), and explicit --text-columns in another order
    rows = [[sentence(rng), sentence(rng), round(rng.uniform(0, 5), 3)] for _ in range(8)]
    path = write_table(tmp_path / f"sts{ext}", ["a", "b", "score"], rows)
    t = load_file_task(train_file=path, label_column="score", text_columns=["b", "a"])
    assert t.spec.is_regression and t.spec.metrics == ("pearson", "spearman")
    assert t.train == [(r[1], r[0], pytest.approx(r[2])) for r in rows]
    # integer-valued targets as regression on request
    t = load_file_task(train_file=write_table(tmp_path / f"int{ext}", ["text", "label"],
                                              [[sentence(rng), i % 4] for i in range(8)]), problem="regression")
    assert t.spec.is_regression and [e[2] for e in t.train] == [float(i % 4) for i in range(8)]


def _err(tmp_path, capsys=None, **kw):
    with pytest.raises(SystemExit) as e:
        load_file_task(**kw)
    return str(e.value)


def test_bad_files_are_clear_errors(tmp_path):
    cols = ["idx", "sentence1", "sentence2", "label"]
    good = write_table(tmp_path / "good.csv", cols, pairs(6))
    # missing column: the message names the columns found
    msg = _err(tmp_path, train_file=good, label_column="quality")
    assert "no label column 'quality'" in msg and "['idx', 'sentence1', 'sentence2', 'label']" in msg
    msg = _err(tmp_path, train_file=good, text_columns=["sentence1", "premise"])
    assert "missing column(s) ['premise']" in msg and "columns found" in msg
    # empty file, header only
    (tmp_path / "empty.csv").write_text("")
    assert "is empty" in _err(tmp_path, train_file=str(tmp_path / "empty.csv"))
    (tmp_path / "head.csv").write_text("sentence1,label\n")
    assert "holds no rows" in _err(tmp_path, train_file=str(tmp_path / "head.csv"))
    # one label only
    one = write_table(tmp_path / "one.csv", cols, [[i, "a b", "c d", "yes"] for i in range(5)])
    assert "only one label value ('yes')" in _err(tmp_path, train_file=one)
    # NaN / missing labels: file and line
    (tmp_path / "nan.csv").write_text("text,label\nthe cat,1\nthe dog,\nred log,0\n")
    assert "nan.csv:3: label ('label') is missing or NaN" in _err(tmp_path, train_file=str(tmp_path / "nan.csv"))
    (tmp_path / "nan.jsonl").write_text('{"text": "a", "label": 0.5}\n{"text": "b", "label": NaN}\n')
    assert "nan.jsonl:2: label" in _err(tmp_path, train_file=str(tmp_path / "nan.jsonl"))
    # unreadable rows: file and line number
    (tmp_path / "ragged.csv").write_text("text,label\nthe cat,1\nthe,dog,0,x\nred log,0\n")
    assert "ragged.csv:3: 4 fields where the header has 2" in _err(tmp_path, train_file=str(tmp_path / "ragged.csv"))
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 0\n')
    assert "bad.jsonl:2: not a JSON object" in _err(tmp_path, train_file=str(tmp_path / "bad.jsonl"))
    # a validation label the training file does not have
    val = write_table(tmp_path / "val.csv", cols, [[0, "a", "b", "maybe"]])
    assert "val.csv:2: label 'maybe' does not occur in the training file" in _err(
        tmp_path, train_file=good, validation_file=val)
    (tmp_path / "x.txt").write_text("text,label\n")
    assert "unknown file type '.txt'" in _err(tmp_path, train_file=str(tmp_path / "x.txt"))
    assert "regression" in _err(tmp_path, train_file=good, metrics=["pearson"])


def test_cli_errors_come_before_training(tmp_path):
    cols = ["idx", "sentence1", "sentence2", "label"]
    train = write_table(tmp_path / "train.csv", cols, pairs(8))
    (tmp_path / "val.csv").write_text("idx,sentence1,sentence2,label\n0,a,b,yes\n1,c,\n")
    out = tmp_path / "out"
    base = ["finetune", "--train-file", train, "--model", str(tmp_path / "no-model"), "--output-dir", str(out)]
    # the model folder does not exist either: the data error must come first, and nothing is written
    with pytest.raises(SystemExit, match=r"val.csv:3: text column 'sentence2' is empty"):
        main(base + ["--validation-file", str(tmp_path / "val.csv")])
    with pytest.raises(SystemExit, match=r"needs --validation-file"):
        main(base)
    with pytest.raises(SystemExit, match=r"either --task .* or --train-file"):
        main(base + ["--task", "mrpc"])
    with pytest.raises(SystemExit, match=r"--eval-file 'shifted': expected NAME=PATH"):
        main(base + ["--holdout", "0.5", "--eval-file", "shifted"])
    with pytest.raises(SystemExit, match=r"--text-columns is for --train-file data"):
        main(["finetune", "--task", "mrpc", "--text-columns", "a", "--output-dir", str(out)])
    assert not out.exists()


def test_metrics_against_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for k in (2, 3, 5):
        y, p = rng.integers(0, k, 40), rng.integers(0, k, 40)
        assert matthews(p, y) == pytest.approx(sk.matthews_corrcoef(y, p), abs=1e-12)
        assert f1_macro(p, y) == pytest.approx(sk.f1_score(y, p, average="macro"), abs=1e-12)
    # hand values: per-class F1 1, 1/2, 1/2
    assert f1_macro([0, 1, 2, 2, 1, 0], [0, 1, 1, 2, 2, 0]) == pytest.approx(2 / 3)
    assert matthews([1, 1, 1, 1], [1, 1, 0, 0]) == 0.0  # undefined: sklearn's 0


# -- end to end on files ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("model") / "m")


def _own_data(tmp_path):
    cols = ["id", "premise", "hypothesis", "label"]
    train = write_table(tmp_path / "train.jsonl", cols, pairs(24, seed=1, labels=("neg", "pos")))
    val = write_table(tmp_path / "val.csv", cols, pairs(10, seed=2, labels=("neg", "pos")))
    shifted = write_table(tmp_path / "shifted.tsv", cols, pairs(7, seed=3, labels=("neg", "pos")))
    return train, val, shifted


def test_eval_file_metrics_equal_a_hand_computation(tmp_path, tiny_model):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    train, val, shifted = _own_data(tmp_path)
    test = write_table(tmp_path / "test.csv", ["id", "premise", "hypothesis"], [r[:3] for r in pairs(5, seed=4)])
    out = tmp_path / "out"
    main(["finetune", "--train-file", train, "--validation-file", val, "--eval-file", f"shifted={shifted}",
          "--test-file", test, "--text-columns", "premise,hypothesis", "--method", "lnsr", "--seeds", "1",
          "--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--lam", "0.5", "--backend", "torch",
          "--model", tiny_model, "--output-dir", str(out), "--no-progress", "--save-model", "--task-name", "nli"])
    rec = json.loads((out / "nli" / "lnsr" / "seed1.json").read_text())
    assert rec["id2label"] == {"0": "neg", "1": "pos"} and set(rec["eval_sets"]) == {"shifted"}
    assert rec["config"]["eval_sets"] == ["shifted"] and "eval_sets" in rec["epochs"][-1]
    assert "eval_sets" not in rec["epochs"][0]  # only the last epoch without --eval-sets-each-epoch
    assert rec["versions"]["torch"] == torch.__version__ and rec["command"]

    # hand computation from the saved model
    model = AutoModelForSequenceClassification.from_pretrained(rec["saved_model"]).eval()
    assert model.config.id2label == {0: "neg", 1: "pos"}
    tok = AutoTokenizer.from_pretrained(rec["saved_model"])
    for name, path in (("shifted", shifted), ("validation", val)):
        t = load_file_task(train_file=train, validation_file=path, text_columns=["premise", "hypothesis"])
        preds, labels = [], []
        for a, b, y in t.validation:
            with torch.no_grad():
                logits = model(**tok(a, b, return_tensors="pt")).logits
            preds.append(int(logits.argmax(-1)))
            labels.append(y)
        want = {"accuracy": accuracy(preds, labels), "f1_macro": f1_macro(preds, labels), "f1": f1(preds, labels)}
        got = rec["eval_sets"]["shifted"] if name == "shifted" else rec["final"]
        assert got == pytest.approx(want, abs=1e-12)
    # predictions for the unlabelled test file, as label names
    lines = open(rec["test_predictions"]).read().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 6 and {ln.split("\t")[1] for ln in lines[1:]} <= {"neg", "pos"}
    # the summary table has the extra set's rows
    md = (out / "nli" / "summary.md").read_text()
    assert "| lnsr | shifted:accuracy | 1 |" in md and "| lnsr | f1_macro | 1 |" in md


def test_tune_never_reads_validation_and_best_json_is_reused(tmp_path, tiny_model, monkeypatch, capsys):
    import lnsr.data.files as files

    train, val, shifted = _own_data(tmp_path)
    opened = []
    real = files.read_table

    def spy(path, *args, **kwargs):  # read_table(path, encoding)
        opened.append(os.path.realpath(path))
        if os.path.realpath(path) != os.path.realpath(train):
            raise AssertionError(f"lnsr tune read {path}")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(files, "read_table", spy)
    out = tmp_path / "tune"
    args = ["tune", "--train-file", train, "--validation-file", val, "--eval-file", f"s={shifted}",
            "--grid", "lam=0.01,0.3", "--seeds", "1", "2", "--epochs", "1", "--batch-size", "8", "--lr", "1e-3",
            "--backend", "torch", "--model", tiny_model, "--output-dir", str(out), "--no-progress",
            "--task-name", "nli", "--rank-by", "accuracy"]
    main(args)
    cap = capsys.readouterr()
    assert opened == [os.path.realpath(train)]
    best = json.loads((out / "nli" / "best.json").read_text())
    # the ranking equals the mean held-out accuracy of the run files; the control ran beside
    means = {}
    for label in ("vanilla", "lnsr_lam0", "lnsr_lam0.01", "lnsr_lam0.3"):
        accs = [json.loads((out / "nli" / label / f"seed{s}.json").read_text())["final"]["accuracy"] for s in (1, 2)]
        assert all(json.loads((out / "nli" / label / f"seed{s}.json").read_text())["config"]["eval_split"]
                   == "holdout0.2 of train" for s in (1, 2))
        means[label] = np.mean(accs)
    ranked = [r["label"] for r in best["ranking"]]
    assert sorted(means, key=lambda k: (-means[k], ranked.index(k))) == ranked
    assert [r["mean"] for r in best["ranking"]] == pytest.approx(sorted(means.values(), reverse=True))
    lnsr_best = max(("lnsr_lam0.01", "lnsr_lam0.3"), key=lambda k: (means[k], -ranked.index(k)))
    row = next(r for r in best["ranking"] if r["label"] == lnsr_best)
    assert row["control"] == "lnsr_lam0" and row["vs_control"][0] == pytest.approx(means[lnsr_best] - means["lnsr_lam0"])
    assert best["complete"] and best["metric"] == "accuracy"
    assert "lnsr tune: accuracy on holdout0.2 of train" in cap.out
    if len(set(means.values())) == 1:  # tiny data: every arm at the same accuracy, so no arm is chosen
        assert best["tie"] and best["best"] is None and best["recommendation"] is None
        assert "no ranking: the arms tie" in cap.out and "best LNSR arm" not in cap.out
        # the reuse below takes the options of a best.json: one as a separating run would write it
        best["best"] = {k: row[k] for k in ("method", "label", "options", "mean", "std", "per_seed")}
        (out / "nli" / "best.json").write_text(json.dumps(best))
    else:
        assert not best["tie"] and best["best"]["label"] == lnsr_best and "best LNSR arm" in cap.out
        rec = best["recommendation"]
        assert rec["decision"] in ("use", "leave off", "undecided") and rec["text"] in cap.out
        assert rec["vs_control"]["mean"] == pytest.approx(means[lnsr_best] - means["lnsr_lam0"])
        assert rec["text"] in (out / "nli" / "tune.md").read_text()

    # lnsr:@best.json in finetune takes exactly the chosen options
    monkeypatch.setattr(files, "read_table", real)
    main(["finetune", "--train-file", train, "--validation-file", val, "--method", f"lnsr:@{out / 'nli' / 'best.json'}",
          "--seeds", "1", "--epochs", "1", "--batch-size", "8", "--lr", "1e-3", "--model", tiny_model,
          "--output-dir", str(tmp_path / "ft"), "--no-progress", "--task-name", "nli"])
    rec = json.loads((tmp_path / "ft" / "nli" / lnsr_best / "seed1.json").read_text())
    assert rec["config"]["method_options"] == best["best"]["options"]
    (tmp_path / "other.json").write_text(json.dumps({"lam": 0.01}))
    with pytest.raises(SystemExit, match=r"no 'best' entry"):
        main(["finetune", "--train-file", train, "--validation-file", val, "--method",
              f"lnsr:@{tmp_path / 'other.json'}"])
    with pytest.raises(SystemExit, match=r"is not JSON"):
        main(["finetune", "--train-file", train, "--validation-file", val, "--method", f"lnsr:@{train}"])


def _rows(**arms):
    """Ranking rows as `lnsr tune` writes them: per-seed scores, each LNSR arm with its control."""
    return [{"label": k, "per_seed": {str(i + 1): x for i, x in enumerate(v)},
             **({"control": "lnsr_lam0"} if k.startswith("lnsr_lam0.") else {})} for k, v in arms.items()]


@pytest.mark.parametrize("best,decision", [
    ([0.80, 0.81, 0.82], "use"),           # ahead of control and vanilla by ~0.1 on every seed, tiny spread
    ([0.69, 0.70, 0.71], "leave off"),     # level with its control on average
    ([0.68, 0.70, 0.71], "leave off"),     # behind its control on average
    ([0.75, 0.69, 0.72], "undecided"),     # ahead on average (+0.02) but within the spread
])
def test_tune_recommendation_reads_the_intervals(best, decision):
    from lnsr.finetune.stats import compare
    from lnsr.finetune.tune import recommend

    rows = _rows(**{"lnsr_lam0.01": best, "lnsr_lam0": [0.69, 0.70, 0.71], "vanilla": [0.70, 0.70, 0.70]})
    rec = recommend(rows, rows[0])
    assert rec["decision"] == decision and rec["text"].startswith(f"recommendation: {decision} — ")
    want = compare(rows[0]["per_seed"], rows[1]["per_seed"])
    assert rec["vs_control"]["ci95"] == pytest.approx(want["ci95"]) and rec["vs_control"]["n"] == 3
    assert f"{100 * want['mean']:+.2f} [{100 * want['ci95'][0]:+.2f}, {100 * want['ci95'][1]:+.2f}]" in rec["text"]


def test_tune_recommendation_without_an_interval_or_a_control_is_undecided():
    from lnsr.finetune.tune import recommend

    one = _rows(**{"lnsr_lam0.01": [0.9], "lnsr_lam0": [0.7], "vanilla": [0.7]})  # one seed: no interval
    rec = recommend(one, one[0])
    assert rec["decision"] == "undecided" and "(one seed: no interval)" in rec["text"]
    assert rec["vs_control"]["ci95"] == [None, None]  # JSON-safe, not NaN
    json.dumps(rec, allow_nan=False)
    lone = _rows(**{"lnsr_lam0.01": [0.9, 0.91], "vanilla": [0.7, 0.7]})  # its control never finished
    rec = recommend(lone, lone[0])
    assert rec["decision"] == "undecided" and "no finished run" in rec["text"] and rec["vs_control"] is None
    ahead_of_control_only = _rows(**{"lnsr_lam0.01": [0.80, 0.81, 0.82], "lnsr_lam0": [0.70, 0.71, 0.72],
                                     "vanilla": [0.80, 0.70, 0.90]})  # vanilla's spread covers the gain
    rec = recommend(ahead_of_control_only, ahead_of_control_only[0])
    assert rec["decision"] == "undecided" and "not clearly ahead of vanilla" in rec["text"]
    assert recommend([], None) is None


def test_tune_on_glue_leaves_dev_unread(tmp_path, tiny_model):
    d = write_glue(tmp_path / "glue", "mrpc", n_train=30, n_dev=6)
    with open(os.path.join(d, "dev.tsv"), "w") as f:
        f.write("this is not a GLUE file\n")  # reading it would fail
    main(["tune", "--task", "mrpc", "--data-dir", str(tmp_path / "glue"), "--grid", "lam=0.1", "--seeds", "1",
          "--epochs", "1", "--batch-size", "8", "--model", tiny_model, "--output-dir", str(tmp_path / "t"),
          "--no-progress"])
    best = json.loads((tmp_path / "t" / "mrpc" / "best.json").read_text())
    arm = next(r for r in best["ranking"] if r["label"] == "lnsr_lam0.1")
    assert arm["options"]["lam"] == 0.1 and best["split"] == "holdout0.2 of train"
    assert best["tie"] or best["best"]["options"]["lam"] == 0.1  # tied arms (tiny data) name no best arm
    with pytest.raises(SystemExit, match=r"not an LNSR option"):
        main(["tune", "--task", "mrpc", "--grid", "lr=1e-4,2e-5"])
    with pytest.raises(SystemExit, match=r"--holdout must be in \(0, 1\)"):
        main(["tune", "--task", "mrpc", "--holdout", "0"])


# -- kill and resume ----------------------------------------------------------------------------------
def _cli(args, env=None):
    return [sys.executable, "-c", "import sys; from lnsr.cli import main; sys.exit(main(sys.argv[1:]))", *args]


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, tiny_model):
    train, val, _ = _own_data(tmp_path)
    big = write_table(tmp_path / "big.csv", ["id", "premise", "hypothesis", "label"],
                      pairs(320, seed=5, labels=("neg", "pos")))
    common = ["finetune", "--train-file", big, "--validation-file", val, "--method", "lnsr:every=2", "--seeds", "3",
              "--epochs", "3", "--batch-size", "4", "--lr", "1e-3", "--lam", "0.5", "--backend", "torch",
              "--model", tiny_model, "--no-progress", "--save-model", "--checkpoint-every", "7",
              "--task-name", "nli", "--threads", "1"]
    env = dict(os.environ, PYTHONHASHSEED="0")
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    subprocess.run(_cli(common + ["--output-dir", str(ref_dir)]), check=True, env=env, capture_output=True)

    # kill -9 the same run as soon as a mid-epoch checkpoint of epoch 2 or 3 is on disk (either
    # interrupts an epoch after a finished one; a loaded machine may let the poller miss epoch 2)
    run_dir = cut_dir / "nli" / "lnsr_every2"
    proc = subprocess.Popen(_cli(common + ["--output-dir", str(cut_dir)]), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = run_dir / "seed3.ckpt"
    deadline = time.time() + 600
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists():
            try:
                st = torch.load(ckpt, weights_only=False)
            except Exception:  # being replaced right now
                st = None
            if st and st["epoch"] >= 2 and st["step"] > 0:
                proc.send_signal(signal.SIGKILL)
                killed_at = (st["epoch"], st["step"])
                break
        time.sleep(0.02)
    proc.wait()
    assert killed_at is not None, "the run ended before it could be killed; make it longer"
    assert not (run_dir / "seed3.json").exists()

    res = subprocess.run(_cli(common + ["--output-dir", str(cut_dir)]), env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming from" in res.stderr and not ckpt.exists()
    ref = json.loads((ref_dir / "nli" / "lnsr_every2" / "seed3.json").read_text())
    cut = json.loads((run_dir / "seed3.json").read_text())
    assert cut["final"] == ref["final"]
    for a, b in zip(ref["epochs"], cut["epochs"]):
        assert (a["train_loss"], a["penalty"], a["metrics"]) == (b["train_loss"], b["penalty"], b["metrics"])
    from safetensors.torch import load_file
    wa = load_file(str(ref_dir / "nli" / "lnsr_every2" / "seed3-model" / "model.safetensors"))
    wb = load_file(str(run_dir / "seed3-model" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("method", ["smart", "mixout", "l2sp", "r3f", "lnsr:every=3"])
def test_interrupted_baselines_resume_exactly(tmp_path, tiny_model, monkeypatch, capsys, method):
    """Stopped after the epoch-1 checkpoint (an exception in epoch 2's evaluation), a re-run resumes
    and ends with the uninterrupted run's losses, scores and weights (SMART's teacher included)."""
    import lnsr.finetune.runner as runner
    from safetensors.torch import load_file

    train, val, _ = _own_data(tmp_path)
    common = ["finetune", "--train-file", train, "--validation-file", val, "--method", method, "--seeds", "2",
              "--epochs", "2", "--batch-size", "6", "--lr", "1e-3", "--lam", "0.5", "--backend", "torch",
              "--model", tiny_model, "--no-progress", "--save-model", "--task-name", "nli"]
    main(common + ["--output-dir", str(tmp_path / "ref")])
    real, calls = runner.evaluate, []

    def stop_in_epoch_2(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a Ctrl-C in epoch 2
        time.sleep(1.0)  # a slow first process: its time must count in the resumed run's wall time
        return real(*a, **k)

    monkeypatch.setattr(runner, "evaluate", stop_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        main(common + ["--output-dir", str(tmp_path / "cut")])
    monkeypatch.setattr(runner, "evaluate", real)
    capsys.readouterr()
    main(common + ["--output-dir", str(tmp_path / "cut")])
    assert "resuming from" in capsys.readouterr().err  # not a re-run from scratch
    (label,) = [p for p in os.listdir(tmp_path / "ref" / "nli") if os.path.isdir(tmp_path / "ref" / "nli" / p)]
    ref = json.loads((tmp_path / "ref" / "nli" / label / "seed2.json").read_text())
    cut = json.loads((tmp_path / "cut" / "nli" / label / "seed2.json").read_text())
    assert [(e["train_loss"], e["metrics"]) for e in ref["epochs"]] == [(e["train_loss"], e["metrics"])
                                                                       for e in cut["epochs"]]
    assert ref["resumed_from"] == [] and cut["resumed_from"] == [[2, 0]]
    assert cut["epochs"][0]["eval_time_s"] >= 1.0
    assert cut["wall_time_s"] >= sum(e["train_time_s"] + e["eval_time_s"] for e in cut["epochs"])
    wa = load_file(str(tmp_path / "ref" / "nli" / label / "seed2-model" / "model.safetensors"))
    wb = load_file(str(tmp_path / "cut" / "nli" / label / "seed2-model" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
