"""PNG plots of a run: training curves, expert load, latent firing frequencies; and several
runs' eval curves side by side (matplotlib)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sae_jax.evaluation.metric_rows import read_rows  # noqa: E402

CURVES = ("loss", "mse", "fvu", "l0", "dead_fraction")


def training_curves(metrics_path: Path, out: Path) -> Path:
    """loss, MSE, FVU (with the eval points), L0 and dead fraction against tokens; a log y axis
    only where the values span more than a decade."""
    rows = read_rows(metrics_path)
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
        ax.set_yscale(y_scale([v for _, v in points + evals]))
        ax.legend()
    return _save(fig, out)


def y_scale(values: list[float], decades: float = 1.0) -> str:
    """'log' for positive values spanning more than `decades` powers of ten (a falling FVU),
    else 'linear' (a log axis over 3.0-3.4 shows only unlabelled minor ticks)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values or min(values) <= 0:
        return "linear"
    return "log" if math.log10(max(values) / min(values)) > decades else "linear"


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


def comparison_curves(
    series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, out: Path
) -> Path:
    """One line with markers per named run of (x, y) points (e.g. eval FVU against training
    seconds or FLOPs), log x axis where x spans more than a decade, y as `y_scale` says."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, points in series.items():
        if points:
            ax.plot(*zip(*sorted(points), strict=True), "o-", markersize=3, label=name)
    xs = [x for points in series.values() for x, _ in points]
    ax.set_xscale(y_scale(xs))
    ax.set_yscale(y_scale([y for points in series.values() for _, y in points]))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if any(series.values()):
        ax.legend()
    return _save(fig, out)


def _save(fig, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
