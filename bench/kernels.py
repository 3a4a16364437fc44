"""Kernel microbenchmark (perturb, layer_penalty): see lnsr/benchmarks/kernels_script.py.

    python bench/kernels.py --device cpu --quick
"""
import runpy

if __name__ == "__main__":
    runpy.run_module("lnsr.benchmarks.kernels_script", run_name="__main__", alter_sys=True)
