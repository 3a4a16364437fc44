"""The step benchmark measures what it says (tiny model, one step per case)."""
import pytest
import torch

from lnsr.benchmarks import step


def test_run_case_reports_time_and_memory_for_each_method():
    rows = []
    for method in ("plain", "two-pass", "lnsr-torch"):
        spec = {"model": "tiny-bert", "method": method, "inject_at": -1, "device": "cpu", "batch": 2, "seq": 8,
                "steps": 2, "warmup": 1}
        r = step.run_case(spec)
        r["inject_at_spec"] = "half"
        assert r["step_s"] > 0 and r["peak_mem_mb"] > 0 and r["layers"] == 4 and r["inject_at"] == 2
        rows.append(r)
    step.add_ratios(rows)
    plain, two, reg = rows
    assert plain["vs_plain"] == 1.0
    assert reg["vs_plain"] == pytest.approx(reg["step_s"] / plain["step_s"])
    assert reg["efficiency"] == pytest.approx((reg["step_s"] - plain["step_s"]) / (plain["step_s"] * 0.5))
    assert two["speedup_vs_two_pass"] == 1.0
    table = step.format_table(rows)
    assert "two-pass" in table and "lnsr-torch" in table


def test_child_process_case_and_clear_error_for_a_missing_backend():
    spec = {"model": "tiny-bert", "method": "lnsr-nope", "inject_at": 0, "device": "cpu", "batch": 2, "seq": 8,
            "steps": 1, "warmup": 0}
    r = step._child(spec, timeout=300)
    assert "backend" in r["error"]


def test_make_batch_pads_and_labels():
    b = step.make_batch(50, 4, 16, True, torch.device("cpu"))
    assert (b["labels"][b["attention_mask"] == 0] == -100).all()
    assert b["attention_mask"].sum(1).min() >= 8


def test_baselines_are_timed_beside_lnsr():
    """Each paper baseline runs in the step benchmark (once per model: it has no injection point)."""
    rows = []
    for method in ("plain", "lnsr-torch") + step.BASELINES:
        spec = {"model": "tiny-bert", "method": method, "inject_at": 0, "device": "cpu", "batch": 2, "seq": 8,
                "steps": 1, "warmup": 1}
        r = step.run_case(spec)
        r["inject_at_spec"] = "0"
        assert r["step_s"] > 0
        rows.append(r)
    step.add_ratios(rows)
    by = {r["method"]: r for r in rows}
    for name in step.BASELINES:
        assert by[name]["vs_plain"] == pytest.approx(by[name]["step_s"] / by["plain"]["step_s"])
        assert by[name]["efficiency"] is None  # defined for LNSR's extra branch only
    assert by["lnsr-torch"]["efficiency"] is not None
    assert all(name in step.format_table(rows) for name in step.BASELINES)
    assert step.methods_for("cpu", baselines=True)[-4:] == list(step.BASELINES)


def test_run_times_a_baseline_once_per_model():
    logged = []
    rows = step.run(["tiny-bert"], batch=2, seq=8, steps=1, warmup=0, inject=("0", "half"),
                    methods=["plain", "r3f"], log=logged.append)
    assert [(r["method"], r["inject_at_spec"]) for r in rows] == [("plain", "0"), ("r3f", "0"), ("plain", "half")]
    assert "error" not in rows[1] and len(logged) == 2
