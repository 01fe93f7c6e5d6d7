"""Small activation-shard datasets whose tokens carry their own id (column 0)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sae_jax import storage
from sae_jax.data.shards import build_manifest, write_manifest
from sae_jax.training.checkpoint import Checkpointer

# A training run of a few seconds on small synthetic data (4 experts of 32 latents, d = 16),
# checkpointing every 10 steps: for tests of what happens around the steps.
TINY_TRAIN = [
    "--gin.BATCH_SIZE=256", "--gin.NUM_LATENTS=128", "--gin.NUM_EXPERTS=4", "--gin.K=4",
    "--gin.SYNTH_DIM=16", "--gin.LOG_EVERY=10", "--gin.CHECKPOINT_EVERY=10",
    "--gin.TrainConfig.eval_tokens=512", "--gin.TrainConfig.dead_after_tokens=2560",
    "--gin.SAEConfig.k_aux=8", "--no_progress",
]  # fmt: skip
SCALE = 3000.0  # token norms ~ SCALE * sqrt(d): ids (< 3000) do not dominate them


def write_dataset(
    directory: Path,
    lengths: list[int],
    d: int = 8,
    dtype=np.float32,
    outliers: int = 0,
    seed: int = 0,
    ids: bool = True,
) -> np.ndarray:
    """Shards of the given lengths; token i has x[0] = i (with `ids`). `outliers` evenly spaced
    tokens get a norm 100x the others. Returns all tokens [sum(lengths), d] float32."""
    rng = np.random.default_rng(seed)
    total = sum(lengths)
    x = rng.normal(size=(total, d)).astype(np.float32)
    x *= SCALE
    if ids:
        x[:, 0] = np.arange(total)
    if outliers:
        big = np.linspace(0, total - 1, outliers).astype(int)
        x[big, 1] = 100 * SCALE * np.sqrt(d)
    directory.mkdir(parents=True, exist_ok=True)
    start = 0
    for i, n in enumerate(lengths):
        np.save(directory / f"part_{i:03d}.npy", x[start : start + n].astype(dtype))
        start += n
    write_manifest(directory, build_manifest(directory))
    return x


def ids_of(batch_x: np.ndarray, scale: float) -> np.ndarray:
    return np.rint(batch_x[:, 0] / scale).astype(np.int64)


def assert_same_params(a: dict, b: dict) -> None:
    """Two {name: array} parameter sets are bitwise equal."""
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def crash_on_third_shard(monkeypatch, dumper) -> None:
    """Make the dumper module's third shard write raise KeyboardInterrupt (an interrupted
    dump); monkeypatch.undo() or a new setattr restores it."""
    write = dumper._write_shard
    calls = []

    def crash(path, x, dtype):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        write(path, x, dtype)

    monkeypatch.setattr(dumper, "_write_shard", crash)


TIMING = ("tokens_per_sec", "train_seconds")  # metric keys that differ between equal runs


def untimed_rows(workdir) -> list[dict]:
    """A run's metrics.jsonl rows (local or URL workdir) without the timing keys."""
    lines = (storage.path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(ln).items() if k not in TIMING} for ln in lines]


def final_params(workdir) -> dict:
    """{name: array} of the parameters in the run's latest checkpoint."""
    ckpt = Checkpointer(workdir, create=False)
    params = ckpt.restore_params(ckpt.latest_step())
    ckpt.close()
    return {k: np.asarray(v) for k, v in params.items()}
