"""Summaries over seeds: a Markdown table (also printed) and a PNG of the per-seed scores."""
from __future__ import annotations

import os

import numpy as np


def epochs_seconds(epochs: list[dict]) -> float:
    """The train and eval seconds of a run's finished epochs (a lower bound of what they cost)."""
    return sum(e.get("train_time_s", 0.0) + e.get("eval_time_s", 0.0) for e in epochs)


def run_seconds(record: dict) -> float | None:
    """What a finished run cost in seconds: its ``wall_time_s``. Records written before runs counted
    the time of the processes they resumed from hold only the last process's wall time; for those
    ``epochs_seconds`` is the better (lower) bound. None if unrecorded."""
    if "wall_time_s" not in record:  # absent from hand-made records
        return None
    return max(record["wall_time_s"], epochs_seconds(record.get("epochs", [])))


def summarize(results: list[dict]) -> dict:
    """``{label: {"seeds": [...], "metrics": {name: [final values in seed order]}, "wall": [...], ...}}``.

    Scores are the last epoch's (no selection of the best epoch on the evaluation split).
    """
    out: dict = {}
    for r in results:
        cfg = r["config"]
        s = out.setdefault(cfg["label"], {"seeds": [], "metrics": {}, "wall": [], "ratio": [],
                                          "eval_split": cfg.get("eval_split", "dev")})
        s["seeds"].append(cfg["seed"])
        wall = run_seconds(r)
        if wall is not None:
            s["wall"].append(wall)
        last = r["epochs"][-1]
        if "penalty_task_ratio" in last:
            s["ratio"].append(last["penalty_task_ratio"])
        for k, v in r["final"].items():
            s["metrics"].setdefault(k, []).append(v)
        for name, metrics in r.get("eval_sets", {}).items():  # extra evaluation sets: "name:metric"
            for k, v in metrics.items():
                s["metrics"].setdefault(f"{name}:{k}", []).append(v)
    return out


def metric_names_of(results: list[dict], metric_names) -> list:
    """The task's metrics, then each extra evaluation set's (``name:metric``) in first-seen order."""
    names = list(metric_names)
    for r in results:
        for set_name, metrics in r.get("eval_sets", {}).items():
            names += [f"{set_name}:{k}" for k in metrics if f"{set_name}:{k}" not in names]
    return names


def stats(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    # sample standard deviation (ddof=1) over seeds; 0 for a single seed
    return {"n": len(v), "mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "max": float(v.max()), "min": float(v.min())}


def markdown_table(task: str, summary: dict, metric_names) -> str:
    """Scores x100 (GLUE's convention), 2 decimals; mean wall time per run in seconds."""
    splits = sorted({s.get("eval_split", "dev") for s in summary.values()})
    extra = sorted({m.split(":")[0] for s in summary.values() for m in s["metrics"] if ":" in m})
    sets = f" (and the evaluation sets {', '.join(extra)}, rows NAME:metric)" if extra else ""
    lines = [f"### {task}: {' / '.join(splits)} scores at the last epoch (x100), over seeds{sets}", "",
             "| method | metric | n | mean | std | max | min | per seed | mean wall time / run (s) | "
             "lam*P/task (last epoch) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, s in summary.items():
        for m in metric_names:
            if m not in s["metrics"]:
                continue
            st = stats(s["metrics"][m])
            per = ", ".join(f"s{seed}:{100 * v:.2f}" for seed, v in zip(s["seeds"], s["metrics"][m]))
            ratio = f"{np.mean(s['ratio']):.3g}" if s["ratio"] else "-"
            wall = f"{np.mean(s['wall']):.0f}" if s["wall"] else "-"
            lines.append(f"| {label} | {m} | {st['n']} | {100 * st['mean']:.2f} | {100 * st['std']:.2f} | "
                         f"{100 * st['max']:.2f} | {100 * st['min']:.2f} | {per} | {wall} | "
                         f"{ratio} |")
    return "\n".join(lines) + "\n"


def controls_of(results: list[dict]) -> dict:
    """``{LNSR label: its lam = 0 control's label}`` where a run of LNSR with every other option the
    same and ``lam = 0`` is among the results (the arm that isolates the penalty)."""
    opts = {}
    for r in results:
        cfg = r["config"]
        if cfg.get("method") == "lnsr":
            opts[cfg["label"]] = dict(cfg.get("method_options") or {})
    rest = {label: {k: v for k, v in o.items() if k != "lam"} for label, o in opts.items()}
    return {label: ctl for label, o in opts.items() if o.get("lam")
            for ctl, c in opts.items() if c.get("lam") == 0 and rest[ctl] == rest[label]}


def paired_table(summary: dict, results: list[dict], metric: str) -> str | None:
    """Each method against vanilla, and each LNSR arm against its lam = 0 control, paired by seed:
    mean difference x100 with its 95% t-interval, paired t p, seeds ahead/behind, and what the
    interval supports. None when nothing can be paired."""
    from .stats import ci_text, compare, p_text, reading

    def scores(label):
        s = summary[label]
        return dict(zip(s["seeds"], s["metrics"].get(metric, [])))

    pairs = [(a, "vanilla") for a in summary if a != "vanilla" and "vanilla" in summary]
    pairs += [(a, c) for a, c in controls_of(results).items() if a in summary and c in summary]
    rows = []
    for a, b in pairs:
        c = compare(scores(a), scores(b))
        if not c["n"]:
            continue
        ci = ci_text(c)
        ci = f" {ci}" if ci else ""
        p = p_text(c["p_t"])
        rows.append(f"| {a} - {b} | {c['n']} | {100 * c['mean']:+.2f}{ci} | {p} | {c['ahead']}/{c['behind']} | "
                    f"{reading(c)} |")
    if not rows:
        return None
    return "\n".join([f"Paired by seed ({metric} x100): mean difference with its 95% t-interval; where the "
                      "interval includes 0 the reading is \"no measurable effect\", and with fewer than 3 paired "
                      "seeds it is \"cannot tell\":", "",
                      "| comparison | seeds | mean diff [95% CI] | paired t p | ahead/behind | reading |",
                      "|---|---|---|---|---|---|", *rows]) + "\n"


def _wrap(label: str, width: int = 22) -> str:
    lines, cur = [], ""
    for part in label.split("_"):
        piece = part if not cur else "_" + part
        if cur and len(cur) + len(piece) > width:
            lines.append(cur + "_")
            cur = part
        else:
            cur += piece
    return "\n".join(lines + [cur])


def plot(task: str, summary: dict, metric_names, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m for m in metric_names if any(m in s["metrics"] for s in summary.values())]
    fig, axes = plt.subplots(1, len(names), figsize=(1.6 + 1.6 * max(2, len(summary)) * len(names), 3.6),
                             squeeze=False)
    labels = list(summary)
    for ax, m in zip(axes[0], names):
        for i, label in enumerate(labels):
            vals = 100 * np.asarray(summary[label]["metrics"].get(m, []), dtype=np.float64)
            if not len(vals):
                continue
            x = i + np.linspace(-0.12, 0.12, len(vals)) if len(vals) > 1 else np.array([float(i)])
            ax.scatter(x, vals, s=22, zorder=3, label=None)
            st = stats(vals)
            ax.errorbar([i + 0.28], [st["mean"]], yerr=[st["std"]], fmt="D", color="k", ms=5, capsize=4, zorder=4)
        ax.set_xticks(range(len(labels)))
        # long arm labels (lnsr_lam0.01_inject_at0_noiserelative_noisy_fraction0.25) wrapped at their
        # underscores, so that neighbouring ticks do not run into each other
        ax.set_xticklabels([_wrap(label) for label in labels])
        ax.set_xlim(-0.6, len(labels) - 0.3)
        ax.set_ylabel(f"{m} (x100)")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{task}: per-seed scores (dots) and mean ± std (black)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_summary(task: str, results: list[dict], metric_names, out_dir: str, log=print, echo: bool = True) -> dict:
    """Print the table (unless ``echo`` is false), write ``summary.md`` and ``summary.png`` under ``out_dir``;
    return the summary."""
    summary = summarize(results)
    metric_names = metric_names_of(results, metric_names)
    table = markdown_table(task, summary, metric_names)
    paired = paired_table(summary, results, metric_names[0]) if metric_names else None
    if paired:
        table += "\n" + paired
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(table)
    if echo:
        print(table)
    try:
        plot(task, summary, metric_names, os.path.join(out_dir, "summary.png"))
    except ImportError:
        log("matplotlib is not installed: no summary.png (`pip install matplotlib`, lnsr[finetune])")
    return summary
