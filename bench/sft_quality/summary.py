"""Tables of bench/sft_quality (issue #35, item 4): the tune stage, the chosen lam, the finals and
their paired intervals, from the run records in docs/runs/sft_quality/{tune,final}/.

    python bench/sft_quality/summary.py            # print the docs section (markdown)
    python bench/sft_quality/summary.py --choose   # print the lam the protocol's rule chooses (run.sh)
    python bench/sft_quality/summary.py --write    # put the section into docs/results.md (between markers)
    python bench/sft_quality/summary.py --check    # exit 1 when docs/results.md's section is not the records'

The rule (bench/sft_quality/run.sh, written before the runs): over the LNSR arms of the tune stage,
the highest held-out label-word accuracy (mean over the tune seeds), ties broken by the lower
held-out loss, then by the smaller lam.  Paired differences over the final seeds use lnsr's own
statistics (``compare``: the paired t 95% interval; ``reading``).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys

from lnsr.finetune.stats import compare, reading

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNS = "docs/runs/sft_quality"
DOC = "docs/results.md"
BEGIN, END = "<!-- sft_quality:begin -->", "<!-- sft_quality:end -->"
ACC, LOSS = "label_word_accuracy", "heldout_loss"
PAIRS = (("lnsr", "control"), ("lnsr", "vanilla"), ("control", "vanilla"))


# -- records ----------------------------------------------------------------------------------------
def load(folder: str) -> list[dict]:
    """The run records (``sft_lora_*.json``) of ``folder``, by file name; none when it is missing."""
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "sft_lora_*.json"))):
        with open(path, encoding="utf-8") as f:
            out.append(json.load(f))
    return out


def arm(record: dict) -> tuple[str, float | None]:
    """``(method, lam)``: lam is None for vanilla, 0.0 for the control."""
    cfg = record["config"]
    method = cfg["method"]
    return method, (None if method == "vanilla" else float(cfg["lnsr"]["lam"]))


def arm_label(method: str, lam: float | None) -> str:
    return {"vanilla": "vanilla", "control": "control (lam 0)"}.get(method) or f"LNSR lam {lam:g}"


def _mean(xs):
    return sum(xs) / len(xs)


def tune_rows(records: list[dict]) -> list[dict]:
    """One row per arm: the held-out accuracy and loss after training, means over its seeds;
    vanilla, control, then LNSR by lam."""
    groups: dict = {}
    for r in records:
        groups.setdefault(arm(r), []).append(r)
    order = {"vanilla": 0, "control": 1, "lnsr": 2}
    rows = []
    for (method, lam), rs in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1] or 0.0)):
        rs = sorted(rs, key=lambda r: r["config"]["seed"])
        rows.append({"method": method, "lam": lam, "label": arm_label(method, lam),
                     "seeds": [r["config"]["seed"] for r in rs],
                     "acc": _mean([r["metrics"]["after"][ACC] for r in rs]),
                     "loss": _mean([r["metrics"]["after"][LOSS] for r in rs]),
                     "train_s": _mean([r["time_s"]["train"] for r in rs]),
                     "wall_s": _mean([r["time_s"]["wall"] for r in rs]),
                     "penalty": _mean([r["metrics"]["lnsr_penalty_mean"] for r in rs])
                     if method != "vanilla" else None})
    return rows


def choose(rows: list[dict]) -> dict:
    """The protocol's rule over the LNSR rows: highest accuracy, then lower loss, then smaller lam.
    Accuracies are compared rounded to 9 decimals (a mean of counts / n: float noise is not a win)."""
    lnsr = [r for r in rows if r["method"] == "lnsr"]
    if not lnsr:
        raise SystemExit(f"no LNSR run in the tune records ({RUNS}/tune): run `bash bench/sft_quality/run.sh tune`")
    return min(lnsr, key=lambda r: (-round(r["acc"], 9), r["loss"], r["lam"]))


def final_table(records: list[dict]) -> tuple[dict, float | None]:
    """``({method: {seed: (accuracy, loss, train s)}}, the LNSR arm's lam)``."""
    table: dict = {}
    lams = set()
    for r in records:
        method, lam = arm(r)
        if method == "lnsr":
            lams.add(lam)
        m = r["metrics"]["after"]
        table.setdefault(method, {})[r["config"]["seed"]] = (m[ACC], m[LOSS], r["time_s"]["train"])
    if len(lams) > 1:
        raise SystemExit(f"the final records hold LNSR at several lam ({sorted(lams)}); the protocol has one")
    return table, (lams.pop() if lams else None)


def paired(table: dict) -> list[dict]:
    """Paired differences ``a - b`` over the seeds both arms have: accuracy (points, x100) and loss."""
    out = []
    for a, b in PAIRS:
        if a not in table or b not in table:
            continue
        c_acc = compare({s: 100 * v[0] for s, v in table[a].items()}, {s: 100 * v[0] for s, v in table[b].items()})
        c_loss = compare({s: v[1] for s, v in table[a].items()}, {s: v[1] for s, v in table[b].items()})
        if c_acc.get("n"):
            out.append({"a": a, "b": b, "acc": c_acc, "loss": c_loss})
    return out


def baseline(records: list[dict]) -> dict | None:
    """The scores before training (the pre-trained model; LoRA's update starts at zero)."""
    for r in records:
        if r["metrics"].get("before"):
            return {"acc": r["metrics"]["before"][ACC], "loss": r["metrics"]["before"][LOSS],
                    "n": r["config"]["n_eval"], "set": r["config"].get("eval_set")}
    return None


# -- markdown ---------------------------------------------------------------------------------------
NAMES = {"lnsr": "LNSR", "control": "control", "vanilla": "vanilla"}


def _ci(c: dict, scale: str) -> str:
    lo, hi = c.get("ci95", (math.nan, math.nan))
    if not (c.get("n", 0) >= 2 and math.isfinite(lo)):
        return "-"
    return f"[{lo:+.2f}, {hi:+.2f}]" if scale == "points" else f"[{lo:+.4f}, {hi:+.4f}]"


def section(runs: str = RUNS) -> str:
    """The docs section, with its markers, from the records under ``runs`` (a path from the repository
    root, or absolute)."""
    folder = runs if os.path.isabs(runs) else os.path.join(ROOT, runs)
    tune, final = load(os.path.join(folder, "tune")), load(os.path.join(folder, "final"))
    everything = tune + final
    if not everything:
        raise SystemExit(f"no run records under {runs}/tune or {runs}/final")
    cfg = everything[0]["config"]
    dates = sorted(r["date"] for r in everything)
    machine = everything[0].get("machine", {})
    v = everything[0].get("versions", {})
    L = [BEGIN, "## Exploratory: LoRA SFT of SmolLM2-135M (issue #35)", "",
         f"**Exploratory**, not a study: one task, one small training size, {len({r['config']['seed'] for r in final})} "
         f"seeds. Generated by `python bench/sft_quality/summary.py --write` from the records in `{RUNS}/`; the "
         f"protocol, written before the runs, heads `bench/sft_quality/run.sh`.", "",
         f"- Task: `examples/sft_lora.py`, LoRA (r {cfg['lora_r']}, q/v) SFT of the packaged SmolLM2-135M on SST-2 as "
         f"instructions, {cfg['n_train']} training sentences (drawn by the seed), {cfg['optimizer_steps']} steps of "
         f"{cfg['batch_size']}, lr {cfg['lr']:g}; LNSR with normalize {cfg['normalize']}, sigma {cfg['sigma']:g}, "
         f"inject_at {cfg['inject_at']}.",
         "- Arms: vanilla (TRL's SFTTrainer), control (LNSRSFTTrainer with lam = 0: the noisy doubled forward, "
         "no penalty), LNSR.",
         "- Tune: seed(s) " + ", ".join(str(s) for s in sorted({r['config']['seed'] for r in tune}))
         + f", a fixed 20% of train.tsv held out ({tune[0]['config']['n_eval'] if tune else '-'} of it scored), "
         "dev not read; lam grid as below; rule: highest held-out label-word accuracy, then lower held-out loss, "
         "then smaller lam.",
         f"- Final: seeds 1-3 x 3 arms, scored on a fixed {final[0]['config']['n_eval'] if final else '-'} of the "
         "872 SST-2 dev sentences; label-word accuracy (the label word with the higher log-probability).",
         "- Paired differences over the seeds with the paired t 95% interval (`lnsr.finetune.stats.compare`); "
         "with 3 seeds (2 degrees of freedom, t = 4.30) the intervals are wide.", "",
         f"Machine: {machine.get('device_name', '?')}, one torch thread, shared with another experiment; torch "
         f"{v.get('torch')}, transformers {v.get('transformers')}, TRL {v.get('trl')}, PEFT {v.get('peft')}; runs "
         f"{dates[0]} to {dates[-1]}.", ""]

    if tune:
        rows = tune_rows(tune)
        best = choose(rows)
        base = baseline(tune)
        L += ["### Tune (held-out training data)", "",
              "| arm | seeds | held-out accuracy | held-out loss | mean P | train s |", "|---|---|---|---|---|---|"]
        if base:
            L.append(f"| before training | - | {100 * base['acc']:.2f} | {base['loss']:.4f} | - | - |")
        for r in rows:
            pen = "-" if r["penalty"] is None else f"{r['penalty']:.2f}"
            mark = " (chosen)" if r is best else ""
            L.append(f"| {r['label']}{mark} | {','.join(map(str, r['seeds']))} | {100 * r['acc']:.2f} | "
                     f"{r['loss']:.4f} | {pen} | {r['train_s']:.0f} |")
        L += ["", f"Chosen by the rule: **lam = {best['lam']:g}**.", ""]

    if final:
        table, lam = final_table(final)
        base = baseline(final)
        seeds = sorted({s for arm_ in table.values() for s in arm_})
        arms_ = [m for m in ("vanilla", "control", "lnsr") if m in table]
        heads = [arm_label(m, lam) for m in arms_]
        L += ["### Final (SST-2 dev subset): label-word accuracy (x100) / held-out loss per seed", "",
              "| seed | " + " | ".join(heads) + " |", "|---|" + "---|" * len(arms_)]
        if base:
            # one model before training (LoRA's update starts at zero): the same for every arm and seed
            L.append(f"| before training (every arm) | {100 * base['acc']:.2f} / {base['loss']:.4f} |"
                     + " |" * (len(arms_) - 1))
        for s in seeds:
            cells = [f"{100 * table[m][s][0]:.2f} / {table[m][s][1]:.4f}" if s in table[m] else "-" for m in arms_]
            L.append(f"| {s} | " + " | ".join(cells) + " |")
        means = [f"{_mean([100 * v[0] for v in table[m].values()]):.2f} / {_mean([v[1] for v in table[m].values()]):.4f}"
                 for m in arms_]
        L.append("| mean | " + " | ".join(means) + " |")
        trains = [f"{_mean([v[2] for v in table[m].values()]):.0f}" for m in arms_]
        L += ["| train s (mean) | " + " | ".join(trains) + " |", ""]
        pairs = paired(table)
        if pairs:
            L += ["| difference | seeds | accuracy, points | 95% interval | held-out loss | 95% interval | reading "
                  "(accuracy) |", "|---|---|---|---|---|---|---|"]
            for p in pairs:
                a, l_ = p["acc"], p["loss"]
                L.append(f"| {NAMES[p['a']]} - {NAMES[p['b']]} | {a['n']} | {a['mean']:+.2f} | {_ci(a, 'points')} | "
                         f"{l_['mean']:+.4f} | {_ci(l_, 'loss')} | {reading(a)} |")
            L += ["", "Reading: " + reading_sentence(pairs, lam, base, table), ""]
    L.append(END)
    return "\n".join(L) + "\n"


def reading_sentence(pairs: list[dict], lam, base: dict | None = None, table: dict | None = None) -> str:
    """The reading, no stronger than the intervals: accuracy differences, the held-out loss where its
    interval excludes 0, the control against vanilla, and where the arms stand against the model
    before training."""
    parts = []
    for p in pairs:
        a = p["acc"]
        parts.append(f"{NAMES[p['a']]} - {NAMES[p['b']]} {a['mean']:+.2f} points {_ci(a, 'points')} "
                     f"({reading(a)})")
    n = max(p["acc"]["n"] for p in pairs)
    out = (f"on label-word accuracy, with LNSR at lam {lam:g}: " + "; ".join(parts)
           + f". With {n} seeds the intervals are wide: one that holds 0 detects no effect and excludes only "
             "effects beyond its ends; exploratory evidence, no more.")
    for p in pairs:
        lo, hi = p["loss"].get("ci95", (math.nan, math.nan))
        if p["a"] == "lnsr" and p["loss"].get("n", 0) >= 3 and math.isfinite(lo) and (lo > 0 or hi < 0):
            out += (f" The held-out loss of LNSR is {'higher' if lo > 0 else 'lower'} than {NAMES[p['b']]}'s by "
                    f"{p['loss']['mean']:+.4f} {_ci(p['loss'], 'loss')}, small beside the loss itself.")
            break  # against the control (the first pair); vanilla's reads alike or is in the table
    cv = next((p for p in pairs if (p["a"], p["b"]) == ("control", "vanilla")), None)
    if cv and cv["acc"].get("n", 0) >= 2 and all(abs(x) < 1e-9 for x in _diffs(table, "control", "vanilla")):
        out += (" The control's accuracy equals vanilla's on every seed: the noisy doubled forward without the "
                "penalty changes nothing measurable here, so LNSR - control and LNSR - vanilla coincide.")
    if base and table:
        means = {m: _mean([v[0] for v in table[m].values()]) for m in table}
        if all(v < base["acc"] for v in means.values()):
            out += (f" Every arm ends below the model before training ({100 * base['acc']:.2f}): at "
                    f"this training size the fine-tuning lowers label-word accuracy while the held-out loss falls "
                    f"(from {base['loss']:.2f}), so the comparison is one of arms that all lose accuracy.")
    return out


def _diffs(table: dict | None, a: str, b: str) -> list[float]:
    if not table or a not in table or b not in table:
        return [math.nan]
    return [table[a][s][0] - table[b][s][0] for s in table[a] if s in table[b]]


# -- the document -----------------------------------------------------------------------------------
def replace_section(text: str, new: str) -> str:
    """``text`` with its marked section replaced by ``new`` (appended at the end when it has none)."""
    if BEGIN in text:
        i, j = text.index(BEGIN), text.index(END, text.index(BEGIN)) + len(END)
        return text[:i] + new.rstrip("\n") + text[j:]
    return text.rstrip("\n") + "\n\n" + new


def current_section(text: str) -> str | None:
    if BEGIN not in text:
        return None
    i = text.index(BEGIN)
    return text[i:text.index(END, i) + len(END)] + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=RUNS, help=f"the records' folder (default {RUNS})")
    p.add_argument("--doc", default=DOC, help=f"the document with the section (default {DOC})")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--choose", action="store_true", help="print the lam the rule chooses from the tune records")
    g.add_argument("--write", action="store_true", help="write the section into --doc (between its markers)")
    g.add_argument("--check", action="store_true", help="exit 1 when --doc's section differs from the records'")
    args = p.parse_args(argv)
    folder = args.runs if os.path.isabs(args.runs) else os.path.join(ROOT, args.runs)
    if args.choose:
        print(f"{choose(tune_rows(load(os.path.join(folder, 'tune'))))['lam']:g}")
        return 0
    new = section(args.runs)
    doc = args.doc if os.path.isabs(args.doc) else os.path.join(ROOT, args.doc)
    if args.write:
        with open(doc, encoding="utf-8") as f:
            text = f.read()
        with open(doc, "w", encoding="utf-8") as f:
            f.write(replace_section(text, new))
        print(f"{args.doc}: section {BEGIN} written")
        return 0
    if args.check:
        with open(doc, encoding="utf-8") as f:
            have = current_section(f.read())
        if have != new:
            print(f"{args.doc}: the sft_quality section is {'missing' if have is None else 'out of date'}; "
                  f"run python bench/sft_quality/summary.py --write", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
