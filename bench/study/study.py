"""Tables, choices and statistics of the study in docs/results.md, from its run files alone.

    python bench/study/study.py --runs docs/runs/study recipe-choice mrpc1k   # "--lr X --epochs Y"
    python bench/study/study.py --runs docs/runs/study recipe-table mrpc1k
    python bench/study/study.py --runs docs/runs/study remaining               # runs left, rough cost
    python bench/study/study.py --runs docs/runs/study stage-done rte recipe   # exit 0 when all its runs finished
    python bench/study/study.py --runs docs/runs/study summary                 # every table and plot

``summary`` rewrites the block between ``<!-- study:begin -->`` and ``<!-- study:end -->`` of
docs/results.md and writes the per-seed plots to docs/study/. It trains nothing and reads nothing but
the run JSON files, so anyone can check the tables against them.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from collections import Counter

import numpy as np

from lnsr.finetune.report import plot
from lnsr.finetune.stats import compare

REGIMES = {"mrpc1k": ("mrpc", "MRPC, 1000 training pairs"), "sst2-1k": ("sst2", "SST-2, 1000 training sentences"),
           "rte1k": ("rte", "RTE, 1000 training pairs"), "rte": ("rte", "RTE, full training set (2490 pairs)")}
METRIC = "accuracy"          # the main metric of every regime (pre-registered)
LRS, EPOCHS = ("5e-5", "1e-4"), (3, 5, 10)
SEARCH_SEEDS = 3             # seeds per recipe and per strength in the held-out searches
FINAL_ARMS, FINAL_SEEDS = 6, 10   # registered: 6 arms x 10 seeds per regime (until then a table is interim)
# the protocol's allowance "RTE full: 5 seeds if the CPU time is short, said so", taken 2026-12-02 before any
# rte run (docs/results.md); bench/study/study.sh runs these seeds (SEEDS_FINAL_RTE to run more)
FINAL_SEEDS_OF = {"rte": 5}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def final_seeds(regime: str) -> int:
    return FINAL_SEEDS_OF.get(regime, FINAL_SEEDS)


def load_runs(pattern: str) -> list[dict]:
    runs = []
    for path in sorted(glob.glob(pattern)):
        with open(path) as f:
            r = json.load(f)
        r["_path"] = path
        runs.append(r)
    return runs


# -- 1. recipe ------------------------------------------------------------------------------------
def recipe_rows(runs_dir: str, regime: str) -> list[dict]:
    task = REGIMES[regime][0]
    rows = []
    for lr in LRS:
        for ep in EPOCHS:
            runs = load_runs(os.path.join(runs_dir, "recipe", regime, f"lr{lr}_ep{ep}", task, "vanilla", "seed*.json"))
            scores = {r["config"]["seed"]: r["final"][METRIC] for r in runs}
            curve = {r["config"]["seed"]: [e["metrics"][METRIC] for e in r["epochs"]] for r in runs}
            v = np.array(list(scores.values()))
            rows.append({"lr": lr, "epochs": ep, "scores": scores, "curve": curve, "n": len(v),
                         "mean": float(v.mean()) if len(v) else float("nan"),
                         "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                         "train_loss": float(np.mean([r["epochs"][-1]["task_loss"] for r in runs])) if runs else None})
    return rows


def search_complete(rows: list[dict]) -> bool:
    return all(r["n"] >= SEARCH_SEEDS for r in rows)


def best_recipe(rows: list[dict]) -> dict:
    """Highest mean held-out accuracy over the seeds run so far; ties: fewer epochs, then the lower lr."""
    done = [r for r in rows if r["n"]]
    return max(done, key=lambda r: (round(r["mean"], 10), -r["epochs"], -float(r["lr"])))


def recipe_choice(runs_dir: str, regime: str, need_complete: bool = True) -> dict:
    """The chosen recipe (``best_recipe``); by default only once every recipe has all its seeds."""
    rows = recipe_rows(runs_dir, regime)
    if need_complete and not search_complete(rows):
        missing = [f"lr {r['lr']} x {r['epochs']} epochs ({r['n']}/{SEARCH_SEEDS} seeds)"
                   for r in rows if r["n"] < SEARCH_SEEDS]
        raise SystemExit(f"recipe search of {regime} is not finished: {', '.join(missing)}")
    return best_recipe(rows)


def recipe_table(runs_dir: str, regime: str) -> str:
    rows = recipe_rows(runs_dir, regime)
    complete = search_complete(rows)
    best = best_recipe(rows) if any(r["n"] for r in rows) else None
    total = stage_runs(regime, "recipe")
    state = "complete" if complete else f"incomplete: {sum(r['n'] for r in rows)}/{total} runs"
    out = [f"Vanilla on the held-out 20% of {REGIMES[regime][1].split(',')[0]} train, {METRIC} x100 at the last "
           f"epoch ({state}):", "",
           "| lr | epochs | n | mean | std | per seed | held-out accuracy per epoch (mean over seeds) | "
           "train loss, last epoch |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per = ", ".join(f"s{s}:{100 * v:.2f}" for s, v in sorted(r["scores"].items()))
        curves = [c for c in r["curve"].values() if len(c) == r["epochs"]]
        curve = " ".join(f"{100 * v:.1f}" for v in np.mean(curves, axis=0)) if curves else "-"
        mark = " **chosen**" if complete and (best["lr"], best["epochs"]) == (r["lr"], r["epochs"]) else ""
        mean = f"{100 * r['mean']:.2f}" if r["n"] else "-"
        loss = f"{r['train_loss']:.3f}" if r["train_loss"] is not None else "-"
        out.append(f"| {r['lr']} | {r['epochs']}{mark} | {r['n']} | {mean} | {100 * r['std']:.2f} | {per} | {curve} | "
                   f"{loss} |")
    if best and not complete:
        out.append(f"\n(leading so far: lr {best['lr']}, {best['epochs']} epochs; not a choice until all {total} runs "
                   f"are in)")
    return "\n".join(out) + "\n"


# -- 2. strength --------------------------------------------------------------------------------------
def strength_table(runs_dir: str, regime: str) -> str | None:
    task = REGIMES[regime][0]
    path = os.path.join(runs_dir, "strength", regime, task, "tune.md")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    # tune.md of the frozen code has no recommendation: the registered choice was the highest mean
    text = re.sub(r"^### .*\n", "", text).strip().split("\n\nrecommendation:")[0] + "\n"
    best_json = os.path.join(runs_dir, "strength", regime, task, "best.json")
    if os.path.isfile(best_json):
        # imported here: the frozen copy that drives the runs imports this file too and lacks it
        from lnsr.finetune.tune import recommend

        with open(best_json) as f:
            rec = json.load(f)
        rows = rec.get("ranking") or []
        best = next((r for r in rows if rec.get("best") and r["label"] == rec["best"]["label"]), None)
        advice = recommend(rows, best)
        if advice:
            text += ("\n*Exploratory (added 2026-12-02, after registration; not used for any choice):* what "
                     "today's `lnsr tune` would recommend from these runs — " + advice["text"].replace(
                         "recommendation: ", "**", 1).replace(" — ", "** — ", 1) + "\n")
    return text


# -- 3. final -----------------------------------------------------------------------------------------
def degenerate(run: dict) -> bool:
    """Dev predictions all one class, or accuracy at (within 1 point of) the majority-class rate."""
    labels = run.get("evaluation_label_counts")
    if one_class(run):
        return True
    if labels:
        return run["final"][METRIC] <= max(labels) / sum(labels) + 0.01
    return False


def one_class(run: dict) -> bool:
    counts = run["epochs"][-1].get("predicted_per_class")
    return counts is not None and sum(1 for c in counts if c) <= 1


def degenerate_kinds(arms: dict) -> list:
    """The registered count split into its two kinds: a collapsed model (one class predicted) and one
    that predicts both classes at about chance (where a task is barely learnt, the second is common)."""
    runs = [r for a in arms.values() for r in a if degenerate(r)]
    if not runs:
        return []
    k = sum(one_class(r) for r in runs)
    return ["", f"Of the {len(runs)} degenerate runs, {k} predicted a single class on dev; the other "
            f"{len(runs) - k} predicted both classes, at an accuracy within 1 point of the majority-class rate "
            "(or below)."]


def final_arms(runs_dir: str, regime: str) -> dict:
    task = REGIMES[regime][0]
    arms = {}
    for path in sorted(glob.glob(os.path.join(runs_dir, "final", regime, task, "*", "seed*.json"))):
        label = os.path.basename(os.path.dirname(path))
        with open(path) as f:
            r = json.load(f)
        arms.setdefault(label, []).append(r)
    return arms


def arm_kind(label: str) -> str:
    """The final's six arms by what they cost: vanilla, control, lnsr, cheap (noisy_fraction), r3f, mixout."""
    if label == "vanilla":
        return "vanilla"
    if label.startswith("lnsr_lam0_") or label == "lnsr_lam0":
        return "control"
    if label.startswith("lnsr"):
        return "cheap" if "noisy_fraction" in label else "lnsr"
    return label.split("_")[0]


def run_label(r: dict) -> str:
    """A run record's arm label (its folder's name in older records)."""
    return r["config"].get("label") or os.path.basename(os.path.dirname(r["_path"]))


def arm_order(labels) -> list:
    rank = {"vanilla": 0, "control": 1, "lnsr": 2, "cheap": 3}  # then the baselines, by label
    return sorted(labels, key=lambda label: (rank.get(arm_kind(label), 4), label))


def fmt_cmp(c: dict, interim: bool = False) -> str:
    if not c.get("n"):
        return "| - | - | - | - | - |"
    # imported here: the frozen copy that drives the runs imports this file too and lacks it
    from lnsr.finetune.stats import ci_text, p_text, reading as read

    ci = ci_text(c) or "-"
    reading = read(c)
    if interim:  # the registered reading is made on all seeds, not on the first few
        reading = f"interim ({c['n']} seed{'s' if c['n'] != 1 else ''})"
    return (f"| {100 * c['mean']:+.2f} {ci} | {p_text(c['p_t'])} | {p_text(c['p_wilcoxon'])} | "
            f"{c['ahead']}/{c['behind']} | {reading} |")


def final_section(runs_dir: str, regime: str, plot_dir: str) -> str | None:
    arms = final_arms(runs_dir, regime)
    if not arms:
        return None
    labels = arm_order(arms)
    scores = {a: {r["config"]["seed"]: r["final"][METRIC] for r in arms[a]} for a in labels}
    control = next((a for a in labels if a.startswith("lnsr_lam0")), None)
    n_runs = sum(len(s) for s in scores.values())
    n_seeds = final_seeds(regime)
    interim = n_runs < FINAL_ARMS * n_seeds
    head = (f"**Interim: {n_runs} of {FINAL_ARMS * n_seeds} runs finished** (seeds run in order, every arm of a "
            f"seed before the next seed); no reading is made before all {n_seeds} seeds are in. ") if interim else ""
    lo, hi = min(min(s) for s in scores.values()), max(max(s) for s in scores.values())
    out = [f"{head}Dev {METRIC} x100 at the last epoch, " + (f"seed {lo}:" if lo == hi else f"seeds {lo}-{hi}:"), "",
           "| arm | n | mean | std | min | max | degenerate runs | per seed |", "|---|---|---|---|---|---|---|---|"]
    for a in labels:
        v = np.array([scores[a][s] for s in sorted(scores[a])])
        per = ", ".join(f"{100 * scores[a][s]:.1f}" for s in sorted(scores[a]))
        deg = sum(degenerate(r) for r in arms[a])
        out.append(f"| {a} | {len(v)} | {100 * v.mean():.2f} | {100 * (v.std(ddof=1) if len(v) > 1 else 0):.2f} | "
                   f"{100 * v.min():.2f} | {100 * v.max():.2f} | {deg} | {per} |")
    out += degenerate_kinds(arms)
    devices = per_seed(arms, lambda r: r.get("device", "unknown machine"))
    mixed = sorted(s for s, d in devices.items() if len(d) > 1)
    if mixed:  # pairs still share seed, head and data order, but not the machine's bf16 rounding
        out += ["", "Seeds whose arms ran on more than one machine (kept, and paired like the others; see "
                "*Machines* above): " + ", ".join(map(str, mixed)) + "."]
    precisions = per_seed(arms, precision_of)
    mixed = sorted(s for s, p in precisions.items() if len(p) > 1)
    if mixed:  # the amendment runs every arm of a seed in one precision; say so if a seed breaks that
        out += ["", "Seeds whose arms ran in more than one precision (against the amendment; paired like the "
                "others): " + ", ".join(map(str, mixed)) + "."]
    out += ["", "Paired by seed (same head initialisation, data order and subset); difference x100 with its 95% "
            "t-interval, paired t-test p, exact Wilcoxon signed-rank p, seeds ahead/behind:", "",
            "| comparison | mean diff [95% CI] | paired t p | Wilcoxon p | ahead/behind | reading |",
            "|---|---|---|---|---|---|"]
    out += comparison_rows(scores, labels, control, interim)
    # exploratory (not registered): the papers' stability claim as a test of variances, paired by seed
    from lnsr.finetune.stats import p_text  # here, as in fmt_cmp: the frozen copy lacks it
    out += ["", "Stability across seeds (*exploratory*: not in the registered protocol, which reads stability from "
            "std and degenerate runs): each arm's std over the other's on their common seeds, and the Pitman-Morgan "
            "test of equal paired variances" + (" (interim)" if interim else "") + ":", "",
            "| arm | std / vanilla's | p | std / control's | p |", "|---|---|---|---|---|"]
    for a in labels:
        if a == "vanilla":
            continue
        cells = []
        for ref in ("vanilla", control):
            c = compare(scores[a], scores[ref]) if ref in scores and ref != a else {}
            ok = c.get("n", 0) >= 3 and np.isfinite(c.get("sd_ratio", np.nan))
            cells += [f"{c['sd_ratio']:.2f}", p_text(c["p_var"])] if ok \
                else ["-", "-"]
        out.append(f"| {a} | " + " | ".join(cells) + " |")
    out += strata_section(scores, labels, control, precisions, interim)
    summary = {a: {"seeds": sorted(scores[a]), "metrics": {METRIC: [scores[a][s] for s in sorted(scores[a])]},
                   "wall": [], "ratio": []} for a in labels}
    os.makedirs(plot_dir, exist_ok=True)
    png = os.path.join(plot_dir, f"final_{regime}.png")
    plot(f"{REGIMES[regime][1]} (dev)", summary, [METRIC], png)
    out += ["", f"![per-seed dev accuracy, {regime}]({os.path.relpath(png, os.path.join(ROOT, 'docs'))})"]
    return "\n".join(out) + "\n"


def comparison_rows(scores: dict, labels: list, control: str | None, interim: bool, lead: str = "") -> list:
    """The registered comparisons as table rows: each arm against vanilla, and against the control."""
    rows = []
    for a in labels:
        if a == "vanilla":
            continue
        if "vanilla" in scores:
            rows.append(f"{lead}| {a} - vanilla " + fmt_cmp(compare(scores[a], scores["vanilla"]), interim))
        if control and a != control:
            rows.append(f"{lead}| {a} - {control} " + fmt_cmp(compare(scores[a], scores[control]), interim))
    return rows


def per_seed(arms: dict, what) -> dict:
    """seed -> the set of ``what(run)`` over that seed's runs in every arm (a machine, a precision)."""
    out = {}
    for runs in arms.values():
        for r in runs:
            out.setdefault(r["config"]["seed"], set()).add(what(r))
    return out


def precision_of(run: dict) -> str:
    return run["config"].get("precision", "unknown")


def strata_section(scores: dict, labels: list, control: str | None, precisions: dict, interim: bool) -> list:
    """The amendment's sensitivity analysis: when a final's seeds ran in more than one precision, the
    paired comparisons again within each precision's seeds (the reading stays the one on all seeds)."""
    strata = {}
    for seed, ps in precisions.items():
        if len(ps) == 1:
            strata.setdefault(next(iter(ps)), []).append(seed)
    if len(strata) < 2:
        return []
    out = ["", "Sensitivity (amendment of 2026-12-02): the comparisons above within the seeds of each precision "
           "(the registered reading is the one on all seeds; a stratum reading otherwise is said in the text):", "",
           "| precision (seeds) | comparison | mean diff [95% CI] | paired t p | Wilcoxon p | ahead/behind | reading |",
           "|---|---|---|---|---|---|---|"]
    for p in sorted(strata):
        keep = set(strata[p])
        sub = {a: {s: v for s, v in scores[a].items() if s in keep} for a in labels}
        out += comparison_rows(sub, labels, control, interim, lead=f"| {p} ({', '.join(map(str, sorted(keep)))}) ")
    return out


# -- across regimes (exploratory) -------------------------------------------------------------------
ROLES = ("vanilla", "control", "LNSR", "LNSR, noisy_fraction 0.25", "Mixout", "R3F")
POOLED = (("LNSR", "vanilla"), ("LNSR", "control"), ("control", "vanilla"), ("LNSR, noisy_fraction 0.25", "control"),
          ("Mixout", "vanilla"), ("R3F", "vanilla"))


def role(label: str) -> str:
    """An arm's part in the protocol, whatever strength its regime's search chose."""
    if label.startswith("lnsr_lam0_") or label == "lnsr_lam0":
        return "control"
    if label.startswith("lnsr"):
        return "LNSR, noisy_fraction 0.25" if "noisy_fraction" in label else "LNSR"
    return {"mixout": "Mixout", "r3f": "R3F"}.get(label, label)


def forest_plot(rows: list, regimes: list, path: str) -> None:
    """One line per comparison: each regime's paired mean difference with its 95% interval, and the
    pooled one (black), x100, around a line at 0."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.9 + 0.75 * len(rows)))
    offsets = np.linspace(-0.25, 0.1, len(regimes)) if len(regimes) > 1 else np.zeros(1)
    for i, (name, per, pooled) in enumerate(rows):
        y = len(rows) - 1 - i
        for k, (regime, c) in enumerate(zip(regimes, per)):
            lo, hi = c["ci95"]
            ax.errorbar([100 * c["mean"]], [y + offsets[k]], xerr=[[100 * (c["mean"] - lo)], [100 * (hi - c["mean"])]],
                        fmt="o", ms=4, capsize=2, color=f"C{k}", label=regime if i == 0 else None)
        lo, hi = pooled["ci95"]
        ax.errorbar([100 * pooled["mean"]], [y + 0.3], xerr=[[100 * (pooled["mean"] - lo)], [100 * (hi - pooled["mean"])]],
                    fmt="D", ms=5, capsize=3, color="k", label="pooled" if i == 0 else None)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r[0] for r in reversed(rows)])
    ax.set_xlabel(f"paired difference in dev {METRIC} x100 (mean, 95% t-interval)")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Registered comparisons per regime and pooled (exploratory)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pooled_section(runs_dir: str, plot_dir: str | None = None) -> str | None:
    """Every registered comparison again over the pairs of all regimes whose final is complete, each
    pair being one seed of one regime (so LNSR at each regime's own chosen strength)."""
    done, scores, deg, n_runs = [], {}, Counter(), Counter()
    for regime in REGIMES:
        arms = final_arms(runs_dir, regime)
        if sum(len(v) for v in arms.values()) < FINAL_ARMS * final_seeds(regime):
            continue
        done.append(regime)
        for label, runs in arms.items():
            for r in runs:
                scores.setdefault(role(label), {})[(regime, r["config"]["seed"])] = r["final"][METRIC]
                deg[role(label)] += degenerate(r)
                n_runs[role(label)] += 1
    if len(done) < 2:
        return None
    from lnsr.finetune.stats import ci_text, p_text, reading  # lazy, as in fmt_cmp

    out = [f"*Exploratory (added 2026-12-03, after each regime's registered reading above was made; not in the "
           f"protocol):* the registered comparisons over the {len(done)} regimes whose final is complete "
           f"({', '.join(done)}), each pair one seed of one regime, LNSR at each regime's own chosen strength. The "
           "pairs are pooled as one sample, although the regimes' spreads differ (SST-2's pairs vary least): a "
           "rough bound on an effect common to the regimes, not a test of any one of them.", "",
           "| comparison | pairs | mean diff per regime | pooled mean diff [95% CI] | paired t p | Wilcoxon p | "
           "ahead/behind | reading |", "|---|---|---|---|---|---|---|---|"]
    def of(arm, regime):  # one regime's pairs of an arm
        return {k: v for k, v in scores[arm].items() if k[0] == regime}

    rows = []
    for a, b in POOLED:
        if a not in scores or b not in scores:
            continue
        c = compare(scores[a], scores[b])
        each = [compare(of(a, r), of(b, r)) for r in done]
        rows.append((f"{a} - {b}", each, c))
        per = ", ".join(f"{r} {100 * e['mean']:+.2f}" for r, e in zip(done, each))
        out.append(f"| {a} - {b} | {c['n']} | {per} | {100 * c['mean']:+.2f} {ci_text(c) or '-'} | {p_text(c['p_t'])} | "
                   f"{p_text(c['p_wilcoxon'])} | {c['ahead']}/{c['behind']} | {reading(c)} |")
    out += ["", "Degenerate runs per arm over these regimes: " + "; ".join(
        f"{r} {deg[r]} of {n_runs[r]}" for r in ROLES if n_runs[r]) + "."]
    if plot_dir and rows:
        os.makedirs(plot_dir, exist_ok=True)
        png = os.path.join(plot_dir, "pooled.png")
        forest_plot(rows, done, png)
        out += ["", f"![per-regime and pooled paired differences]({os.path.relpath(png, os.path.join(ROOT, 'docs'))})"]
    return "\n".join(out) + "\n"


# -- 4. noise-stability profile -------------------------------------------------------------------
def profile_section(runs_dir: str, regime: str, plot_dir: str) -> str | None:
    """The relative change of the last block's output for noise injected at each block, per model,
    from ``lnsr profile``'s CSV (and its plot, copied beside the other plots)."""
    import csv
    import shutil

    path = os.path.join(runs_dir, "profile", regime, "profile.csv")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        rows = list(csv.DictReader(f))
    last = max(int(r["layer"]) for r in rows)
    models = list(dict.fromkeys(r["model"] for r in rows))
    blocks = sorted({int(r["inject_at"]) for r in rows})
    change = {(r["model"], int(r["inject_at"])): float(r["rel_change"]) for r in rows if int(r["layer"]) == last}
    r0 = rows[0]
    out = [f"Relative change `||y~ - y|| / ||y||` of the last block's output for {r0['noise']} noise (sigma "
           f"{r0['sigma']}) injected at each block, eval mode, seed-1 models ({r0['n_tokens']} tokens of dev inputs; "
           f"`{os.path.relpath(path, ROOT)}` has every block):", "",
           "| model | " + " | ".join(f"noise at {b}" for b in blocks) + " |", "|---" * (len(blocks) + 1) + "|"]
    for m in models:
        out.append(f"| {m} | " + " | ".join(f"{change[(m, b)]:.4f}" for b in blocks) + " |")
    png = os.path.join(os.path.dirname(path), "profile.png")
    if os.path.isfile(png):
        os.makedirs(plot_dir, exist_ok=True)
        dst = os.path.join(plot_dir, f"profile_{regime}.png")
        shutil.copyfile(png, dst)
        out += ["", f"![noise-stability profile, {regime}]({os.path.relpath(dst, os.path.join(ROOT, 'docs'))})"]
    return "\n".join(out) + "\n"


# -- progress -------------------------------------------------------------------------------------
STAGE_RUNS = ("recipe", "strength", "final")


def stage_runs(regime: str, stage: str) -> int:
    """The registered number of runs of a stage."""
    return {"recipe": len(LRS) * len(EPOCHS) * SEARCH_SEEDS, "strength": 9 * SEARCH_SEEDS, "final": FINAL_ARMS * final_seeds(regime)}[stage]


def stage_records(runs_dir: str, regime: str, stage: str) -> list[dict]:
    """The finished run records of one stage of one regime."""
    per_config = ("*",) if stage == "recipe" else ()  # recipe/<regime>/lr{lr}_ep{ep}/<task>/vanilla/
    return load_runs(os.path.join(runs_dir, stage, regime, *per_config, REGIMES[regime][0], "*", "seed*.json"))


def stage_done(runs_dir: str, regime: str, stage: str) -> bool:
    """Has every registered run of the stage finished? The driver asks this of the frozen study code,
    so it reads the records only (no newer lnsr function)."""
    return len(stage_records(runs_dir, regime, stage)) >= stage_runs(regime, stage)


def progress(runs_dir: str, regime: str) -> dict:
    """Per stage: finished runs, the registered number, and the mean wall time of a finished run (s)."""
    from lnsr.finetune.report import run_seconds  # here: the frozen study code lacks it
    out = {}
    for stage in STAGE_RUNS:
        total = stage_runs(regime, stage)
        runs = stage_records(runs_dir, regime, stage)
        walls = [w for w in map(run_seconds, runs) if w is not None]
        machines = Counter(r.get("device", "unknown machine") for r in runs)
        out[stage] = {"done": len(runs), "total": total, "mean_wall_s": float(np.mean(walls)) if walls else None,
                      "machines": dict(machines), "precisions": dict(Counter(precision_of(r) for r in runs))}
    out["profile"] = os.path.isfile(os.path.join(runs_dir, "profile", regime, "profile.csv"))
    return out


def progress_line(runs_dir: str, regime: str) -> str:
    p = progress(runs_dir, regime)
    parts = []
    for stage in STAGE_RUNS:
        s = p[stage]
        wall = f", {s['mean_wall_s'] / 60:.0f} min per run" if s["mean_wall_s"] else ""
        parts.append(f"{stage} {s['done']}/{s['total']}{wall}")
    if regime == "mrpc1k":
        parts.append("profile " + ("done" if p["profile"] else "not yet"))
    line = "*Runs finished:* " + "; ".join(parts) + ".\n"
    # which machine ran what: a study that moves between machines says so (the device of each run
    # is in its record; bf16 kernels differ between CPUs, so a seed's arms may not share rounding)
    where = [f"{stage} " + ", ".join(f"{n} on {m}" for m, n in sorted(p[stage]["machines"].items()))
             for stage in STAGE_RUNS if p[stage]["machines"]]
    if where:
        line += "*Machines:* " + "; ".join(where) + ".\n"
    prec = [f"{stage} " + ", ".join(f"{n} {pr}" for pr, n in sorted(p[stage]["precisions"].items()))
            for stage in STAGE_RUNS if p[stage]["precisions"]]
    if prec:
        line += "*Precision:* " + "; ".join(prec) + ".\n"
    return line


# training examples per run: the searches train on 80% of the training set (the rest is held out),
# the final on all of it: 800 / 1000 in the few-sample regimes, 1992 / 2490 for rte
TRAIN_SIZE = {"rte": {"recipe": 1992, "strength": 1992, "final": 2490}}


def train_size(regime: str, stage: str) -> int:
    return TRAIN_SIZE.get(regime, {}).get(stage, 1000 if stage == "final" else 800)


def epoch_rate(runs_dir: str, regime: str, stage: str) -> tuple[float, int] | None:
    """(seconds per training example per epoch, finished runs) over a stage's runs, or None."""
    from lnsr.finetune.report import run_seconds  # here: the frozen study code lacks it
    n = train_size(regime, stage)
    rates = [secs / (n * (r["config"].get("epochs") or len(r["epochs"])))
             for r in stage_records(runs_dir, regime, stage) if (secs := run_seconds(r)) is not None]
    return (float(np.mean(rates)), len(rates)) if rates else None


def left_epochs(runs_dir: str, regime: str, stage: str, left: int) -> list[int] | None:
    """The epochs of each run a stage has left: the recipe grid's own, else the chosen recipe's
    (None while the recipe search is not complete)."""
    rows = recipe_rows(runs_dir, regime)
    if stage == "recipe":
        return [row["epochs"] for row in rows for _ in range(SEARCH_SEEDS - row["n"])]
    return [best_recipe(rows)["epochs"]] * left if search_complete(rows) else None


def _arm_rates(runs_dir: str, regime: str) -> dict:
    """Seconds per training example per epoch of each finished final run of a regime, by arm kind."""
    from lnsr.finetune.report import run_seconds  # here: the frozen study code lacks it
    n = train_size(regime, "final")
    out = {}
    for r in stage_records(runs_dir, regime, "final"):
        secs = run_seconds(r)
        if secs is not None:
            out.setdefault(arm_kind(run_label(r)), []).append(secs / (n * (r["config"].get("epochs") or len(r["epochs"]))))
    return out


def arm_cost_factors(runs_dir: str) -> dict:
    """Each arm kind's cost relative to vanilla, from the finals that ran both: per regime the ratio
    of the kinds' mean rates (one machine mix per regime, roughly), then the mean over regimes."""
    ratios = {}
    for regime in REGIMES:
        rates = _arm_rates(runs_dir, regime)
        if "vanilla" not in rates:
            continue
        base = float(np.mean(rates["vanilla"]))
        for kind, rs in rates.items():
            ratios.setdefault(kind, []).append(float(np.mean(rs)) / base)
    return {kind: float(np.mean(rs)) for kind, rs in ratios.items()}


def final_left_by_kind(runs_dir: str, regime: str) -> dict:
    """Runs a final has left per arm kind (each arm runs every seed)."""
    done = Counter(arm_kind(run_label(r)) for r in stage_records(runs_dir, regime, "final"))
    seeds = final_seeds(regime)
    return {k: seeds - done.get(k, 0) for k in ("vanilla", "control", "lnsr", "cheap", "r3f", "mixout")
            if seeds - done.get(k, 0) > 0}


def remaining(runs_dir: str) -> list[dict]:
    """Runs left per regime and stage, with a rough cost in run-hours (one run's wall time, summed).

    Where each left run's epochs are known (the recipe grid's; later stages once the recipe is
    chosen), a run costs its epochs x training examples x the seconds per example-epoch of the stage's
    finished runs (its own regime's, else the other regimes', weighted by their runs); otherwise the
    stage's mean run time (its own, else the others' scaled by training-set size). Rough: arms differ
    in cost, and so do sequence lengths.
    """
    prog = {r: progress(runs_dir, r) for r in REGIMES}
    rates = {(r, st): epoch_rate(runs_dir, r, st) for r in REGIMES for st in STAGE_RUNS}
    all_factors = arm_cost_factors(runs_dir)  # read once: every final's runs

    def weighted(seen):  # (value, runs) pairs -> their mean weighted by runs, or None
        return sum(t * n for t, n in seen) / sum(n for _, n in seen) if seen else None

    rows = []
    for regime in REGIMES:
        for stage in STAGE_RUNS:
            s = prog[regime][stage]
            left = s["total"] - s["done"]
            if left <= 0:
                continue
            per_run, basis = None, None
            epochs = left_epochs(runs_dir, regime, stage, left)
            own = rates[regime, stage]
            rate = own[0] if own else weighted([x for (r, st), x in rates.items() if st == stage and x])
            factors = all_factors if stage == "final" and own and epochs is not None else {}
            by_kind = final_left_by_kind(runs_dir, regime) if factors else {}
            if by_kind and all(k in factors for k in by_kind) and sum(by_kind.values()) == left:
                # the final's arms differ in cost (LNSR's doubled forward, R3F's second pass): the regime's
                # own runs give its vanilla-equivalent rate, the other finals each left arm's cost factor
                own_rates = _arm_rates(runs_dir, regime)
                base = float(np.mean([x / factors[k] for k, xs in own_rates.items() for x in xs]))
                per_run = base * train_size(regime, stage) * epochs[0] * sum(
                    factors[k] * n for k, n in by_kind.items()) / left
                basis = "its own runs, per epoch and arm"
            elif epochs is not None and rate is not None:
                per_run = rate * train_size(regime, stage) * sum(epochs) / left
                basis = ("its own runs" if own else "other regimes' runs") + ", per epoch"
            elif s["mean_wall_s"]:
                per_run, basis = s["mean_wall_s"], "its own runs"
            else:
                # per-example time of the stage's finished runs elsewhere, times this regime's size
                per_example = weighted([(p[stage]["mean_wall_s"] / train_size(r, stage), p[stage]["done"])
                                        for r, p in prog.items() if p[stage]["mean_wall_s"]])
                if per_example is not None:
                    per_run, basis = per_example * train_size(regime, stage), "other regimes' runs"
            rows.append({"regime": regime, "stage": stage, "left": left, "per_run_s": per_run,
                         "run_hours": None if per_run is None else left * per_run / 3600, "basis": basis})
    return rows


def remaining_text(runs_dir: str, jobs: int = 2) -> str:
    rows = remaining(runs_dir)
    if not rows:
        return "Nothing left: every registered run has finished.\n"
    lines = []
    for r in rows:
        cost = (f"about {r['run_hours']:.1f} run-hours ({r['per_run_s'] / 60:.0f} min per run, from {r['basis']})"
                if r["run_hours"] is not None else "cost unknown (no finished run of this stage yet)")
        lines.append(f"{r['regime']} {r['stage']}: {r['left']} runs left, {cost}")
    known = [r["run_hours"] for r in rows if r["run_hours"] is not None]
    total = sum(known)
    lines.append(f"in all about {total:.1f} run-hours{'' if len(known) == len(rows) else ' (stages of unknown cost left out)'}"
                 f": about {total / jobs:.1f} hours of wall time at {jobs} runs at once")
    return "\n".join(lines) + "\n"


def run_dir_summaries(runs_dir: str) -> list[str]:
    """Rewrite each run directory's summary.md / summary.png from every finished run in it.

    The driver calls `lnsr finetune` once per run, and each call summarises only its own run (one arm,
    one seed), so the directory's summary would otherwise show whichever run finished last."""
    from lnsr.finetune.report import write_summary  # lazy: the frozen study copy imports this module too
    task_dirs = sorted({os.path.dirname(os.path.dirname(p))
                        for p in glob.glob(os.path.join(runs_dir, "**", "seed*.json"), recursive=True)})
    for d in task_dirs:
        runs = load_runs(os.path.join(d, "*", "seed*.json"))
        labels = arm_order({r["config"]["label"] for r in runs})
        runs.sort(key=lambda r: (r["config"]["seed"], labels.index(r["config"]["label"])))
        write_summary(runs[0]["config"]["task"], runs, list(runs[0]["final"]), d, echo=False)
    return task_dirs


# -- the answer, in one table (README.md and the top of docs/results.md) ------------------------------
ANSWER = ("<!-- answer:begin -->", "<!-- answer:end -->")
SHORT = {"mrpc1k": "MRPC, 1000 pairs", "sst2-1k": "SST-2, 1000 sentences", "rte1k": "RTE, 1000 pairs",
         "rte": "RTE, full (2490 pairs)"}


def answer_table(runs_dir: str) -> str:
    """Per complete regime (all-MiniLM-L6-v2, dev accuracy x100, paired by seed): LNSR at the held-out
    choice against the lam = 0 control (the penalty's own effect) and against vanilla, and the reading
    of the first; then the pooled pairs. Written from the run files alone."""
    from lnsr.finetune.stats import ci_text, reading  # lazy, as in fmt_cmp

    def cell(c):
        return f"{100 * c['mean']:+.2f} {ci_text(c)}"

    rows = ["| regime (all-MiniLM-L6-v2) | seeds | LNSR - control | LNSR - vanilla | reading |", "|---|---|---|---|---|"]
    pooled = {}
    for regime in REGIMES:
        arms = final_arms(runs_dir, regime)
        if sum(len(v) for v in arms.values()) < FINAL_ARMS * final_seeds(regime):
            continue
        scores = {}
        for label, runs in arms.items():
            for r in runs:
                scores.setdefault(role(label), {})[r["config"]["seed"]] = r["final"][METRIC]
                pooled.setdefault(role(label), {})[(regime, r["config"]["seed"])] = r["final"][METRIC]
        pc, pv = compare(scores["LNSR"], scores["control"]), compare(scores["LNSR"], scores["vanilla"])
        rows.append(f"| {SHORT[regime]} | {pc['n']} | {cell(pc)} | {cell(pv)} | {reading(pc)} |")
    if len(rows) > 3:
        pc, pv = compare(pooled["LNSR"], pooled["control"]), compare(pooled["LNSR"], pooled["vanilla"])
        rows.append(f"| pooled (exploratory) | {pc['n']} pairs | {cell(pc)} | {cell(pv)} | {reading(pc)} |")
    return "\n".join(rows)


def write_answer(path: str, table: str) -> None:
    """Replace the answer block of ``path`` (README.md or docs/results.md) by ``table``."""
    with open(path) as f:
        text = f.read()
    begin, end = ANSWER
    if begin not in text or end not in text:
        raise SystemExit(f"{path} has no {begin} ... {end} block to fill")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(head + begin + "\n" + table + "\n" + end + tail)


def summary(runs_dir: str, results_md: str, plot_dir: str) -> str:
    run_dir_summaries(runs_dir)
    parts = []
    for regime, (_, title) in REGIMES.items():
        sec = [f"#### {title}", "", progress_line(runs_dir, regime)]
        has = False
        if glob.glob(os.path.join(runs_dir, "recipe", regime, "*", "*", "vanilla", "seed*.json")):
            sec += ["**1. Recipe (vanilla, held-out train).** " + recipe_table(runs_dir, regime)]
            has = True
        st = strength_table(runs_dir, regime)
        if st:
            sec += ["**2. Strength (`lnsr tune`, held-out train).**", "", st]
            has = True
        fin = final_section(runs_dir, regime, plot_dir)
        if fin:
            sec += ["**3. Final (GLUE dev).** " + fin]
            has = True
        prof = profile_section(runs_dir, regime, plot_dir)
        if prof:
            sec += ["**4. Noise-stability profile (`lnsr profile`).** " + prof]
            has = True
        if not has:
            sec.append("Not run yet.\n")
        parts.append("\n".join(sec))
    pooled = pooled_section(runs_dir, plot_dir)
    if pooled:
        parts.append("#### Across regimes\n\n" + pooled)
    block = "\n".join(parts)
    with open(results_md) as f:
        text = f.read()
    begin, end = "<!-- study:begin -->", "<!-- study:end -->"
    if begin not in text or end not in text:
        raise SystemExit(f"{results_md} has no {begin} ... {end} block to fill")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(results_md, "w") as f:
        f.write(head + begin + "\n<!-- written by `bench/study/study.sh summary` from the run files; do not edit -->\n\n"
                + block + "\n" + end + tail)
    table = answer_table(runs_dir)
    for path in (results_md, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(results_md))), "README.md")):
        if os.path.isfile(path) and ANSWER[0] in open(path).read():
            write_answer(path, table)
    return block


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default=os.path.join(ROOT, "docs", "runs", "study"))
    ap.add_argument("--results", default=os.path.join(ROOT, "docs", "results.md"))
    ap.add_argument("--plots", default=os.path.join(ROOT, "docs", "study"))
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("JOBS", 2)),
                    help="runs at once, for `remaining`'s wall-time estimate (default: $JOBS or 2)")
    ap.add_argument("command", choices=("recipe-choice", "recipe-table", "task-of", "progress", "stage-done",
                                        "remaining", "summary"))
    ap.add_argument("regime", nargs="?", choices=tuple(REGIMES))
    ap.add_argument("stage", nargs="?", choices=STAGE_RUNS, help="for stage-done")
    a = ap.parse_args(argv)
    if a.command not in ("summary", "remaining") and not a.regime:
        ap.error(f"{a.command} needs a regime")
    if a.command == "recipe-choice":
        best = recipe_choice(a.runs, a.regime)
        print(f"--lr {best['lr']} --epochs {best['epochs']}")
    elif a.command == "recipe-table":
        print(recipe_table(a.runs, a.regime))
    elif a.command == "task-of":
        print(REGIMES[a.regime][0])
    elif a.command == "progress":
        print(f"{a.regime}: " + progress_line(a.runs, a.regime), end="")
    elif a.command == "stage-done":  # exit status 0 when every registered run of the stage has finished
        if not a.stage:
            ap.error("stage-done needs a regime and a stage")
        return 0 if stage_done(a.runs, a.regime, a.stage) else 1
    elif a.command == "remaining":
        print(remaining_text(a.runs, a.jobs), end="")
    else:
        print(summary(a.runs, a.results, a.plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
