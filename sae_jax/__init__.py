"""sae_jax: Switch sparse autoencoders in JAX/Flax with expert parallelism."""

from sae_jax.config import ConfigError, SAEConfig, TrainConfig
from sae_jax.export import export_sae
from sae_jax.model.switch import SwitchSAE
from sae_jax.pretrained import PretrainedSAE, load_pretrained

__all__ = [
    "ConfigError",
    "PretrainedSAE",
    "SAEConfig",
    "SwitchSAE",
    "TrainConfig",
    "export_sae",
    "load_pretrained",
]
