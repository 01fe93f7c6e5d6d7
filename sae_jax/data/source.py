"""Choose the data source a TRAIN_DATA / EVAL_DATA string names."""

from __future__ import annotations

from pathlib import Path

from sae_jax import storage
from sae_jax.config import ConfigError
from sae_jax.data.reader import ActivationData
from sae_jax.data.synthetic import SyntheticData


def make_source(spec: str, seed: int = 0) -> SyntheticData | ActivationData:
    """'synthetic' (planted features), or a directory of activation shards (local or a URL)."""
    if not spec:
        raise ConfigError("no data directory given: pass --gin.TRAIN_DATA=DIR --gin.EVAL_DATA=DIR")
    if spec == "synthetic":
        return SyntheticData()
    if storage.is_url(spec) or Path(spec).is_dir():
        return ActivationData(spec, seed=seed)
    raise ConfigError(f"data source {spec!r} is neither 'synthetic' nor a directory")


def source_class(spec: str) -> type[SyntheticData] | type[ActivationData]:
    """The class of the source `make_source(spec)` makes."""
    return SyntheticData if spec == "synthetic" else ActivationData
