"""Tables and the registered choices of the second study (docs/results.md, "The second study"), from
its run files alone.

    python bench/stability/stability.py --runs docs/runs/stability progress   # finished runs per setting
    python bench/stability/stability.py --runs docs/runs/stability choice     # the registered pick per family
    python bench/stability/stability.py --runs docs/runs/stability summary    # rewrite the tables in docs/results.md
    python bench/stability/stability.py --runs docs/runs/stability commands   # the runs still to do, in order
    python bench/stability/stability.py --runs docs/runs/stability queue A    # run them (what `stability.sh start` does)

``summary`` rewrites the block between ``<!-- stability:begin -->`` and ``<!-- stability:end -->`` of
docs/results.md. It trains nothing and reads nothing but the run JSON files.

The three stages follow one another without a person in between: a stage's runs become due as soon
as the registered choice of the stage before it can be made from the finished records (the scan's
choice once a family's grid is complete; the strength once its 3 seeds x 6 arms are). Each arm of
the strength and final stages has its own folder (``<stage>/<family>/<setting>/<arm>/``), so a run
is done when that folder holds ``<task>/*/seed<k>.json`` with a final score. The strength stage runs
``lnsr tune``'s arms (vanilla, the ``lam = 0`` controls and the lam x block grid, ``--holdout 0.2``)
as separate ``lnsr finetune`` runs so that two queues can share them; its vanilla arm is the scan's
seeds 1-3 of the chosen setting (the same runs: the same setting, seeds and held-out split).
"""
from __future__ import annotations

import argparse
import fcntl
import glob
import hashlib
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
METRIC = "accuracy"              # the main metric of every setting (registered)
SCAN_SEEDS = 5
FAMILIES = {"mpnet-base": "all-mpnet-base-v2 (12 x 768)", "minilm": "all-MiniLM-L6-v2 (6 x 384)"}
# the registered scan grid: family -> [(task, n, lr)], in the order of docs/results.md
SCAN = {
    "mpnet-base": [(t, 1000, lr) for t in ("mrpc", "rte") for lr in ("2e-5", "5e-5", "1e-4")],
    "minilm": [(t, n, lr) for t in ("mrpc", "sst2") for n in (250, 500) for lr in ("1e-4", "3e-4", "1e-3")],
}
OPTIONAL = {"mpnet-base": [("sst2", 1000, lr) for lr in ("2e-5", "5e-5", "1e-4")]}   # if the budget allows
BAND = (1, 3)                    # a setting "fails in 20-60% of seeds": 1 to 3 failed runs of 5
BLOCKS = {"mpnet-base": 12, "minilm": 6}
# stage 2, the strength (registered): lam x inject_at in {0, L/2}, seeds 1-3, with vanilla and a lam = 0
# control at each block; the LNSR arm with the fewest failed runs, then the highest mean held-out
# accuracy wins (ties, not registered and fixed before any strength run: the lower lam, then block 0)
STRENGTH_LAMS = ("0.003", "0.01")
STRENGTH_SEEDS = (1, 2, 3)
FINAL_SEEDS = tuple(range(1, 21))
# the fixed recipe of every run (registered); LNSR options not in an arm's spec are the protocol's
RECIPE = "--batch-size 16 --max-length 128 --warmup-ratio 0.1 --weight-decay 0.01 --no-progress --checkpoint-every 0"
LNSR_FLAGS = "--sigma 0.05 --noise relative --normalize token --dropout paired"


def failed(run: dict) -> bool:
    """The registered failure rule (the first study's "degenerate run"): predictions all one class,
    or the main metric within 1 point of the majority-class rate of the evaluated set, or below it."""
    counts = run["epochs"][-1].get("predicted_per_class")
    if counts is not None and sum(1 for c in counts if c) <= 1:
        return True
    labels = run.get("evaluation_label_counts")
    return bool(labels) and run["final"][METRIC] <= max(labels) / sum(labels) + 0.01


def setting_dir(runs_dir: str, family: str, task: str, n: int, lr: str) -> str:
    return os.path.join(runs_dir, "scan", family, setting_name(task, n, lr))


def load_setting(runs_dir: str, family: str, task: str, n: int, lr: str) -> list[dict]:
    # a scan folder holds vanilla runs only (<task>/vanilla/seed<k>.json)
    return [r for _, r in sorted(load_arm(setting_dir(runs_dir, family, task, n, lr)).items())]


def setting_row(runs_dir: str, family: str, task: str, n: int, lr: str) -> dict:
    runs = load_setting(runs_dir, family, task, n, lr)
    scores = [100 * r["final"][METRIC] for r in runs]
    labels = runs[0].get("evaluation_label_counts") if runs else None
    return {"family": family, "task": task, "n": n, "lr": lr, "runs": len(runs),
            "failed": sum(failed(r) for r in runs), "scores": scores,
            "seeds": [r["config"]["seed"] for r in runs],
            "mean": statistics.mean(scores) if scores else None,
            "std": statistics.stdev(scores) if len(scores) > 1 else None,
            "majority": 100 * max(labels) / sum(labels) if labels else None,
            "minutes": statistics.mean(r["wall_time_s"] for r in runs) / 60 if runs else None}


def rows(runs_dir: str, family: str, optional: bool = True) -> list[dict]:
    grid = SCAN[family] + (OPTIONAL.get(family, []) if optional else [])
    return [setting_row(runs_dir, family, *s) for s in grid]


def choose(rs: list[dict]) -> dict | None:
    """The registered rule, applied to one family's complete registered grid (None until complete).

    1. Settings where vanilla fails in 1-3 of 5 seeds (20-60%): the most failures, then the largest
       std of the held-out main metric over seeds, then the lower lr, then the smaller n.
    2. If none: among settings with no more than 3 failures, the largest std, then the lower lr,
       then the smaller n (settings failing in 4-5 seeds are "not learnt", not unstable)."""
    if not rs or any(r["runs"] < SCAN_SEEDS for r in rs):
        return None
    key_lr = lambda r: (float(r["lr"]), r["n"])  # noqa: E731
    band = [r for r in rs if BAND[0] <= r["failed"] <= BAND[1]]
    if band:
        best = sorted(band, key=lambda r: (-r["failed"], -r["std"], *key_lr(r)))[0]
        return {**best, "why": f"vanilla failed in {best['failed']} of {best['runs']} seeds (rule 1)"}
    usable = [r for r in rs if r["failed"] <= BAND[1]]
    if not usable:
        return {"why": "no setting is learnt in at least 2 of 5 seeds: no final regime for this family"}
    best = sorted(usable, key=lambda r: (-r["std"], *key_lr(r)))[0]
    return {**best, "why": f"no setting failed in 1-3 of 5 seeds; largest vanilla std over seeds, "
                           f"{best['std']:.2f} (rule 2)"}


def blocks_half(family: str) -> int:
    return BLOCKS[family] // 2


def lnsr_spec(lam: str, k: int) -> str:
    return f"lnsr:lam={lam},inject_at={k}"


def strength_arms(family: str) -> dict:
    """``{arm folder: (lam, inject_at)}`` of the strength stage (vanilla comes from the scan)."""
    arms = {f"control_k{k}": ("0", k) for k in (0, blocks_half(family))}
    arms.update({f"lam{lam}_k{k}": (lam, k) for lam in STRENGTH_LAMS for k in (0, blocks_half(family))})
    return arms


def setting_name(task: str, n: int, lr: str) -> str:
    return f"{task}_n{n}_lr{lr}"


def arm_dir(runs_dir: str, stage: str, family: str, setting: tuple, arm: str) -> str:
    return os.path.join(runs_dir, stage, family, setting_name(*setting), arm)


def load_arm(path: str) -> dict:
    """``{seed: record}`` of the finished runs under one arm folder (``<task>/<label>/seed<k>.json``)."""
    runs = {}
    for f in glob.glob(os.path.join(path, "*", "*", "seed*.json")):
        with open(f) as fh:
            r = json.load(fh)
        if r.get("final"):
            runs[r["config"]["seed"]] = r
    return runs


def scan_choice(runs_dir: str, family: str) -> tuple | None:
    pick = choose(rows(runs_dir, family, optional=False))
    return (pick["task"], pick["n"], pick["lr"]) if pick and "task" in pick else None


def strength_rows(runs_dir: str, family: str, setting: tuple) -> list[dict]:
    """One row per strength arm: the scan's vanilla seeds 1-3, the controls and the LNSR grid."""
    out = []
    scan = {r["config"]["seed"]: r for r in load_setting(runs_dir, family, *setting)}
    arms = {"vanilla": (None, None), **strength_arms(family)}
    for arm, (lam, k) in arms.items():
        runs = scan if lam is None else load_arm(arm_dir(runs_dir, "strength", family, setting, arm))
        runs = {s: r for s, r in runs.items() if s in STRENGTH_SEEDS}
        scores = {s: 100 * r["final"][METRIC] for s, r in sorted(runs.items())}
        out.append({"arm": arm, "spec": "vanilla" if lam is None else lnsr_spec(lam, k), "lam": lam, "k": k,
                    "scores": scores,
                    "failed": sum(failed(r) for r in runs.values()), "runs": len(runs),
                    "mean": statistics.mean(scores.values()) if scores else None,
                    "std": statistics.stdev(scores.values()) if len(scores) > 1 else None})
    return out


def choose_strength(rs: list[dict]) -> dict | None:
    """The registered strength rule on complete rows (None until every arm has its 3 seeds): among the
    LNSR arms (lam > 0), the fewest failed runs, then the highest mean held-out accuracy, then the
    lower lam, then block 0."""
    if not rs or any(r["runs"] < len(STRENGTH_SEEDS) for r in rs):
        return None
    lnsr_arms = [r for r in rs if r["lam"] is not None and float(r["lam"]) > 0]
    return sorted(lnsr_arms, key=lambda r: (r["failed"], -r["mean"], float(r["lam"]), r["k"]))[0]


def final_arms(family: str, best: dict) -> dict:
    return {"vanilla": "vanilla", f"control_k{best['k']}": lnsr_spec("0", best["k"]),
            f"lnsr_lam{best['lam']}_k{best['k']}": best["spec"]}


# -- the runs still to do ---------------------------------------------------------------------------
def planned(runs_dir: str, out: str, data: str, threads: int, lnsr: str = "lnsr") -> dict:
    """``{family: [(stage, run folder, seed, argv)]}`` of every run the protocol asks for *now* (the
    stages whose preceding choice can be made), in the registered order (seeds outer in each stage; the
    optional scan last)."""
    plan = {}
    for fam in SCAN:
        items = []
        model = ["--model", fam] if fam != "minilm" else []

        def cmd(task, n, lr, method, seed, folder, holdout):
            # the scan's commands are those the first version of this harness ran, flag for flag
            argv = [lnsr, "finetune", "--task", task, "--max-train-samples", str(n), "--lr", lr, *model,
                    "--data-dir", data, *RECIPE.split(), "--threads", str(threads), "--epochs", "3"]
            argv += ["--holdout", "0.2"] if holdout else []
            argv += ["--method", method] + (LNSR_FLAGS.split() if method != "vanilla" else [])
            # SST-2's held-out 20% is 13,470 sentences: the first 2000 (a random subset) are scored
            argv += ["--max-eval-samples", "2000"] if task == "sst2" and holdout else []
            return argv + ["--seeds", str(seed), "--output-dir", folder]

        def scan(grid):
            for seed in range(1, SCAN_SEEDS + 1):
                for task, n, lr in grid:
                    folder = os.path.join(out, "scan", fam, setting_name(task, n, lr))
                    items.append(("scan", folder, seed, cmd(task, n, lr, "vanilla", seed, folder, True)))

        scan(SCAN[fam])
        setting = scan_choice(runs_dir, fam)
        if setting is not None:
            for seed in STRENGTH_SEEDS:
                for arm, (lam, k) in strength_arms(fam).items():
                    folder = os.path.join(out, "strength", fam, setting_name(*setting), arm)
                    items.append(("strength", folder, seed, cmd(*setting, lnsr_spec(lam, k), seed, folder, True)))
            best = choose_strength(strength_rows(runs_dir, fam, setting))
            if best is not None:
                for seed in FINAL_SEEDS:
                    for arm, spec in final_arms(fam, best).items():
                        folder = os.path.join(out, "final", fam, setting_name(*setting), arm)
                        items.append(("final", folder, seed, cmd(*setting, spec, seed, folder, False)))
        scan(OPTIONAL.get(fam, []))   # if the budget allows: after everything else of the family
        plan[fam] = items
    return plan


def finished_runs(runs_dir: str) -> set:
    """``{(run folder relative to runs_dir, seed)}`` of every finished run: a record
    ``<folder>/<task>/<label>/seed<k>.json`` with a final score (scan folders and arm folders alike)."""
    out = set()
    for f in glob.glob(os.path.join(runs_dir, "*", "*", "*", "**", "seed*.json"), recursive=True):
        with open(f) as fh:
            r = json.load(fh)
        if r.get("final"):
            folder = os.path.dirname(os.path.dirname(os.path.dirname(f)))
            out.add((os.path.relpath(folder, runs_dir), r["config"]["seed"]))
    return out


def done(runs_dir: str, out: str, folder: str, seed: int, finished: set | None = None) -> bool:
    finished = finished_runs(runs_dir) if finished is None else finished
    return (os.path.relpath(folder, out), seed) in finished


def pending(runs_dir: str, queue: str, out: str, data: str, threads: int, lnsr: str = "lnsr") -> list[tuple]:
    """The runs not finished yet, in queue order: A takes mpnet-base first (scan, strength, final; the
    optional SST-2 scan last), then MiniLM; B the other way round. Both take each family's runs from the
    front, so every finished block is a complete, seed-paired comparison; a lock keeps them apart."""
    plan = planned(runs_dir, out, data, threads, lnsr)
    finished = finished_runs(runs_dir)
    order = ["mpnet-base", "minilm"] if queue == "A" else ["minilm", "mpnet-base"]
    todo = []
    for fam in order:
        todo += [it for it in plan[fam] if not done(runs_dir, out, it[1], it[2], finished)]
    return todo


def lock_key(argv: list) -> str:
    return hashlib.md5(" ".join(argv).encode()).hexdigest()[:16]


def queue(runs_dir: str, q: str, out: str, data: str, threads: int, lnsr: str, poll: float = 120.0,
          log=print) -> int:
    """Run the pending runs one at a time until none is left; returns the number run. A run another
    queue holds is skipped; when everything pending is held (or the next stage waits for a run in
    flight elsewhere) it waits; a run that exits with an error is not retried by this queue."""
    locks = os.path.join(runs_dir, ".locks")
    os.makedirs(locks, exist_ok=True)
    broken, ran = set(), 0
    while True:
        todo = [it for it in pending(runs_dir, q, out, data, threads, lnsr) if lock_key(it[3]) not in broken]
        started = False
        for stage, folder, seed, argv in todo:
            key = lock_key(argv)
            fh = open(os.path.join(locks, key), "w")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.close()
                continue
            try:
                if done(runs_dir, out, folder, seed):   # finished by the other queue meanwhile
                    continue
                log(f"{time.strftime('%H:%M:%S')} queue {q}: {stage} {os.path.relpath(folder, out)} seed {seed}")
                rc = subprocess.call(argv)
                ran += 1
                if rc != 0:
                    broken.add(key)
                    log(f"queue {q}: exit status {rc}, not retried: {shlex.join(argv)}")
                started = True
            finally:
                fh.close()
            break
        if started:
            continue
        if not any(_held(os.path.join(locks, f)) for f in os.listdir(locks)):
            log(f"queue {q} done: nothing left to run now ({len(todo)} pending runs failed or wait)")
            return ran
        time.sleep(poll)   # the other queue holds the rest, or finishes what the next stage waits for


def _held(path: str) -> bool:
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


# -- the finals' endpoints ----------------------------------------------------------------------------
def mcnemar_exact(fail_a: dict, fail_b: dict) -> tuple[int, int, float]:
    """Exact McNemar test on seed-paired failures ``{seed: bool}``: the discordant seeds (a failed, b
    not; b failed, a not) and the two-sided binomial p-value of the split under p = 1/2."""
    seeds = [s for s in fail_a if s in fail_b]
    b = sum(1 for s in seeds if fail_a[s] and not fail_b[s])
    c = sum(1 for s in seeds if fail_b[s] and not fail_a[s])
    n = b + c
    if n == 0:
        return b, c, 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return b, c, min(1.0, 2 * tail)


def fisher_exact(fa: int, na: int, fb: int, nb: int) -> float:
    """Two-sided Fisher exact test of failure counts fa of na against fb of nb: the probability of
    every 2x2 table with the same margins that is no more likely than the observed one."""
    f, n = fa + fb, na + nb
    prob = lambda x: math.comb(na, x) * math.comb(nb, f - x) / math.comb(n, f)  # noqa: E731
    p_obs = prob(fa)
    lo, hi = max(0, f - nb), min(na, f)
    return min(1.0, sum(prob(x) for x in range(lo, hi + 1) if prob(x) <= p_obs * (1 + 1e-7)))


def final_rows(runs_dir: str, family: str, setting: tuple, best: dict) -> dict:
    """``{arm: {seed: record}}`` of the final stage."""
    return {arm: load_arm(arm_dir(runs_dir, "final", family, setting, arm)) for arm in final_arms(family, best)}


def final_report(arms: dict) -> tuple[list[dict], list[dict]]:
    """Per-arm rows and the three pairwise comparisons (LNSR - vanilla, LNSR - control, control -
    vanilla) over the seeds both arms have: failures (McNemar, Fisher), dev accuracy (paired mean,
    95% t interval, exact Wilcoxon), spread (Pitman-Morgan), accuracy over the seeds where neither failed."""
    from lnsr.finetune.stats import compare

    names = list(arms)
    per = []
    for arm in names:
        runs = arms[arm]
        acc = {s: 100 * r["final"][METRIC] for s, r in runs.items()}
        fails = {s: failed(r) for s, r in runs.items()}
        ok = [a for s, a in acc.items() if not fails[s]]
        per.append({"arm": arm, "runs": len(runs), "failed": sum(fails.values()), "acc": acc, "fails": fails,
                    "mean": statistics.mean(acc.values()) if acc else None,
                    "std": statistics.stdev(acc.values()) if len(acc) > 1 else None,
                    "mean_ok": statistics.mean(ok) if ok else None})
    by = {r["arm"]: r for r in per}
    vanilla, control, lnsr = names
    pairs = []
    for a, b in ((lnsr, vanilla), (lnsr, control), (control, vanilla)):
        A, B = by[a], by[b]
        seeds = sorted(set(A["acc"]) & set(B["acc"]))
        fa = {s: A["fails"][s] for s in seeds}
        fb = {s: B["fails"][s] for s in seeds}
        disc_a, disc_b, p_mc = mcnemar_exact(fa, fb)
        p_fi = fisher_exact(sum(fa.values()), len(seeds), sum(fb.values()), len(seeds)) if seeds else float("nan")
        # compare() and its texts work on fractions (the record's scale); the tables show x100
        c = compare({s: A["acc"][s] / 100 for s in seeds}, {s: B["acc"][s] / 100 for s in seeds})
        both_ok = [s for s in seeds if not fa[s] and not fb[s]]
        c_ok = compare({s: A["acc"][s] / 100 for s in both_ok}, {s: B["acc"][s] / 100 for s in both_ok})
        pairs.append({"a": a, "b": b, "n": len(seeds), "failed_a": sum(fa.values()), "failed_b": sum(fb.values()),
                      "only_a_failed": disc_a, "only_b_failed": disc_b, "p_mcnemar": p_mc, "p_fisher": p_fi,
                      "acc": c, "acc_not_failed": c_ok})
    return per, pairs


def fmt(x, d=2):
    return "-" if x is None else f"{x:.{d}f}"


def scan_table(runs_dir: str, family: str) -> str:
    rs = rows(runs_dir, family)
    out = [f"**{FAMILIES[family]}**, vanilla, held-out accuracy (x100) at the last of 3 epochs, fp32", "",
           "| task | n train | lr | runs | failed | mean | std | min | max | majority | per seed | min / run |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rs:
        if not r["runs"] and (r["task"], r["n"], r["lr"]) in OPTIONAL.get(family, []):
            continue
        per = " ".join(f"s{s}:{v:.1f}" for s, v in zip(r["seeds"], r["scores"]))
        out.append(f"| {r['task']} | {r['n']} | {r['lr']} | {r['runs']}/{SCAN_SEEDS} | {r['failed']} | {fmt(r['mean'])} | "
                   f"{fmt(r['std'])} | {fmt(min(r['scores']) if r['scores'] else None, 1)} | "
                   f"{fmt(max(r['scores']) if r['scores'] else None, 1)} | {fmt(r['majority'], 1)} | {per or '-'} | "
                   f"{fmt(r['minutes'], 0)} |")
    pick = choose(rows(runs_dir, family, optional=False))
    if pick is None:
        done = sum(r["runs"] for r in rs[:len(SCAN[family])])
        out += ["", f"Registered choice: not yet (the grid is incomplete: {done} of "
                    f"{len(SCAN[family]) * SCAN_SEEDS} runs)."]
    elif "task" in pick:
        out += ["", f"Registered choice: **{pick['task']}, {pick['n']} training examples, lr {pick['lr']}** — {pick['why']}."]
    else:
        out += ["", f"Registered choice: {pick['why']}."]
    return "\n".join(out)


def strength_table(runs_dir: str, family: str, setting: tuple) -> str:
    rs = strength_rows(runs_dir, family, setting)
    if not any(r["runs"] for r in rs if r["spec"] != "vanilla"):
        return ""
    out = [f"Strength in {setting_name(*setting)} ({FAMILIES[family]}), held-out accuracy (x100), seeds "
           f"{', '.join(map(str, STRENGTH_SEEDS))}", "",
           "| arm | method | runs | failed | mean | std | per seed |", "|---|---|---|---|---|---|---|"]
    for r in rs:
        per = " ".join(f"s{s}:{v:.1f}" for s, v in r["scores"].items())
        out.append(f"| {r['arm']} | `{r['spec']}` | {r['runs']}/{len(STRENGTH_SEEDS)} | {r['failed']} | "
                   f"{fmt(r['mean'])} | {fmt(r['std'])} | {per or '-'} |")
    best = choose_strength(rs)
    out += ["", "Registered strength choice: " + (
        f"**`{best['spec']}`** ({best['failed']} failed, mean {best['mean']:.2f})." if best else
        "not yet (interim: some arms lack seeds).")]
    return "\n".join(out)


def final_table(runs_dir: str, family: str, setting: tuple, best: dict) -> str:
    arms = final_rows(runs_dir, family, setting, best)
    if not any(arms.values()):
        return ""
    per, pairs = final_report(arms)
    n = min(r["runs"] for r in per)
    status = "" if n >= len(FINAL_SEEDS) else f" — **interim: {n} of {len(FINAL_SEEDS)} seeds in every arm**"
    out = [f"Finals in {setting_name(*setting)} ({FAMILIES[family]}), GLUE dev accuracy (x100){status}", "",
           "| arm | runs | failed | mean | std | mean over non-failed |", "|---|---|---|---|---|---|"]
    for r in per:
        out.append(f"| {r['arm']} | {r['runs']} | {r['failed']} | {fmt(r['mean'])} | {fmt(r['std'])} | "
                   f"{fmt(r['mean_ok'])} |")
    out += ["", "| pair | seeds | failed (a / b) | only a / only b failed | McNemar p | Fisher p | "
                "accuracy a - b [95% CI] | Wilcoxon p | sd ratio (Pitman-Morgan p) | a - b, neither failed |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    from lnsr.finetune.stats import p_text, reading

    for c in pairs:
        acc, ok = c["acc"], c["acc_not_failed"]
        okt = f"{100 * ok['mean']:+.2f} ({ok['n']} seeds)" if ok.get("n") else "-"
        out.append(f"| {c['a']} - {c['b']} | {c['n']} | {c['failed_a']} / {c['failed_b']} | "
                   f"{c['only_a_failed']} / {c['only_b_failed']} | {p_text(c['p_mcnemar'])} | {p_text(c['p_fisher'])} | "
                   f"{acc_text(acc)} | {p_text(acc.get('p_wilcoxon', float('nan')))} | "
                   f"{fmt(acc.get('sd_ratio'))} ({p_text(acc.get('p_var', float('nan')))}) | {okt} |")
    lnsr_v = pairs[0]["acc"]
    out += ["", f"Reading (accuracy, LNSR - vanilla): {reading(lnsr_v) if lnsr_v.get('n') else '-'}."]
    return "\n".join(out)


def acc_text(c: dict) -> str:
    """``+0.25 [-0.37, +0.87]`` (x100) of a compare result; ``-`` without seeds."""
    from lnsr.finetune.stats import ci_text

    if not c.get("n"):
        return "-"
    return f"{100 * c['mean']:+.2f} {ci_text(c) or ''}".strip()


def family_section(runs_dir: str, family: str) -> str:
    parts = [scan_table(runs_dir, family)]
    setting = scan_choice(runs_dir, family)
    if setting is not None:
        parts.append(strength_table(runs_dir, family, setting))
        best = choose_strength(strength_rows(runs_dir, family, setting))
        if best is not None:
            parts.append(final_table(runs_dir, family, setting, best))
    return "\n\n".join(p for p in parts if p)


def summary(runs_dir: str, results_md: str) -> str:
    body = "\n\n".join(family_section(runs_dir, fam) for fam in SCAN)
    begin, end = "<!-- stability:begin -->", "<!-- stability:end -->"
    with open(results_md) as f:
        text = f.read()
    if begin not in text or end not in text:
        raise SystemExit(f"{results_md} has no {begin} ... {end} block")
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    block = (begin + "\n<!-- written by `bench/stability/stability.sh summary` from the run files; do not edit -->\n\n"
             + body + "\n" + end)
    with open(results_md, "w") as f:
        f.write(head + block + tail)
    return body


def progress(runs_dir: str) -> str:
    lines = []
    for fam in SCAN:
        rs = rows(runs_dir, fam)
        done = sum(r["runs"] for r in rs)
        lines.append(f"{fam}: {done} of {len(rs) * SCAN_SEEDS} scan runs finished ("
                     + ", ".join(f"{r['task']} n{r['n']} lr{r['lr']} {r['runs']}" for r in rs) + ")")
        setting = scan_choice(runs_dir, fam)
        if setting is None:
            continue
        srs = strength_rows(runs_dir, fam, setting)
        lines.append(f"  strength in {setting_name(*setting)}: "
                     + ", ".join(f"{r['arm']} {r['runs']}/{len(STRENGTH_SEEDS)}" for r in srs))
        best = choose_strength(srs)
        if best is not None:
            arms = final_rows(runs_dir, fam, setting, best)
            lines.append(f"  final with {best['spec']}: "
                         + ", ".join(f"{a} {len(r)}/{len(FINAL_SEEDS)}" for a, r in arms.items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=os.path.join(ROOT, "docs", "runs", "stability"))
    p.add_argument("--results", default=os.path.join(ROOT, "docs", "results.md"))
    p.add_argument("--out", default="docs/runs/stability",
                   help="the runs' --output-dir root as the commands name it (relative to where they run)")
    p.add_argument("--data", default="../shared/data", help="--data-dir of the runs, as typed into the records")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--lnsr", default="lnsr", help="the lnsr command")
    p.add_argument("command", choices=["progress", "choice", "summary", "commands", "queue"])
    p.add_argument("queue", nargs="?", choices=["A", "B"], default="A")
    a = p.parse_args(argv)
    if a.command == "commands":
        for stage, folder, seed, argv_ in pending(a.runs, a.queue, a.out, a.data, a.threads, a.lnsr):
            print(shlex.join(argv_))
    elif a.command == "queue":
        queue(a.runs, a.queue, a.out, a.data, a.threads, a.lnsr, log=lambda m: print(m, flush=True))
    elif a.command == "progress":
        print(progress(a.runs))
    elif a.command == "choice":
        for fam in SCAN:
            pick = choose(rows(a.runs, fam, optional=False))
            print(f"{fam}: " + ("incomplete" if pick is None else json.dumps(
                {k: pick[k] for k in ("task", "n", "lr", "why") if k in pick})))
    else:
        print(summary(a.runs, a.results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
