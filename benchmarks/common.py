"""Shared bits of the benchmark scripts: run metadata and whole-file CSV writing."""

from __future__ import annotations

import csv
import datetime
import os
import platform
import tempfile

import torch


def device_label(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_tags(device: str | torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return {"device": device_label(device), "torch": torch.__version__, "triton": triton_version,
            "date": datetime.date.today().isoformat()}


def write_csv(path: str, rows: list[dict]) -> None:
    """Write all rows at once (temp file + rename), columns in first-seen order."""
    if not rows:
        return
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".csv.tmp")
    with os.fdopen(fd, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
