"""The machine a tool runs on, and how long things take there: one module for every tool.

``cpu_name`` / ``cpu_has_bf16`` / ``device_name`` / ``environment`` describe the machine (what each result file
records beside its numbers); ``synchronize``, ``median_ms`` and ``interleaved_ms`` time code.
"""
from __future__ import annotations

import os
import platform
import subprocess
import statistics
import time
from datetime import datetime, timezone
from typing import Callable

import torch


def _cpuinfo(field: str) -> str | None:
    """The first ``field`` line of ``/proc/cpuinfo`` (Linux), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str] | None:
    """The processor's feature flags (``/proc/cpuinfo``), or None where they cannot be read."""
    flags = _cpuinfo("flags")
    return None if flags is None else set(flags.split())


def cpu_has_bf16(flags: set[str] | None = None) -> bool | None:
    """Whether the CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX); None when unknown.

    Without either, bf16 autocast takes a slow path: a MiniLM training step ran 15-16x slower than
    fp32 on an AVX2-only EPYC (docs/results.md, "bf16 on a CPU without bf16 hardware")."""
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def cpu_load() -> tuple[int, float | None]:
    """``(cores this process may run on, 1-minute load average)``; the load is None where unknown."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    return cores, load


def device_name(device) -> str:
    """The GPU's name for a CUDA device, else the CPU's model name and core count."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_name()} ({os.cpu_count()} cores)"


def source_commit() -> str | None:
    """The git commit of the lnsr source tree this runs from (``+dirty`` with local changes), if any."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if rev.returncode:
            return None
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device) -> dict:
    """Date (UTC), device name and the versions that decide the numbers."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    try:
        import transformers
        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = ""
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"), "device_name": device_name(device),
            "torch": torch.__version__, "triton": triton_version, "transformers": transformers_version,
            "commit": source_commit() or ""}


def synchronize(device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that wall time means run time."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], device="cpu", *, budget_s: float = 2.0, min_reps: int = 3,
              max_reps: int = 50) -> float:
    """Median milliseconds of ``fn()`` after one warm-up call (which also compiles): at least
    ``min_reps`` timed calls, then more while ``budget_s`` lasts, at most ``max_reps``."""
    fn()
    synchronize(device)
    times, start = [], time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def interleaved_ms(fns: dict[str, Callable[[], object]], reps: int, device="cpu") -> dict[str, tuple[float, float]]:
    """``{name: (median, min)}`` milliseconds per callable.  The callables take turns, rep by rep,
    so that load from other jobs on a shared machine hits all of them alike."""
    for f in fns.values():
        f()  # warm-up
    synchronize(device)
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            synchronize(device)
            times[k].append(time.perf_counter() - t0)
    return {k: (1e3 * statistics.median(v), 1e3 * min(v)) for k, v in times.items()}
