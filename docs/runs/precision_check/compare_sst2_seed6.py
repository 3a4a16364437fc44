"""bf16 (Intel Xeon, AMX) against fp32 (AMD EPYC, AVX2) for the four sst2-1k final arms of seed 6
that ran in both (docs/results.md, "the precision check"). Prints the markdown table; run from the
repository root: python docs/runs/precision_check/compare_sst2_seed6.py"""
import json
import os

BF16 = "docs/runs/precision_check/sst2-1k_final_seed6_bf16_xeon/sst2"
FP32 = "docs/runs/study/final/sst2-1k/sst2"

print("| arm | bf16 (Xeon) | fp32 (EPYC) | fp32 - bf16 | largest gap at any epoch (dev sentences) |")
print("|---|---|---|---|---|")
final = {}
for arm in sorted(os.listdir(BF16)):
    runs = []
    for root in (BF16, FP32):
        with open(os.path.join(root, arm, "seed6.json")) as f:
            runs.append(json.load(f))
    a, b = runs
    assert (a["config"]["precision"], b["config"]["precision"]) == ("bf16", "fp32")
    n = sum(a["evaluation_label_counts"])
    gap = max(abs(x["metrics"]["accuracy"] - y["metrics"]["accuracy"]) for x, y in zip(a["epochs"], b["epochs"]))
    final[arm] = (a["final"]["accuracy"], b["final"]["accuracy"])
    print(f"| {arm} | {100 * a['final']['accuracy']:.2f} | {100 * b['final']['accuracy']:.2f} | "
          f"{100 * (b['final']['accuracy'] - a['final']['accuracy']):+.2f} | {round(gap * n)} of {n} |")
print()
print("| paired difference (seed 6) | bf16 | fp32 |")
print("|---|---|---|")
CONTROL = "lnsr_lam0_inject_at3"
for arm in final:
    for ref in ("vanilla", CONTROL):
        if arm not in ("vanilla", ref):
            print(f"| {arm} - {ref} | {100 * (final[arm][0] - final[ref][0]):+.2f} | "
                  f"{100 * (final[arm][1] - final[ref][1]):+.2f} |")
