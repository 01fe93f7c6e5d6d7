"""PNG plots of a run: training curves, expert load, latent firing frequencies (matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

CURVES = ("loss", "fvu", "l0", "dead_fraction")


def training_curves(metrics_path: Path, out: Path) -> Path:
    """loss, FVU (with eval/fvu points), L0 and dead fraction against tokens."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2))
    for ax, name in zip(axes, CURVES, strict=True):
        points = [(r["tokens"], r[name]) for r in rows if r.get(name) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), label="train")
        evals = [(r["tokens"], r[f"eval/{name}"]) for r in rows if r.get(f"eval/{name}")]
        if evals:
            ax.plot(*zip(*evals, strict=True), "o", label="eval")
        ax.set_xlabel("tokens")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
        ax.set_title(name)
        if name in ("loss", "fvu"):
            ax.set_yscale("log")
        ax.legend()
    return _save(fig, out)


def expert_load(load: list[float], out: Path) -> Path:
    """Fraction of tokens routed to each expert, with the uniform 1/N line."""
    fig, ax = plt.subplots(figsize=(max(4, 0.25 * len(load) + 2), 3.2))
    ax.bar(np.arange(len(load)), load)
    ax.axhline(1 / len(load), color="k", linestyle="--", linewidth=1, label="uniform")
    ax.set_xlabel("expert")
    ax.set_ylabel("fraction of tokens")
    ax.legend()
    return _save(fig, out)


def firing_histogram(frequency: list[float], tokens: int, out: Path) -> Path:
    """Histogram of log10 firing frequency; latents that never fired sit in their own bar."""
    freq = np.asarray(frequency)
    floor = np.log10(1 / max(tokens, 1)) - 0.5
    logs = np.where(freq > 0, np.log10(np.maximum(freq, 1e-30)), floor)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(logs, bins=50)
    ax.axvline(floor, color="r", linewidth=1, label=f"never fired ({np.sum(freq == 0)})")
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    ax.legend()
    return _save(fig, out)


def _save(fig, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
