"""Kernel microbenchmark entry point: runs ``kernels_script`` in a process of its own (it must set
TRITON_INTERPRET before any kernel module is imported)."""
import subprocess
import sys


def main(argv=None) -> int:
    cmd = [sys.executable, "-m", "lnsr.benchmarks.kernels_script", *(argv or [])]
    return subprocess.run(cmd).returncode
