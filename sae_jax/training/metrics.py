"""Metric output: one JSON object per logged step in DIR/metrics.jsonl, the same rows as
TensorBoard events in DIR (and optionally Weights & Biases;
sae_jax/training/metric_logs.py), and the console summary.

DIR may be a URL (gs://...): an object cannot be appended to, so the rows and the event files
are written to a local staging directory and uploaded whole (one atomic object write each) by
`sync`, which the training loop calls before every checkpoint save, and by `close`. A resume
keeps only the rows up to its checkpoint's step, all of which were uploaded before that
checkpoint was saved."""

from __future__ import annotations

import atexit
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from sae_jax import storage
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
        run with this config. A URL `workdir` is written through a local staging directory
        (see the module's docstring)."""
        self.target = storage.path(workdir) / "metrics.jsonl"
        self.url = storage.is_url(workdir)
        local = staging_dir() if self.url else Path(workdir)
        self.path = local / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metric_rows(self.target)
                if r.get("step", resume_step + 1) <= resume_step]  # fmt: skip
        _replace_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._uploaded: dict[str, int] = {}  # staged file -> size when last uploaded
        self.sync()
        self._file = self.path.open("a")
        self._logs = [TensorBoardLog(local, resume_step)]
        if wandb_config is not None:
            self._logs.append(wandb_log(workdir, local, wandb_config))

    def write(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Append one row (a dict that holds "step"); returns it JSON-ready."""
        row = {k: to_python(v) for k, v in metrics.items()}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        for log in self._logs:
            log.write(row)
        return row

    def sync(self) -> None:
        """For a URL workdir, upload metrics.jsonl and the TensorBoard event files that
        changed since the last sync, each in one object write; nothing for a local one."""
        if not self.url:
            return
        for f in [self.path, *sorted(self.path.parent.glob("events.out.tfevents.*"))]:
            size = f.stat().st_size
            if self._uploaded.get(f.name) != size:
                storage.write_atomic(self.target.parent / f.name, f.read_bytes())
                self._uploaded[f.name] = size

    def close(self) -> None:
        self._file.close()
        for log in self._logs:
            log.close()
        self.sync()
        if self.url:
            shutil.rmtree(self.path.parent, ignore_errors=True)


def staging_dir() -> Path:
    """A new local directory for a URL workdir's logs: removed at close, or at exit when the
    run stops on an error or a preemption (its rows were uploaded by then)."""
    local = Path(tempfile.mkdtemp(prefix="sae_jax-logs-"))
    atexit.register(shutil.rmtree, local, ignore_errors=True)
    return local


def wandb_log(workdir: str | Path, local: Path, config: dict) -> WandbLog:
    """A W&B run beside the local workdir's files, or for a URL workdir in a local temporary
    directory that is kept (wandb's own files: `wandb sync` reads them), named after the
    URL's last part."""
    if not storage.is_url(workdir):
        return WandbLog(local, config)
    directory = tempfile.mkdtemp(prefix="sae_jax-wandb-")
    return WandbLog(directory, config, name=storage.path(workdir).name)


def read_metric_rows(p: str | os.PathLike) -> list[dict]:
    """The complete rows of the metrics.jsonl at `p`, a local path or a URL (read_rows)."""
    if not storage.is_url(p):
        return read_rows(p)
    if not storage.path(p).exists():
        return []
    with storage.local_copy(p) as local:
        return read_rows(local)


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
