"""Helpers shared by the benchmarks: the machine line, JSON + table output. Their data comes from
tools/tiny_data.py (`make_patch_set`: patches of the real size)."""

from __future__ import annotations

import json
import os

import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


machine = utils.machine


def report(name: str, rows: list[dict], columns: list[str]) -> None:
    """One JSON line, then a short table."""
    print(json.dumps({"benchmark": name, "machine": machine(), "results": rows}))
    widths = [max(len(c), *(len(f"{r.get(c, '')}") for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(f"{r.get(c, '')}".ljust(w) for c, w in zip(columns, widths)))
