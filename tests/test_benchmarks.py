"""The benchmarks measure what they say (tiny model, one step per case), and the tools' layers
point one way (core <- tools <- scripts), run nothing at import and write where they are told."""
import ast
import os
import pathlib
import subprocess
import sys

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


def test_baselines_come_from_the_method_registry():
    """The step benchmark takes the baselines from ``lnsr.methods``, the registry the fine-tuning
    tool uses too, without importing that tool."""
    from lnsr.methods import METHODS

    for name in step.BASELINES:
        assert step.method_class(name) is METHODS[name]
    with pytest.raises(SystemExit, match="no method 'nope'"):
        step.method_class("nope")


# -- the layers of the tools: one way, nothing at import, results where the user says ----------

REPO = pathlib.Path(__file__).resolve().parent.parent


def _imports(path):
    """``{module: names}`` of a Python file's import statements (relative modules made absolute;
    ``import a.b`` gives ``{"a.b": set()}``)."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1]) if REPO / "lnsr" in path.parents else ""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out.setdefault(a.name, set())
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(parts + ([node.module] if node.module else []))
            out.setdefault(mod, set()).update(a.name for a in node.names)
    return out


def test_core_never_imports_the_tools():
    tools = ("lnsr.finetune", "lnsr.benchmarks", "lnsr.utils", "lnsr.methods", "lnsr.data")
    code = ("import sys, lnsr, lnsr.ops, lnsr.kernels, lnsr.integrations\n"
            "from lnsr.ops import dispatch\n"
            "dispatch.available_backends()\n"
            f"bad = sorted(m for m in sys.modules if m.startswith({tools!r}))\n"
            "assert not bad, bad\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


def test_benchmarks_do_not_import_finetune():
    for path in (REPO / "lnsr" / "benchmarks").glob("*.py"):
        named = {f"{m}.{n}" for m, names in _imports(path).items() for n in names} | set(_imports(path))
        assert not any(m.startswith("lnsr.finetune") for m in named), path


def test_scripts_use_the_public_api_without_path_games():
    public = {"lnsr", "lnsr.ops", "lnsr.data", "lnsr.methods", "lnsr.finetune", "lnsr.integrations",
              "lnsr.utils.machine"}
    scripts = [REPO / "examples" / "train_loop.py", REPO / "examples" / "accelerate_lora.py",
               *(REPO / "bench").glob("*.py"), REPO / "setup.py"]
    for path in scripts:
        text = path.read_text()
        assert "sys.path" not in text, path
        mods = {m for m in _imports(path) if m == "lnsr" or m.startswith("lnsr.")}
        assert mods <= public, (path, mods - public)  # names taken from a public module are fine


def test_nothing_runs_or_exits_at_import():
    """Importing a tool module with arguments it would reject prints nothing and exits with 0."""
    mods = ("lnsr.benchmarks", "lnsr.benchmarks.cli", "lnsr.benchmarks.bench_kernels", "lnsr.benchmarks.step",
            "lnsr.benchmarks.common", "lnsr.utils.machine", "lnsr.kernels.aot_check", "lnsr.benchmarks.host_overhead")
    code = "import sys; sys.argv = ['x', '--summary', '/nonexistent.csv', '--bogus']\n" + \
        "".join(f"import {m}\n" for m in mods)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout == "", res.stdout + res.stderr[-2000:]


def test_results_default_to_the_current_directory(tmp_path, monkeypatch):
    from lnsr.benchmarks import bench_kernels
    from lnsr.benchmarks import cli as bench

    assert bench_kernels.parse_args([]).csv == "kernels.csv"
    seen = {}
    monkeypatch.setattr(bench_kernels, "run_in_subprocess", lambda argv: seen.setdefault("argv", argv) and 0)
    monkeypatch.chdir(tmp_path)
    bench.main(["--only", "kernels", "--device", "cpu", "--quick"])
    assert seen["argv"][seen["argv"].index("--csv") + 1] == os.path.join(".", "kernels.csv")
    assert list(tmp_path.iterdir()) == []  # nothing else written


def test_machine_description_and_timing():
    from lnsr.utils import machine

    assert machine.cpu_name() and str(os.cpu_count()) in machine.device_name("cpu")
    env = machine.environment("cpu")
    assert env["torch"] == torch.__version__ and env["device_name"] == machine.device_name("cpu")
    calls = []
    ms = machine.median_ms(lambda: calls.append(1), "cpu", budget_s=0.0, min_reps=3)
    assert ms >= 0 and len(calls) == 4  # one warm-up, three timed
    res = machine.interleaved_ms({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=2)
    assert set(res) == {"a", "b"} and all(med >= mn >= 0 for med, mn in res.values())
    assert calls[4:] == ["a", "b", "a", "b", "a", "b"]  # warm-up, then taking turns


def test_runner_import_of_cpu_name_still_works():
    from lnsr.benchmarks.common import cpu_name
    from lnsr.utils.machine import cpu_name as shared

    assert cpu_name is shared


def test_kernel_baselines_are_user_code_and_the_reference_a_named_row():
    """The "x torch" baseline is eager PyTorch as a user writes it (torch.randn_like noise, one
    masked mean per layer), "x compile" torch.compile of it; the reference is its own row."""
    import lnsr.ops.reference as R
    from lnsr.benchmarks import bench_kernels as K

    provs = K.providers("cpu", K.parse_args(["--no-compile"]))
    assert provs["torch"] == (K.user_perturb, K.user_layer_penalty)
    assert provs["reference"] == (R.perturb, R.layer_penalty)
    assert "torch-compile" not in provs
    gen = torch.Generator().manual_seed(0)
    ys = [torch.randn(4, 5, h, generator=gen) for h in (8, 3)]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    for m in (mask, None):
        torch.testing.assert_close(K.user_layer_penalty(ys, mask=m, weights=[1.0, 0.5]),
                                   R.layer_penalty(ys, mask=m, weights=[1.0, 0.5]))
    h = torch.randn(64, 16, 256, generator=gen) * 3.0
    torch.manual_seed(0)
    out = K.user_perturb(h, 123, sigma=0.05, kind="relative")
    assert out.shape == (128, 16, 256) and torch.equal(out[:64], h)
    rel = ((out[64:] - h).pow(2).mean(-1) / h.pow(2).mean(-1)).mean().sqrt()
    assert abs(rel.item() - 0.05) < 0.002
    torch.manual_seed(0)
    assert not torch.equal(out, R.perturb(h, 123, sigma=0.05, kind="relative"))  # torch's RNG, not lnsr's stream


def test_host_overhead_table_compares_the_same_work(tmp_path, monkeypatch):
    """`lnsr bench --only host`: the ways of each op compute the same values (so the ratios
    compare like with like), and the table and CSV have one row per op with its ratios."""
    pytest.importorskip("lnsr._C")
    from lnsr.benchmarks import cli as bench
    from lnsr.benchmarks import host_overhead as H

    for op, (via_ops, direct, engine, eager) in H.cases().items():
        (a, ga), (b, gb), (c, gc), (d, gd) = via_ops(), direct(), engine(), eager()
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0, msg=op)
        torch.testing.assert_close(c, b, rtol=1e-6, atol=0, msg=op)
        assert len(ga) == len(gb) == len(gc) == len(gd) == (1 if op == "perturb" else H.N_LAYERS)
        for x, y, z in zip(ga, gb, gc):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=0, msg=op)
            torch.testing.assert_close(z, y, rtol=1e-6, atol=0, msg=op)
        if op != "perturb":  # eager torch: the same math, so the same value and gradients
            torch.testing.assert_close(d, b, rtol=1e-5, atol=0)
            for x, y in zip(gd, gb):
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
        else:  # its own RNG: the clean half and the noise's scale agree
            assert d.shape == b.shape and torch.equal(d[:H.SHAPE[0]], b[:H.SHAPE[0]])
    rows = [dict(op="layer_penalty", shape="12x[4, 8, 64]", device="cpu", us_lnsr_ops=90.0, us_direct=30.0, ratio=3.0,
                 us_engine=60.0, engine_ratio=2.0, ratio_vs_engine=1.5, us_torch_eager=900.0, us_min_autograd=20.0,
                 min_autograd_ratio=0.67, us_builtin_n=75.0, builtin_n_ratio=2.5),
            dict(op="perturb", shape="[4, 8, 64]", device="cpu", us_lnsr_ops=40.0, us_direct=20.0, ratio=2.0,
                 us_engine=32.0, engine_ratio=1.6, ratio_vs_engine=1.25, us_torch_eager=80.0, us_min_autograd=20.0,
                 min_autograd_ratio=1.0, us_builtin_n=20.0, builtin_n_ratio=1.0)]
    monkeypatch.setattr(H, "run", lambda quick=False: rows)
    monkeypatch.chdir(tmp_path)
    assert bench.main(["--only", "host", "--device", "cpu", "--quick"]) == 0
    text = (tmp_path / "host_overhead.csv").read_text()
    assert "layer_penalty" in text and "perturb" in text and "ratio" in text.splitlines()[0]
    table = H.format_table(rows)
    assert "3.00x" in table and "2.00x" in table and "direct ops" in table and "1.25x" in table
    assert "builtin, n inputs" in table and "2.50x" in table


@pytest.mark.slow
def test_host_overhead_runs():
    pytest.importorskip("lnsr._C")
    from lnsr.benchmarks import host_overhead as H

    rows = H.run(quick=True)
    assert [r["op"] for r in rows] == ["layer_penalty", "perturb", "penalty_stream"]
    assert all(r["us_direct"] > 0 and r["ratio"] > 0 for r in rows)


def test_exact_step_memory_counts_allocations_and_frees():
    """lnsr.benchmarks.memory: the profiler's allocation events give the exact peak and net bytes."""
    from lnsr.benchmarks import memory

    def step():
        a = torch.empty(1 << 20, dtype=torch.float32)   # 4 MiB
        b = torch.empty(1 << 19, dtype=torch.float32)   # 2 MiB, both alive: peak 6 MiB
        del a, b
        c = torch.empty(1 << 18, dtype=torch.float32)   # 1 MiB, returned alive
        step.kept = c

    peak, end = memory.peak_step_bytes(step)
    assert peak == 6 * 2**20 and end == 2**20


def test_memory_benchmark_rows_and_table():
    from lnsr.benchmarks import memory

    rows = memory.measure("tiny-bert", batch=2, seq=16)
    assert [(r["method"], r["inject_at"]) for r in rows] == memory.cases(4)
    assert all(r["peak_mb"] > 0 and r["layer_grad_mb"] == 2 * 2 * 16 * 128 * 4 / 2**20 for r in rows)
    table = memory.format_table(rows)
    assert table.count("tiny-bert") == 2 and "lnsr/2pass" in table
