"""sae_jax: Switch sparse autoencoders in JAX/Flax with expert parallelism."""

from sae_jax.config import ConfigError, SAEConfig, TrainConfig
from sae_jax.model import SwitchSAE

__all__ = ["ConfigError", "SAEConfig", "SwitchSAE", "TrainConfig"]
