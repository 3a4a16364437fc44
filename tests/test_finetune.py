"""`lnsr finetune`: GLUE readers, metrics, end-to-end runs with resume, summary, errors, bench stub."""
import json
import math
import os
import re
import sys
import types

import numpy as np
import pytest

from glue_tiny import FOLDERS, HEADERS, save_tiny_bert, write_glue
from lnsr.cli import main
from lnsr.data import TASKS, get_task, read_tsv
from lnsr.data.metrics import accuracy, f1, matthews, pearson, rankdata, spearman


# -- metrics against hand-computed values ---------------------------------------------------------------
def test_metrics_hand_computed():
    pred, label = [1, 0, 1, 1], [1, 1, 1, 0]
    assert accuracy(pred, label) == 0.5
    # tp=2 fp=1 fn=1: F1 = 2*2 / (2*2 + 1 + 1)
    assert f1(pred, label) == pytest.approx(4 / 6)
    # tp=2 tn=0 fp=1 fn=1: (0*2 - 1*1) / sqrt(3*3*1*1)
    assert matthews(pred, label) == pytest.approx(-1 / 3)
    # tp=2 tn=2 fp=1 fn=1: (4 - 1) / sqrt(3^4)
    assert matthews([1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 1, 1]) == pytest.approx(1 / 3)
    assert matthews([1, 1, 1], [1, 0, 1]) == 0.0  # a constant prediction: empty marginal -> 0
    assert f1([0, 0], [0, 0]) == 0.0
    assert f1([1, 0, 1], [1, 0, 1]) == 1.0
    # x=[1,2,3], y=[1,2,4]: sum(xc*yc)=3, sxx=2, syy=42/9
    assert pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(3 / math.sqrt(2 * 42 / 9))
    # ties get average ranks: x -> [1, 2.5, 2.5, 4]; then r = 4.5 / sqrt(4.5 * 5)
    assert list(rankdata([1, 2, 2, 3])) == [1, 2.5, 2.5, 4]
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0


# -- readers -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", sorted(TASKS))
def test_read_every_glue_layout(tmp_path, task):
    d = write_glue(tmp_path, task, n_train=7, n_dev=5)
    spec = get_task(task)
    train = read_tsv(spec, os.path.join(d, "train.tsv"))
    dev = read_tsv(spec, os.path.join(d, spec.dev_file))
    assert len(train) == 7 and len(dev) == 5
    for a, b, y in train:
        assert a and not a.endswith(" ") and (b is None) == (spec.text_b is None)
        if spec.is_regression:
            assert isinstance(y, float) and 0 <= y <= 5
        else:
            assert y in range(spec.num_labels)


def test_mrpc_bom_and_quotes(tmp_path):
    d = tmp_path / "MRPC"
    d.mkdir()
    (d / "train.tsv").write_text('\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n'
                                 '1\t1\t2\tHe said "hi, there".\tShe said "no\n0\t3\t4\tx\ty\n', encoding="utf-8")
    rows = read_tsv(get_task("mrpc"), str(d / "train.tsv"))
    assert rows == [('He said "hi, there".', 'She said "no', 1), ("x", "y", 0)]


# -- errors --------------------------------------------------------------------------------------------
def _ft(tmp_path, data_dir, *extra, model=None):
    return ["finetune", "--task", "mrpc", "--data-dir", str(data_dir), "--model", model or str(tmp_path / "m"),
            "--output-dir", str(tmp_path / "out"), "--no-progress", *extra]


def test_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match=r"does not exist.*GLUE-format"):
        main(_ft(tmp_path, tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"no train.tsv for mrpc.*MRPC"):
        main(_ft(tmp_path, tmp_path / "empty"))
    write_glue(tmp_path / "bad", "mrpc", header=["label", "s1", "s2"])
    with pytest.raises(SystemExit, match=r"wrong column layout for mrpc: missing column\(s\) \['#1 String'"):
        main(_ft(tmp_path, tmp_path / "bad"))
    write_glue(tmp_path / "rte", "rte")
    with pytest.raises(SystemExit, match=r"unknown task 'rtee'.*rte"):
        main(["finetune", "--task", "rtee", "--data-dir", str(tmp_path / "rte")])
    with pytest.raises(SystemExit, match=r"unknown method 'l2s': choose from vanilla, lnsr, l2sp, mixout, r3f, smart"):
        main(_ft(tmp_path, tmp_path / "rte", "--method", "l2s"))
    with pytest.raises(SystemExit, match=r"method lnsr: lam must be a finite float >= 0"):
        main(_ft(tmp_path, tmp_path / "rte", "--method", "vanilla", "lnsr", "--lam", "-1"))
    with pytest.raises(SystemExit, match=r"bad method spec"):
        main(_ft(tmp_path, tmp_path / "rte", "--method", "lnsr:lamda=1"))
    # a wrong label value names the file and line
    d = write_glue(tmp_path / "lab", "rte")
    with open(os.path.join(d, "train.tsv"), "a") as f:
        f.write("99\ta b\tc d\tmaybe\n")
    with pytest.raises(SystemExit, match=r"train.tsv:26: label 'maybe'"):
        read_tsv(get_task("rte"), os.path.join(d, "train.tsv"))


@pytest.mark.parametrize("flags,expect", [({"avx2", "f16c"}, False), ({"avx512f", "avx512_bf16"}, True),
                                          ({"amx_tile", "amx_bf16"}, True), (set(), False)])
def test_cpu_has_bf16_reads_the_cpu_flags(flags, expect):
    from lnsr.utils.machine import cpu_flags, cpu_has_bf16
    assert cpu_has_bf16(flags) is expect
    here = cpu_flags()
    assert here is None or cpu_has_bf16() is bool(here & {"avx512_bf16", "amx_bf16"})


@pytest.mark.parametrize("has", [False, True, None])
def test_bf16_on_a_cpu_without_bf16_hardware_warns_and_names_the_fix(monkeypatch, has):
    import warnings

    import torch

    from lnsr.finetune import runner
    monkeypatch.setattr(runner, "cpu_has_bf16", lambda: has)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runner.check_precision("bf16", torch.device("cpu"))
        runner.check_precision("fp32", torch.device("cpu"))
    msgs = [str(w.message) for w in caught]
    if has is False:  # only a CPU known to lack it: unknown flags (not Linux) say nothing
        assert len(msgs) == 1 and "neither AVX-512 BF16 nor AMX" in msgs[0] and "leave out --bf16" in msgs[0]
    else:
        assert msgs == []


def test_missing_model_is_a_clear_error(tmp_path):
    write_glue(tmp_path / "glue", "rte")
    with pytest.raises(SystemExit, match=r"could not load AutoTokenizer from .*no-such-model.*pass --model"):
        main(["finetune", "--task", "rte", "--data-dir", str(tmp_path / "glue"), "--model",
              str(tmp_path / "no-such-model"), "--output-dir", str(tmp_path / "out"), "--no-progress"])


def test_registered_method_plugs_in(tmp_path, monkeypatch):
    """A new method (here: an L2 pull towards the initial weights, L2-SP-like) only needs registering."""
    from lnsr import methods

    monkeypatch.setitem(methods.METHODS, "l2init", None)  # undone after the test: the registry stays clean

    @methods.register_method("l2init")
    class L2Init(methods.Method):
        OPTIONS = {"lam": float}

        def attach(self, model):
            self.ref = [(p, p.detach().clone()) for p in model.parameters()]

        def extra_loss(self, model, batch, outputs):
            self.last = self.options["lam"] * sum(((p - r) ** 2).sum() for p, r in self.ref)
            return self.last

        def stats(self):
            last = float(self.last.detach())
            return {"penalty": last / self.options["lam"], "reg_loss": last}

    model = save_tiny_bert(tmp_path / "m", layers=1)
    write_glue(tmp_path / "glue", "rte", n_train=16, n_dev=6)
    main(["finetune", "--task", "rte", "--data-dir", str(tmp_path / "glue"), "--model", model, "--output-dir",
          str(tmp_path / "out"), "--no-progress", "--method", "l2init:lam=0.5", "--seeds", "1", "--epochs", "1",
          "--batch-size", "8", "--lr", "1e-2", "--warmup-ratio", "0"])
    r = json.loads((tmp_path / "out" / "rte" / "l2init_lam0.5" / "seed1.json").read_text())
    assert r["config"]["method_options"] == {"lam": 0.5} and r["epochs"][0]["penalty"] > 0


def test_hub_without_datasets_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(SystemExit, match=r"needs the `datasets` package.*--data-dir"):
        main(["finetune", "--task", "rte", "--model", str(tmp_path)])


def test_bench_forwards_argv(monkeypatch):
    seen = []
    fake = types.ModuleType("lnsr.benchmarks.cli")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "lnsr.benchmarks.cli", fake)
    assert main(["bench", "--quick", "--device", "cpu"]) == 0
    assert seen == [["--quick", "--device", "cpu"]]


def test_bench_missing_module(monkeypatch):
    import importlib
    real = importlib.import_module

    def fake_import(name, *a, **k):
        if name == "lnsr.benchmarks.cli":
            raise ModuleNotFoundError("No module named 'lnsr.benchmarks'", name="lnsr.benchmarks")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    with pytest.raises(SystemExit, match="needs the lnsr.benchmarks module"):
        main(["bench"])


# -- end to end ----------------------------------------------------------------------------------------
def _table_rows(md):
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and cells[0] not in ("method", "---"):
            rows[(cells[0], cells[1])] = cells
    return rows


def test_finetune_end_to_end_and_resume(tmp_path, capsys):
    model = save_tiny_bert(tmp_path / "m")
    write_glue(tmp_path / "glue", "mrpc", n_train=24, n_dev=12)
    args = _ft(tmp_path, tmp_path / "glue", "--method", "vanilla", "lnsr", "--seeds", "1", "2", "--epochs", "2",
               "--batch-size", "8", "--lr", "1e-3", "--lam", "0.5", "--backend", "torch", model=model)
    main(args)
    first = capsys.readouterr()
    err = first.err
    out_dir = tmp_path / "out" / "mrpc"
    records = {}
    for method in ("vanilla", "lnsr"):
        for seed in (1, 2):
            path = out_dir / method / f"seed{seed}.json"
            r = json.loads(path.read_text())
            records[method, seed] = (r, path.stat().st_mtime_ns)
            assert r["config"]["method"] == method and r["config"]["seed"] == seed
            assert r["config"]["epochs"] == 2 and len(r["epochs"]) == 2
            assert set(r["final"]) == {"f1", "accuracy"} and r["final"] == r["epochs"][-1]["metrics"]
            assert r["wall_time_s"] > 0 and all(np.isfinite(e["train_loss"]) for e in r["epochs"])
            if method == "lnsr":
                assert r["config"]["method_options"]["lam"] == 0.5
                for e in r["epochs"]:
                    assert e["penalty"] > 0 and e["penalty_task_ratio"] > 0
                    assert e["train_loss"] == pytest.approx(e["task_loss"] + e["reg_loss"], rel=1e-6)
            else:
                assert "penalty" not in r["epochs"][0] and "sigma" not in r["config"]["method_options"]
    assert "epoch 2/2" in err
    # same seed, different method: same data order and head init, different training
    assert records["vanilla", 1][0]["epochs"][0]["task_loss"] != records["lnsr", 1][0]["epochs"][0]["task_loss"]

    md = (out_dir / "summary.md").read_text()
    rows = _table_rows(md)
    for method in ("vanilla", "lnsr"):
        for metric in ("f1", "accuracy"):
            vals = np.array([records[method, s][0]["final"][metric] for s in (1, 2)]) * 100
            cells = rows[method, metric]
            assert cells[2] == "2"
            assert float(cells[3]) == pytest.approx(vals.mean(), abs=0.006)
            assert float(cells[4]) == pytest.approx(vals.std(ddof=1), abs=0.006)
            assert float(cells[5]) == pytest.approx(vals.max(), abs=0.006)
            assert float(cells[6]) == pytest.approx(vals.min(), abs=0.006)
            assert cells[7] == ", ".join(f"s{s}:{v:.2f}" for s, v in zip((1, 2), vals))
    assert md in first.out  # the same table is printed on stdout
    # LNSR against vanilla, paired by seed, on the task's main metric (MRPC: f1)
    d = [records["lnsr", s][0]["final"]["f1"] - records["vanilla", s][0]["final"]["f1"] for s in (1, 2)]
    line = next(ln for ln in md.splitlines() if ln.startswith("| lnsr - vanilla | 2 | "))
    assert line.split("|")[3].strip().startswith(f"{100 * np.mean(d):+.2f} [")
    png = (out_dir / "summary.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # re-run: every run is reused (JSON untouched), the table is rebuilt from the stored results and says so
    main(args)
    cap = capsys.readouterr()
    assert len(re.findall(r"reused: finished run with the same config and inputs", cap.err)) == 4
    for key, (r, mtime) in records.items():
        assert (out_dir / key[0] / f"seed{key[1]}.json").stat().st_mtime_ns == mtime
    assert _table_rows(cap.out) == rows
    assert "[mrpc] reused 4 finished runs (same config and inputs; not re-run): vanilla seeds 1, 2; lnsr seeds 1, 2" \
        in cap.out
    assert "[run " not in cap.err  # nothing trained: no progress lines

    # --summary-only trains nothing and leaves out what has not run
    main(args + ["--summary-only", "--seeds", "1", "2", "3"])
    cap = capsys.readouterr()
    assert "[mrpc lnsr seed 3] not finished" in cap.err and _table_rows(cap.out) == rows
    assert not (out_dir / "lnsr" / "seed3.json").exists()

    # a changed LNSR option into the same folder stops before training, naming what differs
    changed = [a if a != "0.5" else "0.25" for a in args] + ["--seeds", "1"]
    with pytest.raises(SystemExit, match=r"(?s)1 run of this command already has a record.*lnsr/seed1\.json: "
                                         r"method_options\.lam: 0\.5 -> 0\.25.*another --output-dir.*--overwrite"):
        main(changed)
    assert json.loads((out_dir / "lnsr" / "seed1.json").read_text())["config"]["method_options"]["lam"] == 0.5
    # with --overwrite it re-runs lnsr only, and the earlier record is kept aside, out of seed*.json
    main(changed + ["--overwrite"])
    cap = capsys.readouterr()
    assert "[mrpc vanilla seed 1] reused" in cap.err and "[mrpc lnsr seed 1] re-running" in cap.err
    assert json.loads((out_dir / "lnsr" / "seed1.json").read_text())["config"]["method_options"]["lam"] == 0.25
    assert (out_dir / "vanilla" / "seed1.json").stat().st_mtime_ns == records["vanilla", 1][1]
    kept = list((out_dir / "lnsr").glob("superseded-seed1.*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["final"] == records["lnsr", 1][0]["final"]
    assert sorted(p.name for p in (out_dir / "lnsr").glob("seed*.json")) == ["seed1.json", "seed2.json"]


def test_method_spec_and_regression_task(tmp_path, capsys):
    """STS-B (regression, Pearson/Spearman) with a per-method override and a train hold-out."""
    model = save_tiny_bert(tmp_path / "m", layers=1)
    write_glue(tmp_path / "glue", "stsb", n_train=20, n_dev=6)
    main(["finetune", "--task", "stsb", "--data-dir", str(tmp_path / "glue" / "STS-B"), "--model", model,
          "--output-dir", str(tmp_path / "out"), "--no-progress", "--method", "lnsr:lam=0.1,sigma=0.1",
          "--seeds", "3", "--epochs", "1", "--batch-size", "8", "--holdout", "0.25", "--backend", "torch"])
    r = json.loads((tmp_path / "out" / "stsb" / "lnsr_lam0.1_sigma0.1" / "seed3.json").read_text())
    assert r["config"]["method_options"]["lam"] == 0.1 and r["config"]["method_options"]["sigma"] == 0.1
    assert r["config"]["eval_split"].startswith("holdout") and set(r["final"]) == {"pearson", "spearman"}
    assert "5 eval (holdout" in capsys.readouterr().err


def test_run_seconds_counts_the_epochs_of_a_run_resumed_before_wall_times_spanned_processes():
    from lnsr.finetune.report import run_seconds, summarize
    epochs = [{"train_time_s": 100.0, "eval_time_s": 5.0}, {"train_time_s": 90.0, "eval_time_s": 6.0}]
    whole = {"config": {"label": "a", "seed": 1}, "epochs": epochs, "final": {"accuracy": 0.5}, "wall_time_s": 210.0}
    resumed = dict(whole, wall_time_s=97.0, config={"label": "a", "seed": 2})  # the last process alone
    assert run_seconds(whole) == 210.0
    assert run_seconds(resumed) == 201.0
    assert run_seconds({k: v for k, v in whole.items() if k != "wall_time_s"}) is None
    assert summarize([whole, resumed])["a"]["wall"] == [210.0, 201.0]
