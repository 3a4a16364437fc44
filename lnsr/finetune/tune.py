"""``lnsr tune``: choose LNSR's options on a fixed held-out part of the training data.

A grid over LNSR options (default ``lam`` in {0.001, 0.003, 0.01}, centred on LNSR's default)
runs over a few seeds beside ``vanilla`` and the ``lam = 0`` control (the same doubled forward and dropout handling, no
penalty; one control per setting of the non-``lam`` axes), so the table shows whether the penalty
itself helps. The arms are ranked by the mean of one metric on the held-out part; the best LNSR
options go to ``best.json``, which ``lnsr finetune --method lnsr:@best.json`` reuses, with a
recommendation (use / leave off / undecided) read from paired intervals over seeds. Validation,
evaluation and test files are never opened.
"""
from __future__ import annotations

import datetime
import itertools
import math
import os
import sys

import numpy as np

# Centred on LNSRConfig's default lam (0.003), about half a decade either side (a test checks the centre).
DEFAULT_GRID = ("lam=0.001,0.003,0.01",)


def parse_grid(items) -> dict:
    """``["lam=0.003,0.01", "inject_at=0,3"]`` -> ``{"lam": ["0.003", "0.01"], "inject_at": ["0", "3"]}``.

    Axis names and values are checked by ``LNSRConfig``'s schema (its ``spec`` options) before
    anything runs; the values stay text (they name the arms: ``lnsr_lam0.003``)."""
    from ..config import LNSRConfig

    axes = LNSRConfig.spec_names()
    grid = {}
    for item in items:
        key, eq, values = item.partition("=")
        key = key.strip().replace("-", "_")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not eq or not vals:
            raise SystemExit(f"--grid {item!r}: expected KEY=V1,V2,... (e.g. lam=0.003,0.01 inject_at=0,3)")
        if key not in axes:
            raise SystemExit(f"--grid {item!r}: {key!r} is not an LNSR option; choose from {', '.join(axes)}")
        for v in vals:
            try:
                LNSRConfig.parse_value(key, v)
            except ValueError as exc:
                raise SystemExit(f"--grid {item!r}: {exc}") from None
        if key in grid:
            raise SystemExit(f"--grid names {key!r} twice")
        if len(set(vals)) != len(vals):
            raise SystemExit(f"--grid {item!r} repeats a value")
        grid[key] = vals
    return grid


def grid_specs(grid: dict) -> tuple[list, dict]:
    """Method specs of every grid point, and ``{grid label: control spec}`` (``lam = 0`` at the same
    values of the other axes)."""
    keys = list(grid)
    points, controls = [], {}
    for combo in itertools.product(*(grid[k] for k in keys)):
        items = list(zip(keys, combo))
        spec = "lnsr:" + ",".join(f"{k}={v}" for k, v in items)
        others = [(k, v) for k, v in items if k != "lam"]
        control = "lnsr:" + ",".join(f"{k}={v}" for k, v in [("lam", "0")] + others)
        points.append(spec)
        controls[spec] = control
    return points, controls


def paired(a: dict, b: dict) -> tuple[float | None, int, int]:
    """Mean paired difference a - b over the seeds both have, and the seeds a is ahead / behind."""
    from .stats import compare

    c = compare(a, b)
    return (c["mean"], c["ahead"], c["behind"]) if c["n"] else (None, 0, 0)


def rank(results: list[dict], metric: str, specs: dict, controls: dict) -> list[dict]:
    """One row per arm, best first by the mean of ``metric``; ties keep the grid order."""
    per = {}
    for r in results:
        cfg = r["config"]
        if metric not in r["final"]:
            raise SystemExit(f"--rank-by {metric}: the runs have metrics {list(r['final'])}")
        per.setdefault(cfg["label"], {"method": cfg["method"], "options": cfg["method_options"], "scores": {}})
        per[cfg["label"]]["scores"][cfg["seed"]] = r["final"][metric]
    rows = []
    for order, (label, p) in enumerate(per.items()):
        v = np.array(list(p["scores"].values()))
        row = {"label": label, "method": p["method"], "options": p["options"], "spec": specs.get(label),
               "mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
               "per_seed": {str(s): x for s, x in p["scores"].items()}, "order": order}
        if label != "vanilla" and "vanilla" in per:
            row["vs_vanilla"] = paired(p["scores"], per["vanilla"]["scores"])
        ctl = controls.get(label)
        if ctl and ctl in per and ctl != label:
            row["control"] = ctl
            row["vs_control"] = paired(p["scores"], per[ctl]["scores"])
        rows.append(row)
    rows.sort(key=lambda r: (-r["mean"], r["order"]))
    return rows


def all_tie(rows: list[dict]) -> bool:
    """Every arm has the same mean (e.g. all at 100%): the order is then the grid's, not a result."""
    return len(rows) > 1 and all(math.isclose(r["mean"], rows[0]["mean"], rel_tol=0.0, abs_tol=1e-12) for r in rows)


def _finite(c: dict) -> dict:
    """A ``stats.compare`` result that JSON can carry (NaN -> None)."""
    def clean(v):
        if isinstance(v, list):
            return [clean(x) for x in v]
        return None if isinstance(v, float) and v != v else v

    return {k: clean(v) for k, v in c.items()}


def recommend(rows: list[dict], best: dict | None) -> dict | None:
    """Whether the held-out runs support switching LNSR on, from paired statistics over seeds.

    The penalty is judged against its own ``lam = 0`` control (same forward and dropout handling),
    LNSR as a whole against vanilla. ``use``: the best arm is ahead of both with 95% intervals above
    0. ``leave off``: it is not ahead of its control on average. ``undecided``: anything between,
    e.g. ahead on average but within the seed-to-seed spread. The best arm is the best of several on
    these same runs, so its lead is optimistic: ``use`` needs the interval, not only the mean.
    """
    from .stats import MIN_SEEDS_FOR_READING, ci_text, compare, reading

    if best is None:
        return None
    by_label = {r["label"]: r for r in rows}

    def cmp(other):
        return compare(best["per_seed"], by_label[other]["per_seed"]) if other in by_label else None

    vc, vv = cmp(best.get("control")), cmp("vanilla")

    def fmt(c, what):
        ci = ci_text(c)
        ci = f" {ci}" if ci else " (one seed: no interval)"
        return f"{100 * c['mean']:+.2f}{ci} against {what} ({c['ahead']} of {c['n']} seeds ahead)"

    def ahead(c):  # its 95% interval lies above 0
        return c is not None and reading(c) == "ahead"

    numbers = f"{best['label']}: " + "; ".join(fmt(c, w) for c, w in ((vc, "its lam=0 control"), (vv, "vanilla"))
                                              if c is not None and c["n"])
    if vc is None or not vc["n"]:
        decision, why = "undecided", "its lam=0 control has no finished run on the same seeds"
    elif vc["mean"] <= 0:
        decision, why = "leave off", "the penalty did not help on the held-out split (not ahead of its control)"
    elif vc["n"] < MIN_SEEDS_FOR_READING:  # one seed has no interval, two no usable one (stats.reading)
        decision, why = "undecided", (f"{'one seed gives no interval' if vc['n'] == 1 else 'two seeds cannot tell'}: "
                                      f"run --seeds 1 2 3 (or more)")
    elif ahead(vc) and (vv is None or ahead(vv)):
        decision, why = "use", "ahead of its control" + (" and of vanilla" if vv else "") + " beyond the seed spread"
    elif ahead(vc):
        decision, why = "undecided", ("ahead of its control beyond the seed spread, but not clearly ahead of "
                                      "vanilla: the penalty helps, LNSR as a whole may not")
    else:
        decision, why = "undecided", ("ahead on average, but within the seed-to-seed spread; the best of several "
                                      "arms looks better than it is: more seeds (--seeds) would tell, and until "
                                      "then plain fine-tuning costs less")
    return {"decision": decision, "vs_control": None if vc is None else _finite(vc),
            "vs_vanilla": None if vv is None else _finite(vv),
            "text": f"recommendation: {decision} — {why}. {numbers} (95% t-intervals, paired by seed)."}


def table(rows: list[dict], metric: str, split: str) -> str:
    def diff(t):
        return "-" if not t or t[0] is None else f"{100 * t[0]:+.2f} ({t[1]}/{t[2]})"

    lines = [f"### lnsr tune: {metric} on {split} (x100), mean over seeds, best first", "",
             "| rank | arm | mean | std | per seed | vs vanilla (ahead/behind) | vs lam=0 control (ahead/behind) |",
             "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        per = ", ".join(f"s{s}:{100 * v:.2f}" for s, v in r["per_seed"].items())
        lines.append(f"| {i} | {r['label']} | {100 * r['mean']:.2f} | {100 * r['std']:.2f} | {per} | "
                     f"{diff(r.get('vs_vanilla'))} | {diff(r.get('vs_control'))} |")
    return "\n".join(lines) + "\n"


def add_tune_args(p) -> None:
    from ..config import LNSRConfig
    from .cli import add_finetune_args

    add_finetune_args(p, tune=True)
    g = p.add_argument_group("search")
    g.add_argument("--grid", nargs="+", default=list(DEFAULT_GRID), metavar="KEY=V1,V2",
                   help=f"LNSR option axes ({', '.join(LNSRConfig.spec_names())}); every combination is an arm "
                        f"(e.g. lam=0.003,0.01 inject_at=0,3 noise=relative)")
    g.add_argument("--rank-by", default=None, metavar="METRIC",
                   help="metric that ranks the arms (default: the task's main metric)")
    g.add_argument("--best-file", default=None,
                   help="where the chosen options go (default: OUTPUT_DIR/<task>/best.json)")
    p.set_defaults(holdout=0.2, output_dir="runs/tune")


def tune_main(args) -> dict:
    """Run ``lnsr tune``; returns ``{task: best.json content}``."""
    from ..config import LNSRConfig
    from .cli import check_common_args, parse_methods
    from .report import write_summary
    from .runner import plan_job, prepare_tasks, run_task, write_json

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    check_common_args(args)
    if not args.holdout or not 0 < args.holdout < 1:
        raise SystemExit(f"lnsr tune chooses on held-out training data: --holdout must be in (0, 1), got "
                         f"{args.holdout}")
    grid = parse_grid(args.grid)
    points, controls = grid_specs(grid)
    specs = ["vanilla"] + list(dict.fromkeys(list(controls.values()) + points))
    methods = parse_methods(specs, args)
    label_of = dict(zip(specs, (m[0] for m in methods)))
    spec_of = {label: spec for spec, label in label_of.items()}
    control_of = {label_of[p]: label_of[c] for p, c in controls.items()}
    if len(args.seeds) < 2:
        log("lnsr tune: one seed ranks nothing reliably (seed-to-seed spread is often larger than the effect); "
            "use --seeds 1 2 3")
    out = {}
    preps = prepare_tasks(args, log, search=True)
    for prep in preps:
        metric = args.rank_by or prep.spec.metrics[0]
        if metric not in prep.spec.metrics:
            raise SystemExit(f"--rank-by {metric!r}: {prep.spec.name} has metrics {list(prep.spec.metrics)}")
    job = plan_job(preps, args, methods, log)  # a record of other options or data in the way stops it here
    for prep in preps:
        metric = args.rank_by or prep.spec.metrics[0]
        results = run_task(prep, args, methods, log=log, job=job)
        task_dir = os.path.join(args.output_dir, prep.spec.name)
        if not results:
            log(f"[{prep.spec.name}] no finished runs to rank")
            continue
        write_summary(prep.spec.name, results, prep.spec.metrics, task_dir, log=log)
        rows = rank(results, metric, spec_of, control_of)
        text = table(rows, metric, prep.eval_split)
        lnsr_rows = [r for r in rows if r["method"] == "lnsr" and r["label"] not in control_of.values()]
        tied = all_tie(rows)
        # a tie has no best arm: naming the first in grid order would recommend options the data did not choose
        best = lnsr_rows[0] if lnsr_rows and not tied else None
        complete = all(len(r["per_seed"]) == len(args.seeds) for r in rows) and len(rows) == len(methods)
        verdict = ""
        if tied:
            verdict = (f"no ranking: the arms tie ({metric} {100 * rows[0]['mean']:.2f} for each of the {len(rows)} "
                       f"arms on {prep.eval_split}); no LNSR options are chosen or recommended. More held-out data "
                       f"(a larger --holdout) or a harder task could separate them")
        if best is not None:
            vv, vc = best.get("vs_vanilla"), best.get("vs_control")
            verdict = (f"best LNSR arm: {best['label']} ({metric} {100 * best['mean']:.2f}); "
                       f"vs vanilla {100 * vv[0]:+.2f}" if vv and vv[0] is not None else
                       f"best LNSR arm: {best['label']} ({metric} {100 * best['mean']:.2f})")
            if vc and vc[0] is not None:
                verdict += f", vs its lam=0 control {100 * vc[0]:+.2f}"
            if rows[0]["label"] != best["label"]:
                verdict += f"; note: {rows[0]['label']} ranks first overall"
            peers = [r["label"] for r in lnsr_rows[1:] if all_tie([best, r])]
            if peers:
                verdict += f"; tied with {', '.join(peers)} (the grid order put it first, not the scores)"
        advice = recommend(rows, best)
        record = {
            "task": prep.spec.name, "metric": metric, "split": prep.eval_split, "seeds": list(args.seeds),
            "grid": grid, "complete": complete, "tie": tied, "data": prep.source,
            # best.options through LNSRConfig's JSON form: checked, and read back by from_json / lnsr:@best.json
            "best": None if best is None else {k: LNSRConfig.make(best[k]).to_json(names=best[k]) if k == "options"
                                               else best[k] for k in ("method", "label", "options", "mean", "std",
                                                                      "per_seed")},
            "ranking": [{k: v for k, v in r.items() if k != "order"} for r in rows],
            "verdict": verdict,
            "recommendation": advice,
            "created": datetime.datetime.now().isoformat(timespec="seconds"),
            "note": "chosen on held-out training data; validation, evaluation and test files were not read",
        }
        path = args.best_file or os.path.join(task_dir, "best.json")
        write_json(path, record)
        advice_text = advice["text"] if advice else ""
        with open(os.path.join(task_dir, "tune.md"), "w") as f:
            f.write(text + "\n" + verdict + "\n\n" + advice_text + "\n")
        print(text)
        print(verdict)
        print(advice_text)
        reused = job.reused_text(prep.spec.name)
        if reused:
            print(reused)
        if not complete:
            print("(incomplete: some arms or seeds have not finished; the ranking covers what has)")
        print(f"-> {path}  (reuse: lnsr finetune ... --method vanilla lnsr:@{path})" if best is not None else
              f"-> {path}  (no 'best' entry: nothing to reuse)")
        out[prep.spec.name] = record
    return out
