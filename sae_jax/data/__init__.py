"""Activation sources. A source yields deterministic [batch, d] float32 batches by step."""

from sae_jax.data.synthetic import SyntheticData, make_source

__all__ = ["SyntheticData", "make_source"]
