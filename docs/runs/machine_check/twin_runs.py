"""Is a study run reproducible on one machine? Every strength search re-runs vanilla at the chosen recipe
(`lnsr tune` trains its own vanilla arm), so each regime has up to three pairs of runs with the same command
and seed: the recipe search's and the strength search's. This compares them epoch by epoch (held-out
metrics, train loss, predictions per class) and prints a markdown table; run from the repository root:
    python docs/runs/machine_check/twin_runs.py [STUDY_RUNS]     (default docs/runs/study)"""
import glob
import json
import os
import sys

RUNS = sys.argv[1] if len(sys.argv) > 1 else "docs/runs/study"


def load(path):
    with open(path) as f:
        return json.load(f)


print("| regime | seed | machine (recipe run / strength run) | precision | epochs | identical at every epoch |")
print("|---|---|---|---|---|---|")
pairs = same = 0
for regime in sorted(os.listdir(os.path.join(RUNS, "strength"))):
    for path in sorted(glob.glob(os.path.join(RUNS, "strength", regime, "*", "vanilla", "seed*.json"))):
        b = load(path)
        twins = [a for a in map(load, glob.glob(os.path.join(
            RUNS, "recipe", regime, "*", "*", "vanilla", os.path.basename(path)))) if a["config"] == b["config"]]
        if not twins:
            continue
        a = twins[0]
        equal = len(a["epochs"]) == len(b["epochs"]) and all(
            x[k] == y[k] for x, y in zip(a["epochs"], b["epochs"]) for k in ("metrics", "train_loss", "predicted_per_class"))
        pairs += 1
        same += equal
        print(f"| {regime} | {b['config']['seed']} | {a.get('device', 'unknown machine')} / {b.get('device', 'unknown machine')} | {b['config']['precision']} | "
              f"{len(b['epochs'])} | {'yes' if equal else 'NO'} |")
print(f"\n{same} of {pairs} twin pairs identical")
