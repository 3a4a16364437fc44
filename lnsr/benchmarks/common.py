"""What every benchmark records beside its numbers: the machine, the versions, the date."""
from __future__ import annotations

import csv
import os
import platform
from datetime import datetime, timezone

import torch


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{cpu_name()} ({os.cpu_count()} cores)"


def environment(device: str) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    import transformers
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"), "device_name": device_name(device),
            "torch": torch.__version__, "triton": triton_version, "transformers": transformers.__version__}


def append_csv(path: str, rows: list[dict], *, kind: str) -> None:
    """Append rows (with the environment) to ``path``; columns are the union, header kept stable."""
    if not rows:
        return
    env = environment(rows[0].get("device", "cpu"))
    rows = [{"kind": kind, **env, **r} for r in rows]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    if os.path.exists(path):
        with open(path, newline="") as f:
            old = next(csv.reader(f), [])
        fields = old + [k for k in fields if k not in old]
        if fields != old:  # new columns: rewrite with the wider header
            with open(path, newline="") as f:
                existing = list(csv.DictReader(f))
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=fields)
                w.writeheader()
                w.writerows(existing)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)
