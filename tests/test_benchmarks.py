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
