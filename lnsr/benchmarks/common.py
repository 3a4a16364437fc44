"""The benchmarks' CSV files: rows with the machine, the versions and the date beside the numbers.

The machine description itself lives in ``lnsr.utils.machine`` (shared by every tool);
``cpu_name``, ``device_name`` and ``environment`` are re-exported here for older imports.
"""
from __future__ import annotations

import csv
import os

from ..utils.machine import cpu_name, device_name, environment

__all__ = ["append_csv", "cpu_name", "device_name", "environment"]


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
