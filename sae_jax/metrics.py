"""Metric output: one JSON object per logged step in DIR/metrics.jsonl, and a console bar."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def to_python(value: Any) -> Any:
    """Arrays and numpy scalars -> JSON-ready floats, ints and lists."""
    arr = np.asarray(value)
    if arr.ndim:
        return [to_python(v) for v in arr]
    item = arr.item()
    if isinstance(item, float) and not math.isfinite(item):
        return None if math.isnan(item) else item
    return item


class MetricWriter:
    def __init__(self, workdir: str | Path, resume_step: int = 0):
        """Start a new file, or on resume keep only the rows up to `resume_step` (later rows
        belong to steps that will run again)."""
        self.path = Path(workdir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line + "\n")
                except (ValueError, KeyError):
                    break  # a line cut off by a crash
        self._file = self.path.open("w")
        self._file.writelines(kept)
        self._file.flush()

    def write(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Append one row (a dict that holds "step"); returns it JSON-ready."""
        row = {k: to_python(v) for k, v in metrics.items()}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        return row

    def close(self) -> None:
        self._file.close()


def summary(row: dict[str, Any], names: tuple[str, ...]) -> str:
    """A compact 'name=value' line of the scalar entries that exist."""
    parts = [f"{n}={row[n]:.4g}" for n in names if isinstance(row.get(n), int | float)]
    return " ".join(parts)
