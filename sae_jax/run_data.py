"""What a finished run is evaluated and browsed on: its exported SAE and its own EVAL_DATA.

A run's gin config (DIR/config.gin, or the text stored in its latest checkpoint) says which
data it was evaluated on; synthetic data is regenerated from those bindings (dimension,
features, groups, seed), so `launch.eval` and `launch.browse` need no `--data` for any run.
A workdir (and --data) may be a URL (gs://...; sae_jax.storage).
"""

from __future__ import annotations

from pathlib import Path

import gin

from sae_jax import storage
from sae_jax.config import ConfigError, TrainConfig
from sae_jax.data import ActivationData, SyntheticData
from sae_jax.pretrained import PretrainedSAE, load_pretrained


def load_run_sae(workdir: str | Path) -> PretrainedSAE:
    """The run's exported SAE (DIR/export), or a one-line ConfigError saying how to make it."""
    export = storage.path(workdir) / "export"
    if not (export / "cfg.json").exists():
        raise ConfigError(f"{export}: no exported SAE; run python -m launch.export "
                          f"--workdir {workdir}")  # fmt: skip
    return load_pretrained(export)


def load_sae(path: str | Path) -> PretrainedSAE:
    """Any SAE directory load_pretrained reads (ours, SAELens, sparsify), or a one-line
    ConfigError saying why not."""
    try:
        return load_pretrained(path)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e).splitlines()[0]) from None


def run_config_text(workdir: str | Path) -> str:
    """The run's resolved gin config: DIR/config.gin, else its latest checkpoint's copy."""
    run = storage.path(workdir)
    if (run / "config.gin").exists():
        return (run / "config.gin").read_text()
    from sae_jax.training.checkpoint import Checkpointer

    if (run / "checkpoints").is_dir():
        ckpt = Checkpointer(workdir, create=False)
        try:
            step = ckpt.latest_step()
            text = ckpt.record(step).get("gin_config", "") if step is not None else ""
        finally:
            ckpt.close()
        if text:
            return text
    raise ConfigError(f"{workdir}: no config.gin or checkpoint says what data the run used; "
                      "pass --data EVAL_DIR")  # fmt: skip


def apply_run_config(workdir: str | Path) -> TrainConfig:
    """Bind the run's gin config (replacing any bindings in effect); return its TrainConfig."""
    text = run_config_text(workdir)
    gin.clear_config()
    try:
        gin.parse_config(text)
        return TrainConfig()
    except (ValueError, TypeError, KeyError, SyntaxError) as e:
        raise ConfigError(f"{workdir}: cannot read the run's gin config ({e})") from None


def open_eval_data(
    workdir: str | Path, data: str | None = None, outlier_norm_factor: float = 10.0
) -> SyntheticData | ActivationData:
    """`data` (a shard directory), or else the run's own EVAL_DATA: shards, or the synthetic
    data regenerated from the run's seed and bindings."""
    spec = data
    if spec is None:
        spec = apply_run_config(workdir).eval_spec
        if spec == "synthetic":
            return SyntheticData()  # configured by the run's bindings
    if spec == "synthetic":
        raise ConfigError("--data synthetic: leave --data out to use the run's own synthetic data")
    if not storage.path(spec).is_dir():
        raise ConfigError(f"{spec}: no such data directory")
    return ActivationData(spec, outlier_norm_factor=outlier_norm_factor, process=(0, 1))
