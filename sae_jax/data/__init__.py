"""Activation sources: synthetic planted features, or shards of real activations on disk.

A source has `.d`, `.input_scale`, `.sample(n)`, `.max_batches(batch_size)` and
`.batches(split, rows, batch_size, start)`, which yields this process's rows of each global
batch as a `Batch` (see stream.py).
"""

from sae_jax.data.reader import ActivationData
from sae_jax.data.shards import DataError
from sae_jax.data.source import make_source
from sae_jax.data.stream import Batch
from sae_jax.data.synthetic import SyntheticData

__all__ = ["ActivationData", "Batch", "DataError", "SyntheticData", "make_source"]
