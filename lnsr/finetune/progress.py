"""How far a job of many runs is, and what slows it: the lines ``lnsr finetune`` prints at run starts.

Pure functions of the numbers they are given (the runner passes the machine's), so that they are
tested with made-up ones.
"""
from __future__ import annotations


def format_duration(seconds: float) -> str:
    """``45 s``, ``14 min``, ``3 h 05 min``."""
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def eta_line(k: int, total: int, what: str, walls: list[float]) -> str:
    """``[run 3 of 8] mrpc lnsr seed 2 — ETA for the job 14 min``: run ``k`` of the ``total`` this job
    trains is starting; the ETA is the mean wall time of its finished runs (``walls``) times the runs
    left, this one included. Runs differ (LNSR costs about twice vanilla), so it is a guide."""
    head = f"[run {k} of {total}] {what}"
    if not walls:
        return f"{head} — ETA after the first run"
    left = total - k + 1
    return f"{head} — ETA for the job {format_duration(sum(walls) / len(walls) * left)}"


def free_cores(cores: int, load: float) -> int:
    """Cores not busy with other work, by the load average (at least 1)."""
    return max(1, int(cores - load + 0.5))


def threads_warning(threads: int, cores: int, load: float | None) -> str | None:
    """A warning when torch's ``threads`` outnumber the cores that other work leaves free: the threads
    then wait on each other at every parallel op, and a step can take several times longer."""
    if load is None:
        return None
    free = free_cores(cores, load)
    if threads <= free:
        return None
    return (f"torch uses {threads} threads but only ~{free} of the {cores} cores are free (load average "
            f"{load:.1f}): pass --threads {free}")


def bf16_hint(precision: str, device_type: str, has_bf16: bool | None, cpu: str = "this CPU") -> str | None:
    """A hint towards ``--bf16`` when training in fp32 on a CPU with AMX or AVX-512 BF16."""
    if precision != "fp32" or device_type != "cpu" or has_bf16 is not True:
        return None
    return (f"{cpu} has AMX or AVX-512 BF16: --bf16 may train faster (bf16 autocast; the LNSR penalty stays fp32); "
            f"its scores differ slightly from fp32's, so keep one precision within a comparison")
