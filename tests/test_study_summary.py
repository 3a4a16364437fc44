"""bench/study/study.py, the study's reporting: the recipe choice, the degenerate-run rule, the final
tables' paired statistics and the rewrite of docs/results.md's block, on synthetic run files
whose answers are known by hand (nothing is trained)."""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

pytest.importorskip("matplotlib")

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("study", os.path.join(HERE, "..", "bench", "study", "study.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(path, seed, acc, *, epochs=1, predicted=(40, 60), labels=(30, 70), device="CPU A", wall=None, precision=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    label, task = os.path.basename(os.path.dirname(path)), os.path.basename(os.path.dirname(os.path.dirname(path)))
    run = {"config": {"seed": seed, "label": label, "task": task, **({"precision": precision} if precision else {})},
           "final": {"accuracy": acc, "f1": acc}, "device": device,
           **({"wall_time_s": wall} if wall is not None else {}),
           "epochs": [{"epoch": e + 1, "task_loss": 0.5 / (e + 1), "metrics": {"accuracy": acc},
                       "predicted_per_class": list(predicted)} for e in range(epochs)],
           "evaluation_label_counts": list(labels)}
    with open(path, "w") as f:
        json.dump(run, f)


def _recipe(root, regime="mrpc1k", skip=None, task="mrpc"):
    best = ("1e-4", 5)
    for lr in ("5e-5", "1e-4"):
        for ep in (3, 5, 10):
            for seed in (1, 2, 3):
                if skip == (lr, ep, seed):
                    continue
                acc = 0.80 if (lr, ep) == best else 0.70 + 0.001 * ep
                _run(os.path.join(root, "recipe", regime, f"lr{lr}_ep{ep}", task, "vanilla", f"seed{seed}.json"),
                     seed, acc + 0.001 * seed, epochs=ep)


def test_recipe_choice_is_the_best_mean_and_waits_for_every_run(study, tmp_path):
    _recipe(tmp_path, skip=("5e-5", 3, 2))
    with pytest.raises(SystemExit, match=r"not finished: lr 5e-5 x 3 epochs \(2/3 seeds\)"):
        study.recipe_choice(str(tmp_path), "mrpc1k")
    table = study.recipe_table(str(tmp_path), "mrpc1k")
    assert "incomplete: 17/18 runs" in table and "**chosen**" not in table
    _run(os.path.join(tmp_path, "recipe", "mrpc1k", "lr5e-5_ep3", "mrpc", "vanilla", "seed2.json"), 2, 0.7)
    best = study.recipe_choice(str(tmp_path), "mrpc1k")
    assert (best["lr"], best["epochs"]) == ("1e-4", 5) and best["mean"] == pytest.approx(0.802)
    assert "| 1e-4 | 5 **chosen** | 3 | 80.20 |" in study.recipe_table(str(tmp_path), "mrpc1k")


def test_degenerate_runs(study):
    def run(acc, predicted, labels=(30, 70)):
        return {"final": {"accuracy": acc}, "epochs": [{"predicted_per_class": list(predicted)}],
                "evaluation_label_counts": list(labels)}
    assert study.degenerate(run(0.70, (0, 100)))        # one predicted class
    assert study.degenerate(run(0.705, (10, 90)))       # within 1 point of the majority rate 0.70
    assert not study.degenerate(run(0.72, (10, 90)))


def test_final_tables_paired_statistics_and_block_rewrite(study, tmp_path, monkeypatch):
    monkeypatch.setattr(study, "FINAL_ARMS", 3)  # these synthetic runs are the whole registered grid
    monkeypatch.setattr(study, "FINAL_SEEDS", 5)
    runs = tmp_path / "runs"
    vanilla = [0.70, 0.72, 0.74, 0.71, 0.73]
    arms = {"vanilla": vanilla,
            "lnsr_lam0_inject_at0": [v + d for v, d in zip(vanilla, (0.01, -0.01, 0.02, -0.02, 0.0))],
            "lnsr_lam0.01_inject_at0_noiserelative": [v + 0.02 for v in vanilla]}
    for arm, accs in arms.items():
        for seed, acc in enumerate(accs, start=1):
            predicted = (0, 100) if (arm, seed) == ("vanilla", 1) else (40, 60)
            _run(str(runs / "final" / "mrpc1k" / "mrpc" / arm / f"seed{seed}.json"), seed, acc, predicted=predicted,
                 labels=(40, 60))  # majority rate 0.60: only the one-class run is degenerate
    text = study.final_section(str(runs), "mrpc1k", str(tmp_path / "plots"))
    lines = text.splitlines()
    row = next(x for x in lines if x.startswith("| vanilla |"))
    assert f"| {100 * np.mean(vanilla):.2f} |" in row and "| 1 |" in row  # seed 1 degenerate
    ahead = next(x for x in lines if x.startswith("| lnsr_lam0.01_inject_at0_noiserelative - vanilla"))
    assert "+2.00 [+2.00, +2.00]" in ahead and "5/0" in ahead and ahead.endswith("ahead |")
    noisy = next(x for x in lines if x.startswith("| lnsr_lam0_inject_at0 - vanilla"))
    assert "+0.00" in noisy and "2/2" in noisy and noisy.endswith("no measurable effect |")
    vs_control = next(x for x in lines if x.startswith("| lnsr_lam0.01_inject_at0_noiserelative - lnsr_lam0_"))
    assert "+2.00" in vs_control
    assert (tmp_path / "plots" / "final_mrpc1k.png").is_file()
    assert "Interim" not in text
    # exploratory stability (the arm's last row): lnsr = vanilla + 0.02 has vanilla's spread exactly
    # (ratio 1; no test: a - b is constant); vs the control the ratio is the two stds' quotient
    stab = [x for x in lines if x.startswith("| lnsr_lam0.01_inject_at0_noiserelative | ")][-1]
    sd = lambda v: np.std(v, ddof=1)  # noqa: E731
    ratio = sd(arms["lnsr_lam0.01_inject_at0_noiserelative"]) / sd(arms["lnsr_lam0_inject_at0"])
    assert stab.startswith(f"| lnsr_lam0.01_inject_at0_noiserelative | 1.00 | - | {ratio:.2f} | ")

    # one run fewer: the table is interim, with no reading
    os.remove(runs / "final" / "mrpc1k" / "mrpc" / "vanilla" / "seed5.json")
    text = study.final_section(str(runs), "mrpc1k", str(tmp_path / "plots"))
    assert "**Interim: 14 of 15 runs finished**" in text and "at the last epoch, seeds 1-5:" in text
    ahead = next(x for x in text.splitlines() if x.startswith("| lnsr_lam0.01_inject_at0_noiserelative - vanilla"))
    assert "4/0" in ahead and ahead.endswith("interim (4 seeds) |")
    for arm in arms:  # seed 1 alone: "seed 1", not "seeds 1-1"
        for seed in range(2, 6):
            path = runs / "final" / "mrpc1k" / "mrpc" / arm / f"seed{seed}.json"
            if path.exists():
                os.remove(path)
    assert "at the last epoch, seed 1:" in study.final_section(str(runs), "mrpc1k", str(tmp_path / "plots"))

    results = tmp_path / "results.md"
    results.write_text("# head\n<!-- study:begin -->\nold\n<!-- study:end -->\n# tail\n")
    study.summary(str(runs), str(results), str(tmp_path / "plots"))
    out = results.read_text()
    assert out.startswith("# head\n<!-- study:begin -->") and out.endswith("<!-- study:end -->\n# tail\n")
    assert "old" not in out and "**3. Final (GLUE dev).**" in out and "SST-2, 1000 training sentences" in out
    assert "Not run yet." in out  # the regimes without runs say so
    results.write_text("no markers\n")
    with pytest.raises(SystemExit, match="no <!-- study:begin -->"):
        study.summary(str(runs), str(results), str(tmp_path / "plots"))


def test_degenerate_runs_are_split_into_collapsed_and_at_chance(study, tmp_path):
    runs = tmp_path / "runs"
    for seed, (acc, predicted) in enumerate([(0.60, (0, 100)), (0.605, (45, 55)), (0.59, (50, 50)), (0.75, (40, 60))], 1):
        _run(str(runs / "final" / "rte1k" / "rte" / "vanilla" / f"seed{seed}.json"), seed, acc, predicted=predicted,
             labels=(40, 60))
    text = study.final_section(str(runs), "rte1k", str(tmp_path / "plots"))
    assert "| vanilla | 4 |" in text and "| 3 | 60.0, 60.5, 59.0, 75.0 |" in text
    assert "Of the 3 degenerate runs, 1 predicted a single class on dev; the other 2 predicted both classes" in text
    os.remove(runs / "final" / "rte1k" / "rte" / "vanilla" / "seed1.json")
    os.remove(runs / "final" / "rte1k" / "rte" / "vanilla" / "seed2.json")
    os.remove(runs / "final" / "rte1k" / "rte" / "vanilla" / "seed3.json")
    assert "degenerate runs, " not in study.final_section(str(runs), "rte1k", str(tmp_path / "plots"))


def test_pooled_section_pairs_each_seed_of_each_complete_regime_by_role(study, tmp_path, monkeypatch):
    monkeypatch.setattr(study, "FINAL_ARMS", 3)
    monkeypatch.setattr(study, "FINAL_SEEDS", 3)
    runs = tmp_path / "runs"
    # two regimes, each with its own chosen strength (different labels, the same role)
    grid = {"mrpc1k": ("mrpc", "lnsr_lam0.003_inject_at0_noiserelative", [0.01, 0.02, 0.03]),
            "sst2-1k": ("sst2", "lnsr_lam0.01_inject_at3_noiserelative", [-0.01, 0.0, 0.04])}
    for regime, (task, lnsr, diffs) in grid.items():
        for seed, d in enumerate(diffs, 1):
            base = 0.70 + 0.01 * seed
            for arm, acc in (("vanilla", base), ("lnsr_lam0_inject_at0", base), (lnsr, base + d)):
                collapsed = (regime, arm, seed) == ("mrpc1k", "vanilla", 1)
                _run(str(runs / "final" / regime / task / arm / f"seed{seed}.json"), seed, acc, labels=(50, 50),
                     predicted=(0, 100) if collapsed else (40, 60))
    assert study.role("lnsr_lam0.003_inject_at0_noiserelative_noisy_fraction0.25") == "LNSR, noisy_fraction 0.25"
    text = study.pooled_section(str(runs))
    row = next(x for x in text.splitlines() if x.startswith("| LNSR - vanilla |"))
    from lnsr.finetune.stats import compare
    d = [0.01, 0.02, 0.03, -0.01, 0.0, 0.04]
    c = compare(dict(enumerate(d)), dict.fromkeys(range(6), 0.0))
    assert "| 6 | mrpc1k +2.00, sst2-1k +1.00 |" in row and f"| {100 * c['mean']:+.2f} [" in row
    assert f"| {c['p_t']:.3f} | {c['p_wilcoxon']:.3f} | 4/1 |" in row
    assert "| control - vanilla | 6 |" in text and "vanilla 1 of 6; control 0 of 6; LNSR 0 of 6." in text
    assert "pooled.png" not in text  # no plot folder given, no plot
    assert "![per-regime and pooled paired differences]" in study.pooled_section(str(runs), str(tmp_path / "p"))
    assert (tmp_path / "p" / "pooled.png").stat().st_size > 0
    # a regime whose final is not complete is left out; with fewer than two complete, no section
    os.remove(runs / "final" / "sst2-1k" / "sst2" / "vanilla" / "seed3.json")
    assert study.pooled_section(str(runs)) is None


def test_a_comparison_on_one_seed_prints_no_test(study):
    # one seed: a difference, but no interval and no t-test (nan would look like a result)
    from lnsr.finetune.stats import compare

    row = study.fmt_cmp(compare({6: 0.8246}, {6: 0.8200}), interim=True)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "+0.46 -" and cells[1] == "-" and "nan" not in row
    assert cells[-1] == "interim (1 seed)"
    two = study.fmt_cmp(compare({6: 0.83, 7: 0.82}, {6: 0.82, 7: 0.82}), interim=True)
    assert "nan" not in two and two.strip().endswith("interim (2 seeds) |")


def test_profile_section_reads_the_last_block_per_injection(study, tmp_path):
    prof = tmp_path / "runs" / "profile" / "mrpc1k"
    prof.mkdir(parents=True)
    lines = ["model,inject_at,layer,rel_change,n_tokens,sigma,noise"]
    for m, base in (("vanilla", 0.02), ("lnsr", 0.01)):
        for k in (0, 1):
            for layer in (-1, 0, 1):
                lines.append(f"{m},{k},{layer},{base + 0.001 * k + 0.1 * (layer != 1)},100,0.05,relative")
    (prof / "profile.csv").write_text("\n".join(lines) + "\n")
    text = study.profile_section(str(tmp_path / "runs"), "mrpc1k", str(tmp_path / "plots"))
    assert "| vanilla | 0.0200 | 0.0210 |" in text and "| lnsr | 0.0100 | 0.0110 |" in text
    assert study.profile_section(str(tmp_path / "runs"), "rte1k", str(tmp_path / "plots")) is None


def test_progress_counts_finished_runs_per_stage(study, tmp_path):
    runs = tmp_path / "runs"
    _recipe(runs, skip=("5e-5", 3, 2))
    for seed in (1, 2):
        _run(str(runs / "final" / "mrpc1k" / "mrpc" / "vanilla" / f"seed{seed}.json"), seed, 0.7)
    p = study.progress(str(runs), "mrpc1k")
    assert (p["recipe"]["done"], p["recipe"]["total"]) == (17, 18)
    assert (p["strength"]["done"], p["final"]["done"], p["final"]["total"]) == (0, 2, 60)
    line = study.progress_line(str(runs), "mrpc1k")
    assert line.startswith("*Runs finished:* recipe 17/18; strength 0/27; final 2/60; profile not yet")
    assert "*Machines:* recipe 17 on CPU A; final 2 on CPU A." in line
    assert study.main(["--runs", str(runs), "progress", "mrpc1k"]) == 0
    # stage-done (the driver's test before walking a stage again): only a complete stage is done
    assert study.main(["--runs", str(runs), "stage-done", "mrpc1k", "recipe"]) == 1
    _run(str(runs / "recipe" / "mrpc1k" / "lr5e-5_ep3" / "mrpc" / "vanilla" / "seed2.json"), 2, 0.7)
    assert study.main(["--runs", str(runs), "stage-done", "mrpc1k", "recipe"]) == 0
    assert study.main(["--runs", str(runs), "stage-done", "mrpc1k", "final"]) == 1
    with pytest.raises(SystemExit):
        study.main(["--runs", str(runs), "stage-done", "mrpc1k"])


def test_remaining_costs_each_stage_from_its_own_runs_else_scaled_from_other_regimes(study, tmp_path):
    runs = tmp_path / "runs"
    for seed in (1, 2):  # mrpc1k final: 2 of 60 runs, 600 s and 1200 s
        _run(str(runs / "final" / "mrpc1k" / "mrpc" / "vanilla" / f"seed{seed}.json"), seed, 0.7, wall=600.0 * seed)
    _run(str(runs / "final" / "rte" / "rte" / "vanilla" / "seed1.json"), 1, 0.6, wall=3600.0)  # rte: its own
    rows = {(r["regime"], r["stage"]): r for r in study.remaining(str(runs))}
    assert rows[("mrpc1k", "final")]["left"] == 58 and rows[("mrpc1k", "final")]["per_run_s"] == 900.0
    assert rows[("rte", "final")]["left"] == 29 and rows[("rte", "final")]["per_run_s"] == 3600.0  # 5 seeds x 6
    # sst2-1k final has no runs: the per-example time of the others, weighted by their runs
    # (mrpc1k 900 s / 1000 examples x 2 runs, rte 3600 s / 2490 examples x 1 run), times 1000 examples
    expect = (2 * 900.0 / 1000 + 3600.0 / 2490) / 3 * 1000
    assert rows[("sst2-1k", "final")]["per_run_s"] == pytest.approx(expect)
    assert rows[("sst2-1k", "final")]["run_hours"] == pytest.approx(60 * expect / 3600)
    assert rows[("rte1k", "recipe")]["run_hours"] is None  # no recipe run anywhere: unknown, not guessed
    text = study.remaining_text(str(runs), jobs=2)
    known = sum(r["run_hours"] for r in rows.values() if r["run_hours"] is not None)
    assert f"in all about {known:.1f} run-hours (stages of unknown cost left out)" in text
    assert f"about {known / 2:.1f} hours of wall time at 2 runs at once" in text
    assert study.main(["--runs", str(runs), "--jobs", "3", "remaining"]) == 0


def test_remaining_costs_runs_of_known_epochs_per_epoch(study, tmp_path):
    runs = tmp_path / "runs"
    # rte recipe: a 3-epoch and a 5-epoch run at the same 100 s per epoch (1992 examples)
    for ep, wall in ((3, 300.0), (5, 500.0)):
        _run(str(runs / "recipe" / "rte" / f"lr5e-5_ep{ep}" / "rte" / "vanilla" / "seed1.json"), 1, 0.6, epochs=ep,
             wall=wall)
    rows = {(r["regime"], r["stage"]): r for r in study.remaining(str(runs))}
    rte = rows[("rte", "recipe")]
    # 2 lrs x 3 seeds x (3 + 5 + 10) epochs = 108, 8 of them run: 100 epochs at 100 s
    assert rte["left"] == 16 and rte["run_hours"] == pytest.approx(100 * 100.0 / 3600)
    assert rte["basis"] == "its own runs, per epoch"
    # rte1k has none: the same rate per example-epoch, at 800 examples
    assert rows[("rte1k", "recipe")]["run_hours"] == pytest.approx(108 * 100.0 * 800 / 1992 / 3600)
    # once a regime's recipe is chosen (1e-4 x 5 epochs here), its final runs are costed at 5 epochs
    _recipe(runs, regime="rte1k", task="rte")
    _run(str(runs / "final" / "rte1k" / "rte" / "vanilla" / "seed1.json"), 1, 0.6, epochs=10, wall=1000.0)
    final = next(r for r in study.remaining(str(runs)) if (r["regime"], r["stage"]) == ("rte1k", "final"))
    assert final["per_run_s"] == pytest.approx(1000.0 / 10 * 5) and final["left"] == 59


def test_remaining_costs_a_final_per_arm_from_the_other_finals_cost_factors(study, tmp_path):
    runs = tmp_path / "runs"
    _recipe(runs, regime="rte", task="rte")  # chosen: 5 epochs
    # mrpc1k's final: the control costs 1.5x vanilla, R3F 2x (1 epoch, 1000 examples)
    for arm, wall in (("vanilla", 100.0), ("lnsr_lam0_inject_at0", 150.0), ("r3f", 200.0)):
        _run(str(runs / "final" / "mrpc1k" / "mrpc" / arm / "seed1.json"), 1, 0.7, wall=wall)
    assert study.arm_cost_factors(str(runs)) == pytest.approx({"vanilla": 1.0, "control": 1.5, "r3f": 2.0})
    # rte: one vanilla run (5 epochs x 2490 examples, 1000 s): 29 left, but the factors of lnsr, cheap and
    # mixout are unknown, so the stage's own mean stands
    _run(str(runs / "final" / "rte" / "rte" / "vanilla" / "seed1.json"), 1, 0.6, epochs=5, wall=1000.0)
    rte = next(r for r in study.remaining(str(runs)) if (r["regime"], r["stage"]) == ("rte", "final"))
    assert rte["basis"] == "its own runs, per epoch" and rte["per_run_s"] == pytest.approx(1000.0)
    for arm in ("lnsr_lam0.003_inject_at0", "lnsr_lam0.003_inject_at0_noisy_fraction0.25", "mixout"):
        _run(str(runs / "final" / "mrpc1k" / "mrpc" / arm / "seed1.json"), 1, 0.7, wall=100.0)
    # and a control run of rte at 1.5x: its vanilla-equivalent rate is unchanged
    _run(str(runs / "final" / "rte" / "rte" / "lnsr_lam0_inject_at0" / "seed1.json"), 1, 0.6, epochs=5, wall=1500.0)
    assert study.final_left_by_kind(str(runs), "rte") == {k: 4 for k in ("vanilla", "control")} | {
        k: 5 for k in ("lnsr", "cheap", "r3f", "mixout")}
    rte = next(r for r in study.remaining(str(runs)) if (r["regime"], r["stage"]) == ("rte", "final"))
    # left: 4 vanilla (1x), 4 control (1.5x), 5 r3f (2x), 5 each of lnsr, cheap, mixout (1x) at 1000 s per 1x
    assert rte["basis"] == "its own runs, per epoch and arm" and rte["left"] == 28
    assert rte["run_hours"] == pytest.approx((4 + 6 + 10 + 15) * 1000.0 / 3600)


def test_a_study_that_moves_between_machines_says_so(study, tmp_path):
    runs = tmp_path / "runs"
    for seed in (1, 2):
        for arm in ("vanilla", "lnsr_lam0_inject_at0"):
            dev = "CPU B" if (seed, arm) == (2, "lnsr_lam0_inject_at0") else "CPU A"
            _run(str(runs / "final" / "mrpc1k" / "mrpc" / arm / f"seed{seed}.json"), seed, 0.7, device=dev)
    assert "*Machines:* final 3 on CPU A, 1 on CPU B." in study.progress_line(str(runs), "mrpc1k")
    sec = study.final_section(str(runs), "mrpc1k", str(tmp_path / "plots"))
    assert "Seeds whose arms ran on more than one machine" in sec and "machine (kept, and paired" in sec
    assert sec.split("more than one machine")[1].split(":", 1)[1].split(".")[0].strip() == "2"


def test_a_final_in_two_precisions_is_also_compared_within_each(study, tmp_path):
    """The amendment of 2026-12-02: seeds 1-3 in bf16, 4-6 in fp32; the strata table holds each
    precision's own paired comparison, equal to stats.compare on those seeds alone."""
    from lnsr.finetune.stats import compare
    runs = tmp_path / "runs"
    rng = np.random.default_rng(3)
    scores = {arm: {s: float(rng.uniform(0.6, 0.8)) for s in range(1, 7)} for arm in ("vanilla", "lnsr_lam0_inject_at0")}
    for arm, per in scores.items():
        for seed, acc in per.items():
            _run(str(runs / "final" / "mrpc1k" / "mrpc" / arm / f"seed{seed}.json"), seed, acc,
                 precision="bf16" if seed <= 3 else "fp32")
    assert "*Precision:* final 6 bf16, 6 fp32." in study.progress_line(str(runs), "mrpc1k")
    sec = study.final_section(str(runs), "mrpc1k", str(tmp_path / "plots"))
    assert "more than one precision" not in sec
    rows = [ln for ln in sec.splitlines() if ln.startswith("| bf16 (1, 2, 3) ") or ln.startswith("| fp32 (4, 5, 6) ")]
    assert len(rows) == 2
    for row, seeds in zip(rows, ((1, 2, 3), (4, 5, 6))):
        c = compare({s: scores["lnsr_lam0_inject_at0"][s] for s in seeds}, {s: scores["vanilla"][s] for s in seeds})
        assert f"{100 * c['mean']:+.2f}" in row and f"{c['p_t']:.3f}" in row
    # one seed's arms in two precisions is named
    _run(str(runs / "final" / "mrpc1k" / "mrpc" / "vanilla" / "seed6.json"), 6, 0.7, precision="bf16")
    sec = study.final_section(str(runs), "mrpc1k", str(tmp_path / "plots"))
    assert sec.split("more than one precision")[1].split(":", 1)[1].split(".")[0].strip() == "6"
    assert "| fp32 (4, 5) " in sec
    # one precision only: no strata table
    for seed in (4, 5, 6):
        for arm in scores:
            _run(str(runs / "final" / "mrpc1k" / "mrpc" / arm / f"seed{seed}.json"), seed, 0.7, precision="bf16")
    assert "Sensitivity" not in study.final_section(str(runs), "mrpc1k", str(tmp_path / "plots"))


def test_study_sh_summary_only_rebuilds_the_tables_from_run_files(study, tmp_path):
    """`bench/study/study.sh --summary-only` (the issue's name; `summary` is the same): the tables come
    from the run files under OUT into RESULTS, nothing is trained."""
    import subprocess
    import sys
    runs = tmp_path / "runs"
    _recipe(str(runs))
    results = tmp_path / "results.md"
    results.write_text("<!-- study:begin -->\nold\n<!-- study:end -->\n")
    env = {**os.environ, "OUT": str(runs), "RESULTS": str(results), "PLOTS": str(tmp_path / "plots"),
           "PYTHON": sys.executable}
    script = os.path.join(HERE, "..", "bench", "study", "study.sh")
    out = subprocess.run(["bash", script, "--summary-only"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    text = results.read_text()
    assert "old" not in text and "**1. Recipe" in text and "| 1e-4 | 5 **chosen** |" in text
    bad = subprocess.run(["bash", script, "--summary"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "usage" in bad.stderr


def _final_commands(tmp_path, regime, task, **env_extra):
    """The final stage's `lnsr finetune` commands, printed by a stand-in for `lnsr` (nothing is trained)."""
    import subprocess
    import sys
    runs = tmp_path / "runs"
    _recipe(str(runs), regime=regime, task=task)
    best = runs / "strength" / regime / task / "best.json"
    best.parent.mkdir(parents=True)
    best.write_text(json.dumps({"best": {"label": "lnsr_lam0.01_inject_at3_noiserelative", "options": {"inject_at": 3}}}))
    fake = tmp_path / "lnsr"
    fake.write_text("#!/bin/bash\necho \"lnsr $*\"\n")
    fake.chmod(0o755)
    env = {**os.environ, "OUT": str(runs), "PYTHON": sys.executable, "LNSR": str(fake), "JOBS": "1",
           "MODELS": str(tmp_path / "models")}
    for k in ("SEEDS_FINAL_RTE", "PRECISION"):
        env.pop(k, None)
    env.update(env_extra)
    script = os.path.join(HERE, "..", "bench", "study", "study.sh")
    out = subprocess.run(["bash", script, "final", regime], env=env, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("lnsr finetune")]
    return out, lines, best


@pytest.mark.parametrize("regime,env_seeds,expect", [("rte1k", None, list(range(1, 11))), ("rte", None, [1, 2, 3, 4, 5]),
                                                     ("rte", "1 2 3 4 5 6 7 8 9 10", list(range(1, 11)))])
def test_study_sh_final_runs_the_registered_seeds_and_arms(study, tmp_path, regime, env_seeds, expect):
    """6 arms per seed, seeds in order, 10 seeds, 5 for RTE full (the protocol's allowance) unless
    SEEDS_FINAL_RTE says more."""
    out, lines, best = _final_commands(tmp_path, regime, "rte", **({"SEEDS_FINAL_RTE": env_seeds} if env_seeds else {}))
    assert out.returncode == 0, out.stderr
    seeds = [int(ln.split("--seeds ")[1].split()[0]) for ln in lines]
    assert seeds == [s for s in expect for _ in range(6)]
    arms = [ln.split("--method ")[1].split()[0] for ln in lines[:6]]
    assert arms == ["vanilla", "lnsr:lam=0,inject_at=3", f"lnsr:@{best}", f"lnsr:@{best},noisy_fraction=0.25", "r3f", "mixout"]
    assert all("--lr 1e-4 --epochs 5" in ln for ln in lines)  # the recipe the search chose
    assert study.stage_runs(regime, "final") == 6 * (5 if regime == "rte" else 10)


@pytest.mark.parametrize("regime,task,env,bf16_seeds", [
    ("sst2-1k", "sst2", {}, [1, 2, 3, 4, 5]),     # the amendment: seeds 1-5 began in bf16, 6-10 fp32
    ("mrpc1k", "mrpc", {}, list(range(1, 11))),   # finished in bf16 before it (so its runs are found finished)
    ("rte1k", "rte", {}, []),                     # every later run fp32
    ("rte1k", "rte", {"PRECISION": "bf16"}, list(range(1, 11))),  # one precision for a whole replica (GPU)
    ("sst2-1k", "sst2", {"PRECISION": "fp32"}, [])])
def test_study_sh_precision_is_one_per_seed_as_amended(study, tmp_path, regime, task, env, bf16_seeds):
    out, lines, _ = _final_commands(tmp_path, regime, task, **env)
    assert out.returncode == 0, out.stderr
    seeds = sorted({int(ln.split("--seeds ")[1].split()[0]) for ln in lines if "--bf16" in ln})
    assert seeds == bf16_seeds
    for s in range(1, 11):  # every arm of a seed in the same precision: pairs share it
        assert len({"--bf16" in ln for ln in lines if f"--seeds {s} " in ln}) == 1


def test_study_sh_rejects_an_unknown_precision_and_runs_nothing(tmp_path):
    out, lines, _ = _final_commands(tmp_path, "rte1k", "rte", PRECISION="fp16")
    assert out.returncode == 2 and "PRECISION must be bf16 or fp32" in out.stderr and lines == []


def test_strength_section_is_tune_md_plus_the_exploratory_recommendation(study, tmp_path):
    runs = tmp_path / "runs"
    d = runs / "strength" / "sst2-1k" / "sst2"
    d.mkdir(parents=True)
    assert study.strength_table(str(runs), "sst2-1k") is None
    # a tune.md as the frozen code writes it, and one from today's code (its recommendation is dropped:
    # the section recomputes it from best.json so both read alike)
    table = "| rank | arm |\n|---|---|\n| 1 | lnsr_lam0.01 |\n\nbest LNSR arm: lnsr_lam0.01"
    for extra in ("", "\n\nrecommendation: use — stale"):
        (d / "tune.md").write_text("### lnsr tune: accuracy\n" + table + extra + "\n")
        assert study.strength_table(str(runs), "sst2-1k") == table + "\n"
    ranking = [{"label": "lnsr_lam0.01", "per_seed": {"1": 0.80, "2": 0.81, "3": 0.82}, "control": "lnsr_lam0"},
               {"label": "lnsr_lam0", "per_seed": {"1": 0.70, "2": 0.71, "3": 0.72}},
               {"label": "vanilla", "per_seed": {"1": 0.69, "2": 0.70, "3": 0.72}}]
    (d / "best.json").write_text(json.dumps({"best": {"label": "lnsr_lam0.01"}, "ranking": ranking}))
    text = study.strength_table(str(runs), "sst2-1k")
    assert text.startswith(table) and "*Exploratory (added 2026-12-02" in text
    assert "**use** — ahead of its control and of vanilla" in text and "+10.00 [+10.00, +10.00]" in text


def test_summary_rewrites_each_run_directory_summary_from_all_its_runs(study, tmp_path):
    """The driver runs `lnsr finetune` once per run, which leaves a one-run summary.md behind; the
    study's summary rewrites it from every run file in the directory, arms in the tables' order."""
    runs = tmp_path / "runs"
    task_dir = runs / "final" / "mrpc1k" / "mrpc"
    for arm, base in (("lnsr_lam0_inject_at0", 0.70), ("vanilla", 0.60)):
        for seed in (2, 1):
            _run(str(task_dir / arm / f"seed{seed}.json"), seed, base + 0.01 * seed, wall=100.0 * seed)
    (task_dir / "summary.md").write_text("| vanilla | accuracy | 1 | stale |\n")
    recipe_dir = runs / "recipe" / "mrpc1k" / "lr1e-4_ep3" / "mrpc"
    _run(str(recipe_dir / "vanilla" / "seed1.json"), 1, 0.5)  # no wall time recorded: "-"
    assert study.run_dir_summaries(str(runs)) == sorted([str(task_dir), str(recipe_dir)])
    text = (task_dir / "summary.md").read_text()
    assert "stale" not in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| vanilla") or ln.startswith("| lnsr")]
    assert rows[0].startswith("| vanilla | accuracy | 2 | 61.50 |") and "s1:61.00, s2:62.00 | 150 |" in rows[0]
    assert rows[2].startswith("| lnsr_lam0_inject_at0 | accuracy | 2 | 71.50 |")
    assert "| vanilla | accuracy | 1 | 50.00 |" in (recipe_dir / "summary.md").read_text()
    assert "| - | - |" in (recipe_dir / "summary.md").read_text()


# What lnsr.finetune's modules define at the study's frozen commit (bench/study/study_frozen.sh,
# STUDY_COMMIT a7c2d42), whose code runs the study's driver with this checkout's study.py.
FROZEN_NAMES = {
    "report": {"summarize", "metric_names_of", "stats", "markdown_table", "plot", "write_summary"},
    "stats": {"_betacf", "betainc", "t_cdf", "t_ppf", "paired_t", "mean_ci", "wilcoxon_exact", "sign_test",
              "compare"},
    "tune": {"DEFAULT_GRID", "parse_grid", "grid_specs", "paired", "rank", "table", "add_tune_args", "tune_main"},
}


def test_frozen_names_match_the_study_commit():
    """FROZEN_NAMES is read off the frozen commit where git has it (a shallow clone may not)."""
    import ast
    import subprocess
    for mod, names in FROZEN_NAMES.items():
        try:
            src = subprocess.run(["git", "show", f"a7c2d42:lnsr/finetune/{mod}.py"], cwd=os.path.join(HERE, ".."),
                                 capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            pytest.skip("the frozen commit is not in this checkout's git history")
        body = ast.parse(src).body
        defined = {n.name for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        defined |= {t.id for n in body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        assert names <= defined, (mod, names - defined)


def test_driver_commands_run_on_the_frozen_study_code(study, tmp_path, monkeypatch):
    """The driver (bench/study/study_frozen.sh) calls task-of, stage-done, recipe-choice and recipe-table
    with the frozen commit's lnsr on the path: none may need a function added since (stage-done once
    did, through progress's run_seconds, and the driver then walked every finished stage again)."""
    import importlib
    for mod, names in FROZEN_NAMES.items():
        m = importlib.import_module(f"lnsr.finetune.{mod}")
        for name in [n for n, v in vars(m).items() if callable(v) and getattr(v, "__module__", None) == m.__name__]:
            if name not in names:
                monkeypatch.delattr(m, name)
    runs = tmp_path / "runs"
    _recipe(runs)
    assert study.main(["--runs", str(runs), "task-of", "mrpc1k"]) == 0
    assert study.main(["--runs", str(runs), "stage-done", "mrpc1k", "recipe"]) == 0
    assert study.main(["--runs", str(runs), "stage-done", "mrpc1k", "final"]) == 1
    assert study.main(["--runs", str(runs), "recipe-choice", "mrpc1k"]) == 0
    assert study.main(["--runs", str(runs), "recipe-table", "mrpc1k"]) == 0
    # the check has teeth: the newer progress (the status command's, not the driver's) needs run_seconds
    with pytest.raises(ImportError):
        study.progress(str(runs), "mrpc1k")
