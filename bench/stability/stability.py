"""Tables and the registered choices of the second study (docs/results.md, "The second study"), from
its run files alone.

    python bench/stability/stability.py --runs docs/runs/stability progress   # finished runs per setting
    python bench/stability/stability.py --runs docs/runs/stability choice     # the registered pick per family
    python bench/stability/stability.py --runs docs/runs/stability summary    # rewrite the tables in docs/results.md

``summary`` rewrites the block between ``<!-- stability:begin -->`` and ``<!-- stability:end -->`` of
docs/results.md. It trains nothing and reads nothing but the run JSON files.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics

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


def failed(run: dict) -> bool:
    """The registered failure rule (the first study's "degenerate run"): predictions all one class,
    or the main metric within 1 point of the majority-class rate of the evaluated set, or below it."""
    counts = run["epochs"][-1].get("predicted_per_class")
    if counts is not None and sum(1 for c in counts if c) <= 1:
        return True
    labels = run.get("evaluation_label_counts")
    return bool(labels) and run["final"][METRIC] <= max(labels) / sum(labels) + 0.01


def setting_dir(runs_dir: str, family: str, task: str, n: int, lr: str) -> str:
    return os.path.join(runs_dir, "scan", family, f"{task}_n{n}_lr{lr}")


def load_setting(runs_dir: str, family: str, task: str, n: int, lr: str) -> list[dict]:
    runs = []
    for path in glob.glob(os.path.join(setting_dir(runs_dir, family, task, n, lr), task, "vanilla", "seed*.json")):
        with open(path) as f:
            r = json.load(f)
        if r.get("final"):
            runs.append(r)
    return sorted(runs, key=lambda r: r["config"]["seed"])


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


def summary(runs_dir: str, results_md: str) -> str:
    body = "\n\n".join(scan_table(runs_dir, fam) for fam in SCAN)
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
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=os.path.join(ROOT, "docs", "runs", "stability"))
    p.add_argument("--results", default=os.path.join(ROOT, "docs", "results.md"))
    p.add_argument("command", choices=["progress", "choice", "summary"])
    a = p.parse_args(argv)
    if a.command == "progress":
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
