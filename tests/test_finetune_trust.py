"""Runs a user can trust: a run is identified by the content of what it reads, nothing is overwritten,
a job of many runs says how long it has left, and readings on too few seeds say they cannot tell."""
import json
import os
import re

import pytest

from glue_tiny import save_tiny_bert, write_glue
from lnsr.cli import main


def _quiet(capsys):
    capsys.readouterr()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("model") / "m", layers=1)


def _args(data, model, out, *extra, tasks=("mrpc",)):
    return ["finetune", "--task", *tasks, "--data-dir", str(data), "--model", model, "--output-dir", str(out),
            "--no-progress", "--method", "vanilla", "--epochs", "1", "--batch-size", "8", "--lr", "1e-3",
            "--max-length", "16", *extra]


def _cut(path, rows):
    with open(path) as f:
        lines = f.read().splitlines(keepends=True)
    with open(path, "w") as f:
        f.writelines(lines[:1 + rows])


# -- (1) + (2): the content of the inputs is part of a run's identity; nothing is overwritten ---------------
def test_changed_data_stops_then_overwrite_reruns_and_keeps_the_old_record(tmp_path, tiny, capsys, monkeypatch):
    from lnsr.finetune import inputs

    d = write_glue(tmp_path / "glue", "mrpc", n_train=16, n_dev=10)
    out = tmp_path / "out"
    run_dir = out / "mrpc" / "vanilla"
    hashed = []
    real_digest = inputs._digest
    monkeypatch.setattr(inputs, "_CACHE", {})  # nothing hashed by an earlier test
    monkeypatch.setattr(inputs, "_digest", lambda p: hashed.append(os.path.basename(p)) or real_digest(p))
    main(_args(d, tiny, out, "--seeds", "1", "2"))
    cap = capsys.readouterr()
    # one invocation of 2 runs hashes each file once (the weights are the costly one)
    assert sorted(hashed) == sorted(["train.tsv", "dev.tsv", "config.json", "model.safetensors", "tokenizer.json",
                                     "tokenizer_config.json", "vocab.txt"])
    rec = json.loads((run_dir / "seed1.json").read_text())
    assert set(rec["config"]["inputs"]) == {"train", "dev", "model"}
    assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", v) for v in rec["config"]["inputs"].values())
    # a job of several runs says where it is and, after the first run, how long it has left
    assert "[run 1 of 2] mrpc vanilla seed 1 — ETA after the first run" in cap.err
    assert re.search(r"\[run 2 of 2\] mrpc vanilla seed 2 — ETA for the job \d+ s", cap.err)
    mtime = (run_dir / "seed1.json").stat().st_mtime_ns

    # the dev file cut to 5 rows, same path, same flags: the old scores are not shown as current
    _cut(os.path.join(d, "dev.tsv"), 5)
    with pytest.raises(SystemExit) as e:
        main(_args(d, tiny, out, "--seeds", "1", "2"))
    msg = str(e.value)
    assert "2 runs of this command already have a record" in msg and "nothing was trained" in msg
    assert f"vanilla/seed1.json: inputs.dev ({os.path.join(d, 'dev.tsv')}): content changed" in msg
    assert "use another --output-dir, or pass --overwrite" in msg.lower()
    assert (run_dir / "seed1.json").stat().st_mtime_ns == mtime  # untouched
    _quiet(capsys)

    # --overwrite re-runs on the new data; the earlier records are kept aside, out of every seed*.json glob
    main(_args(d, tiny, out, "--seeds", "1", "2", "--overwrite"))
    cap = capsys.readouterr()
    assert "[mrpc vanilla seed 1] re-running; the earlier record (inputs.dev" in cap.err
    kept = sorted(run_dir.glob("superseded-seed*.json"))
    assert len(kept) == 2 and sorted(p.name for p in run_dir.glob("seed*.json")) == ["seed1.json", "seed2.json"]
    old = json.loads(next(p for p in kept if p.name.startswith("superseded-seed1.")).read_text())
    assert old["final"] == rec["final"] and old["superseded"]["was"].endswith("seed1.json")
    new = json.loads((run_dir / "seed1.json").read_text())
    assert new["config"]["inputs"]["dev"] != rec["config"]["inputs"]["dev"]
    assert new["config"]["inputs"]["train"] == rec["config"]["inputs"]["train"]
    assert sum(1 for _ in open(os.path.join(d, "dev.tsv"))) - 1 == sum(new["evaluation_label_counts"])
    # the summary is built from the new runs only
    assert "| vanilla | f1 | 2 |" in (out / "mrpc" / "summary.md").read_text()

    # other model weights (same path) are other inputs too
    from safetensors.torch import load_file, save_file
    w = load_file(os.path.join(tiny, "model.safetensors"))
    k = next(iter(w))
    w[k] = w[k] + 1.0
    copy = tmp_path / "m2"
    copy.mkdir()
    for name in os.listdir(tiny):
        if name != "model.safetensors":
            (copy / name).write_bytes(open(os.path.join(tiny, name), "rb").read())
    save_file(w, str(copy / "model.safetensors"), metadata={"format": "pt", "x": "1"})  # another size
    with pytest.raises(SystemExit, match=r"model: .*->"):  # the path in the config differs ...
        main(_args(d, str(copy), out, "--seeds", "1"))
    (run_dir / "seed1.json").write_text(json.dumps(dict(new, config=dict(new["config"], model=str(copy)))))
    with pytest.raises(SystemExit, match=r"inputs\.model \(.*m2\): content changed"):  # ... and so does its content
        main(_args(d, str(copy), out, "--seeds", "1"))


def test_a_record_without_hashes_is_not_reused_and_summary_only_leaves_it_out(tmp_path, tiny, capsys):
    d = write_glue(tmp_path / "glue", "mrpc", n_train=16, n_dev=6)
    out = tmp_path / "out"
    main(_args(d, tiny, out, "--seeds", "1"))
    path = out / "mrpc" / "vanilla" / "seed1.json"
    rec = json.loads(path.read_text())
    del rec["config"]["inputs"]  # as lnsr wrote records before runs were identified by content
    path.write_text(json.dumps(rec))
    _quiet(capsys)
    main(_args(d, tiny, out, "--seeds", "1", "--summary-only"))  # trains nothing: no stop, the run is left out
    cap = capsys.readouterr()
    assert "[mrpc vanilla seed 1] not finished" in cap.err and "no content hashes" in cap.err
    with pytest.raises(SystemExit, match=r"inputs: no content hashes.*\n.*--overwrite"):
        main(_args(d, tiny, out, "--seeds", "1"))
    main(_args(d, tiny, out, "--seeds", "1", "--overwrite"))
    assert "inputs" in json.loads(path.read_text())["config"]
    assert len(list(path.parent.glob("superseded-seed1.*.json"))) == 1
    # and now the same command reuses it
    _quiet(capsys)
    main(_args(d, tiny, out, "--seeds", "1"))
    cap = capsys.readouterr()
    assert "[mrpc] reused 1 finished run (same config and inputs; not re-run): vanilla seed 1" in cap.out


def test_a_conflict_in_any_task_stops_before_the_first_run_trains(tmp_path, tiny):
    write_glue(tmp_path / "glue", "rte", n_train=8, n_dev=4)
    write_glue(tmp_path / "glue", "mrpc", n_train=8, n_dev=4)
    out = tmp_path / "out"
    main(_args(tmp_path / "glue", tiny, out, "--seeds", "1", tasks=("rte",)))
    assert (out / "rte" / "vanilla" / "seed1.json").is_file()
    with pytest.raises(SystemExit, match=r"rte/vanilla/seed1\.json: lr: 0\.001 -> 0\.002"):
        main(_args(tmp_path / "glue", tiny, out, "--seeds", "1", "--lr", "2e-3", tasks=("mrpc", "rte")))
    assert not (out / "mrpc").exists()  # mrpc, first in the job, did not start


def test_same_config_without_its_saved_model_reruns_without_overwrite(tmp_path):
    from lnsr.finetune.runner import record_status, write_json

    path, model = str(tmp_path / "seed1.json"), str(tmp_path / "seed1-model")
    write_json(path, {"config": {"lr": 1.0, "inputs": {}}})
    assert record_status(path, {"lr": 1.0, "inputs": {}}, model) == (None, [])  # not a conflict: nothing differs
    os.makedirs(model)
    open(os.path.join(model, "config.json"), "w").close()
    assert record_status(path, {"lr": 1.0, "inputs": {}}, model)[0] == {"config": {"lr": 1.0, "inputs": {}}}
    assert record_status(path, {"lr": 2.0, "inputs": {}}, model) == (None, ["lr: 1.0 -> 2.0"])
    assert record_status(str(tmp_path / "none.json"), {}, None) == (None, None)


def test_keep_aside_moves_the_companions_and_never_overwrites(tmp_path):
    from lnsr.finetune.runner import keep_aside, write_json

    folder = tmp_path / "run"
    path = folder / "seed3.json"
    preds, model = folder / "seed3-test_predictions.tsv", folder / "seed3-model"
    aside = []
    for i in range(2):
        model.mkdir(parents=True)
        (model / "config.json").write_text("{}")
        preds.write_text(f"index\tprediction\n0\t{i}\n")
        write_json(str(path), {"final": {"accuracy": i}, "finished": "2026-01-02T03:04:05",
                               "test_predictions": str(preds), "saved_model": str(model)})
        aside.append(keep_aside(str(path)))
    assert [os.path.basename(p) for p in aside] == ["superseded-seed3.20260102T030405.json",
                                                   "superseded-seed3.20260102T030405-2.json"]
    assert not path.exists() and not preds.exists() and not model.exists()
    for i, p in enumerate(aside):
        rec = json.loads(open(p).read())
        assert rec["final"] == {"accuracy": i}
        assert open(rec["test_predictions"]).read().endswith(f"0\t{i}\n") and os.path.isdir(rec["saved_model"])
    assert list(folder.glob("seed*.json")) == [] and list(folder.glob("**/seed*.json")) == []


def test_config_differences_name_files_and_options():
    from lnsr.finetune.runner import config_differences

    old = {"lr": 2e-5, "method_options": {"lam": 0.5, "sigma": 0.05},
           "inputs": {"train": "sha256:a", "dev": "sha256:b"}}
    new = {"lr": 1e-4, "method_options": {"lam": 0.5, "sigma": 0.1}, "inputs": {"train": "sha256:a", "dev": "sha256:c",
                                                                                  "model": "sha256:m"}}
    assert config_differences(old, new, {"dev": "glue/MRPC/dev.tsv"}) == [
        "inputs.dev (glue/MRPC/dev.tsv): content changed", "inputs.model: read now, not then",
        "lr: 2e-05 -> 0.0001", "method_options.sigma: 0.05 -> 0.1"]


# -- (5) progress lines and machine hints, from injected numbers --------------------------------------------
def test_eta_line_and_durations():
    from lnsr.finetune.progress import eta_line, format_duration

    assert eta_line(1, 8, "mrpc vanilla seed 1", []) == "[run 1 of 8] mrpc vanilla seed 1 — ETA after the first run"
    # 2 runs done at 120 s each; run 3 of 8 starts: 6 runs left (this one included) -> 12 min
    assert eta_line(3, 8, "mrpc lnsr seed 2", [100.0, 140.0]) == \
        "[run 3 of 8] mrpc lnsr seed 2 — ETA for the job 12 min"
    assert eta_line(8, 8, "x", [30.0]) == "[run 8 of 8] x — ETA for the job 30 s"
    assert [format_duration(s) for s in (0, 89, 90, 5340, 5400, 11100)] == \
        ["0 s", "89 s", "2 min", "89 min", "1 h 30 min", "3 h 05 min"]


@pytest.mark.parametrize("threads,cores,load,free", [
    (2, 2, 2.0, 1),      # two cores, both busy with another job
    (16, 16, 4.2, 12),
    (8, 4, 0.0, 4),      # more threads than cores on an idle machine
    (16, 16, 0.3, None),  # an idle machine: no warning
    (1, 2, 2.0, None),   # one thread is as few as it gets
    (4, 4, None, None),  # no load average (not Linux/Unix): nothing said
])
def test_threads_warning(threads, cores, load, free):
    from lnsr.finetune.progress import threads_warning

    msg = threads_warning(threads, cores, load)
    if free is None:
        assert msg is None
    else:
        assert msg == (f"torch uses {threads} threads but only ~{free} of the {cores} cores are free (load average "
                       f"{load:.1f}): pass --threads {free}")


def test_bf16_hint_only_for_fp32_on_a_cpu_with_bf16_hardware():
    from lnsr.finetune.progress import bf16_hint

    assert "--bf16" in bf16_hint("fp32", "cpu", True, "Xeon")
    assert bf16_hint("bf16", "cpu", True) is None and bf16_hint("fp32", "cuda", True) is None
    assert bf16_hint("fp32", "cpu", False) is None and bf16_hint("fp32", "cpu", None) is None


def test_a_job_warns_once_about_threads_and_bf16(tmp_path, tiny, capsys, monkeypatch):
    import torch

    from lnsr.finetune import runner
    from lnsr.utils import machine

    monkeypatch.setattr(machine, "cpu_load", lambda: (4, 2.0))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr(runner, "cpu_has_bf16", lambda: True)
    d = write_glue(tmp_path / "glue", "mrpc", n_train=8, n_dev=4)
    main(_args(d, tiny, tmp_path / "out", "--seeds", "1", "2"))
    err = capsys.readouterr().err
    assert err.count("torch uses 8 threads but only ~2 of the 4 cores are free (load average 2.0): "
                     "pass --threads 2") == 1
    assert err.count("has AMX or AVX-512 BF16: --bf16 may train faster") == 1
    main(_args(d, tiny, tmp_path / "out", "--seeds", "1", "2"))  # nothing to train: nothing to warn about
    assert "torch uses" not in capsys.readouterr().err


# -- (7) too few seeds cannot tell; tied arms rank nothing ----------------------------------------------------
def test_paired_table_with_one_seed_cannot_tell():
    from lnsr.finetune.report import paired_table, summarize

    results = [{"config": {"label": label, "seed": 1, "method": label, "method_options": {}},
                "final": {"accuracy": acc}, "epochs": [{}]} for label, acc in (("vanilla", 0.7), ("r3f", 0.9))]
    text = paired_table(summarize(results), results, "accuracy")
    row = next(ln for ln in text.splitlines() if ln.startswith("| r3f - vanilla"))
    assert row.endswith("| cannot tell (1 seed) |") and "no measurable effect |" not in row


def test_tune_with_every_arm_tied_names_no_best_arm(tmp_path, tiny, capsys, monkeypatch):
    from lnsr.finetune import runner

    def all_perfect(prep, args, methods, log=print, job=None):  # every arm at 100%, as on an easy held-out part
        return [{"config": {"label": label, "method": name, "method_options": options, "seed": seed},
                 "final": {"f1": 1.0, "accuracy": 1.0}, "epochs": [{"metrics": {}}], "wall_time_s": 1.0}
                for seed in args.seeds for label, name, options in methods]

    from lnsr.finetune import inputs

    monkeypatch.setattr(runner, "run_task", all_perfect)
    hashed = []
    real_digest = inputs._digest
    monkeypatch.setattr(inputs, "_CACHE", {})
    monkeypatch.setattr(inputs, "_digest", lambda p: hashed.append(os.path.basename(p)) or real_digest(p))
    d = write_glue(tmp_path / "glue", "mrpc", n_train=20, n_dev=4)
    out = tmp_path / "tune"
    main(["tune", "--task", "mrpc", "--data-dir", d, "--model", tiny, "--output-dir", str(out), "--no-progress",
          "--seeds", "1", "2", "3", "--grid", "lam=0.01,0.1"])
    cap = capsys.readouterr()
    best = json.loads((out / "mrpc" / "best.json").read_text())
    assert best["tie"] is True and best["best"] is None and best["recommendation"] is None
    assert best["verdict"].startswith("no ranking: the arms tie (f1 100.00 for each of the 4 arms")
    assert "no ranking: the arms tie" in cap.out and "best LNSR arm" not in cap.out
    assert "recommendation:" not in cap.out and "nothing to reuse" in cap.out
    assert "train.tsv" in hashed and "dev.tsv" not in hashed  # lnsr tune does not open dev, not even to hash it
    with pytest.raises(SystemExit, match=r"no 'best' entry"):  # nothing to take the options from
        main(["finetune", "--task", "mrpc", "--data-dir", d, "--method", f"lnsr:@{out / 'mrpc' / 'best.json'}"])


def test_tune_notes_lnsr_arms_tied_at_the_top():
    from lnsr.finetune.tune import all_tie

    rows = [{"mean": 0.9}, {"mean": 0.9 + 1e-15}, {"mean": 0.8}]
    assert all_tie(rows[:2]) and not all_tie(rows) and not all_tie(rows[:1])
