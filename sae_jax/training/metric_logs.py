"""Metric logs people read, beside metrics.jsonl: TensorBoard event files (tensorboardX) in
the workdir, and Weights & Biases runs (`--wandb`, when the wandb package is installed).

Tags: training names under `train/` (`train/mse`), eval and data names as they are
(`eval/fvu`, `data/epoch`); lists (`expert_load`) become histograms.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from sae_jax.config import ConfigError

AXES = ("step", "tokens")  # x axes, not metrics


def tag(name: str) -> str:
    return name if "/" in name else f"train/{name}"


def _values(row: dict[str, Any]):
    """(tag, float or np.ndarray) of a JSON-ready row's metrics; None (NaN) is left out."""
    for name, value in row.items():
        if name in AXES or value is None or isinstance(value, bool | str):
            continue
        if isinstance(value, list):
            yield tag(name), np.asarray(value, np.float64)
        else:
            yield tag(name), float(value)


def _summary_writer_class() -> type:
    """tensorboardX's SummaryWriter, imported without importing torch where torch is not
    loaded yet: tensorboardX imports it only to accept torch tensors (we hand it numpy), and
    a process with torch loaded runs the XLA:CPU training step markedly slower (figures in
    docs/benchmarks.md)."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class TensorBoardLog:
    """Event files in `directory`. On resume, TensorBoard hides the events a previous run wrote
    after `resume_step` (the steps that run again), as metrics.jsonl drops their rows."""

    def __init__(self, directory: str | Path, resume_step: int = 0):
        SummaryWriter = _summary_writer_class()
        purge = resume_step + 1 if resume_step else None
        # Files are named by the second they start in; the suffix keeps a resume within the
        # same second from overwriting the earlier file, and sorts after it.
        self._writer = SummaryWriter(str(directory), purge_step=purge,
                                     filename_suffix=f".{resume_step:010d}")  # fmt: skip

    def write(self, row: dict[str, Any]) -> None:
        for name, value in _values(row):
            if isinstance(value, np.ndarray):
                self._writer.add_histogram(name, value, row["step"])
            else:
                self._writer.add_scalar(name, value, row["step"])
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def check_wandb() -> None:
    """A one-line ConfigError when --wandb is asked for without the wandb package."""
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError("--wandb needs the wandb package: pip install wandb (or drop --wandb)")


class WandbLog:
    """A Weights & Biases run named after the workdir, its files in DIR/wandb/. wandb's own
    settings apply: WANDB_MODE=offline logs with no network (`wandb sync` uploads later),
    WANDB_PROJECT names the project (default sae_jax)."""

    def __init__(self, directory: str | Path, config: dict[str, Any], name: str | None = None):
        """`name`: the run's name (default: the directory's)."""
        check_wandb()
        import wandb

        self._wandb = wandb
        directory = Path(directory).absolute()
        project = os.environ.get("WANDB_PROJECT", "sae_jax")
        self._run = wandb.init(project=project, name=name or directory.name, dir=str(directory),
                               config=config)  # fmt: skip

    def write(self, row: dict[str, Any]) -> None:
        values = {name: self._wandb.Histogram(v) if isinstance(v, np.ndarray) else v
                  for name, v in _values(row)}  # fmt: skip
        self._run.log({**values, "tokens": row.get("tokens")}, step=row["step"])

    def close(self) -> None:
        self._run.finish()
