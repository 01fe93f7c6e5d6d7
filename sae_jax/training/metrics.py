"""Metric output: one JSON object per logged step in DIR/metrics.jsonl, the same rows as
TensorBoard events in DIR (and optionally Weights & Biases;
sae_jax/training/metric_logs.py), and the console summary."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from sae_jax.evaluation.metric_rows import read_rows
from sae_jax.training.metric_logs import TensorBoardLog, WandbLog


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
    def __init__(self, workdir: str | Path, resume_step: int = 0, wandb_config: dict | None = None):
        """Start a new file, or on resume keep only the rows up to `resume_step` (later rows
        belong to steps that will run again). `wandb_config`: also log to a Weights & Biases
        run with this config."""
        self.path = Path(workdir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_rows(self.path) if r.get("step", resume_step + 1) <= resume_step]
        _replace_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a")
        self._logs = [TensorBoardLog(self.path.parent, resume_step)]
        if wandb_config is not None:
            self._logs.append(WandbLog(self.path.parent, wandb_config))

    def write(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Append one row (a dict that holds "step"); returns it JSON-ready."""
        row = {k: to_python(v) for k, v in metrics.items()}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        for log in self._logs:
            log.write(row)
        return row

    def close(self) -> None:
        self._file.close()
        for log in self._logs:
            log.close()


def _replace_atomically(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`: a crash at
    any moment leaves either the old file or the new one, never a truncated mix."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def summary(row: dict[str, Any], names: tuple[str, ...]) -> str:
    """A compact 'name=value' line of the scalar entries that exist."""
    parts = [f"{n}={row[n]:.4g}" for n in names if isinstance(row.get(n), int | float)]
    return " ".join(parts)
