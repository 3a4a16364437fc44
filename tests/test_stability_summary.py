"""bench/stability/stability.py, the second study's reporting: the failed-run rule, the registered
choice of the final regimes from the scan and the rewrite of docs/results.md's block, on synthetic
run files whose answers are known by hand (nothing is trained)."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def st():
    path = os.path.join(HERE, "..", "bench", "stability", "stability.py")
    spec = importlib.util.spec_from_file_location("stability", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(root, fam, task, n, lr, seed, acc, *, predicted=(40, 60), labels=(32, 68), wall=600.0):
    d = os.path.join(root, "scan", fam, f"{task}_n{n}_lr{lr}", task, "vanilla")
    os.makedirs(d, exist_ok=True)
    run = {"config": {"seed": seed, "task": task, "lr": float(lr)}, "final": {"accuracy": acc},
           "wall_time_s": wall, "evaluation_label_counts": list(labels),
           "epochs": [{"epoch": 1, "metrics": {"accuracy": acc}, "predicted_per_class": list(predicted)}]}
    with open(os.path.join(d, f"seed{seed}.json"), "w") as f:
        json.dump(run, f)


def _fill(st, root, fam, scores: dict):
    """scores: (task, n, lr) -> five accuracies (a value of None: a one-class run at the majority rate)."""
    for (task, n, lr), accs in scores.items():
        for seed, acc in enumerate(accs, 1):
            if acc is None:
                _run(root, fam, task, n, lr, seed, 0.68, predicted=(0, 100))
            else:
                _run(root, fam, task, n, lr, seed, acc)


def test_failed_rule(st):
    base = {"final": {"accuracy": 0.80}, "evaluation_label_counts": [32, 68],
            "epochs": [{"predicted_per_class": [30, 70]}]}
    assert not st.failed(base)
    assert st.failed({**base, "epochs": [{"predicted_per_class": [0, 100]}]})           # one class
    assert st.failed({**base, "final": {"accuracy": 0.689}})                              # within 1 point
    assert st.failed({**base, "final": {"accuracy": 0.55}})                               # below the majority
    assert not st.failed({**base, "final": {"accuracy": 0.691}})


def test_choice_waits_for_the_whole_grid_then_takes_the_band_with_most_failures(st, tmp_path):
    root = str(tmp_path)
    good = [0.80, 0.81, 0.79, 0.82, 0.80]
    grid = {s: list(good) for s in st.SCAN["mpnet-base"]}
    grid[("mrpc", 1000, "5e-5")] = [0.80, None, 0.81, 0.79, 0.80]          # 1 failure
    grid[("rte", 1000, "5e-5")] = [0.75, None, 0.77, None, 0.76]            # 2 failures: the pick
    grid[("rte", 1000, "1e-4")] = [None, None, None, None, 0.70]            # 4: "not learnt", never picked
    last = grid.pop(("mrpc", 1000, "1e-4"))
    _fill(st, root, "mpnet-base", grid)
    assert st.choose(st.rows(root, "mpnet-base", optional=False)) is None   # incomplete: no choice yet
    _fill(st, root, "mpnet-base", {("mrpc", 1000, "1e-4"): last})
    pick = st.choose(st.rows(root, "mpnet-base", optional=False))
    assert (pick["task"], pick["n"], pick["lr"], pick["failed"]) == ("rte", 1000, "5e-5", 2)
    assert "rule 1" in pick["why"]


def test_band_ties_go_to_the_larger_spread_then_the_lower_lr(st, tmp_path):
    root = str(tmp_path)
    grid = {s: [0.80, 0.81, 0.79, 0.82, 0.80] for s in st.SCAN["minilm"]}
    grid[("mrpc", 250, "3e-4")] = [None, 0.70, 0.71, 0.72, 0.71]            # 1 failure, small spread
    grid[("sst2", 500, "1e-3")] = [None, 0.60, 0.90, 0.75, 0.82]            # 1 failure, large spread: the pick
    _fill(st, root, "minilm", grid)
    pick = st.choose(st.rows(root, "minilm", optional=False))
    assert (pick["task"], pick["n"], pick["lr"]) == ("sst2", 500, "1e-3")


def test_no_failures_is_a_finding_and_picks_the_largest_spread(st, tmp_path):
    root = str(tmp_path)
    grid = {s: [0.80, 0.81, 0.79, 0.82, 0.80] for s in st.SCAN["mpnet-base"]}
    grid[("rte", 1000, "2e-5")] = [0.70, 0.78, 0.74, 0.80, 0.72]            # no failure, the largest std
    grid[("rte", 1000, "1e-4")] = [None] * 5                                # not learnt: excluded
    _fill(st, root, "mpnet-base", grid)
    pick = st.choose(st.rows(root, "mpnet-base", optional=False))
    assert (pick["task"], pick["lr"]) == ("rte", "2e-5") and "rule 2" in pick["why"]


def test_summary_rewrites_only_its_block(st, tmp_path):
    root = str(tmp_path / "runs")
    _fill(st, root, "mpnet-base", {("mrpc", 1000, "2e-5"): [0.80, 0.81, None, 0.82, 0.80]})
    md = tmp_path / "results.md"
    md.write_text("# head\n\n<!-- stability:begin -->\nold\n<!-- stability:end -->\n\ntail\n")
    body = st.summary(root, str(md))
    text = md.read_text()
    assert text.startswith("# head\n") and text.endswith("\ntail\n") and "old" not in text
    assert "| mrpc | 1000 | 2e-5 | 5/5 | 1 | " in body and "not yet" in body
    assert st.summary(root, str(md)) == body and md.read_text() == text        # idempotent
    md.write_text("no block here")
    with pytest.raises(SystemExit, match="stability:begin"):
        st.summary(root, str(md))
