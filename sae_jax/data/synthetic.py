"""Synthetic activations with planted ground truth, generated on the fly from a seed.

F unit-norm feature directions in d dimensions (F > d: superposition), split into G groups of
related features (the structure a Switch SAE's router can exploit; G = 1 has none). A feature
is its group's centroid direction mixed with a random direction (`group_share` of the variance
from the centroid). Each token picks one group uniformly and draws a Poisson(`mean_active`)
number of its features (at most 4x the mean), feature j of the group with probability
proportional to (j + 1)^-power, each with a magnitude uniform in [0.5, 1.5]. Tokens are scaled
so that E||x||^2 = d.

Batches are generated on the host's CPU device (`host_device`), a few ahead in a background
thread (`stream.prefetch`): generated on an accelerator, each batch would queue behind the
training steps already dispatched there, and reading it would make the host wait for them.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator

import gin
import jax
import jax.numpy as jnp
import numpy as np

from sae_jax.config import ConfigError
from sae_jax.data.stream import Batch, prefetch

_SPLITS = {"train": 0, "eval": 1}
PREFETCH_BATCHES = 4  # batches generated ahead (as many as the training steps queued ahead)


def host_device() -> jax.Device:
    """This process's first CPU device (its first device, when JAX runs without its CPU
    backend, JAX_PLATFORMS=cuda for example)."""
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return jax.local_devices()[0]


@gin.configurable
class SyntheticData:
    def __init__(
        self,
        dim: int = 64,
        num_features: int = 512,
        num_groups: int = 16,
        group_share: float = 0.1,
        mean_active: float = 4.0,
        power: float = 0.5,
        seed: int = 0,
    ):
        if dim <= 0 or num_features <= 0:
            raise ConfigError(f"SYNTH_DIM={dim} and SYNTH_FEATURES={num_features} must be positive")
        if num_groups <= 0 or num_features % num_groups:
            raise ConfigError(f"num_groups={num_groups} must divide SYNTH_FEATURES={num_features}")
        if not mean_active > 0 or not 0 <= group_share < 1:
            raise ConfigError("mean_active must be > 0 and group_share in [0, 1)")
        self.d = dim
        self.input_scale = 1.0  # generated at E||x||^2 = d already
        self.num_features = num_features
        self.num_groups = num_groups
        key = jax.random.key(seed)
        k_centre, k_own, self._key = jax.random.split(key, 3)
        per_group = num_features // num_groups
        centres = _unit(jax.random.normal(k_centre, (num_groups, dim)))
        own = _unit(jax.random.normal(k_own, (num_features, dim)))
        mixed = (
            math.sqrt(group_share) * jnp.repeat(centres, per_group, axis=0)
            + math.sqrt(1 - group_share) * own
        )
        self.features = _unit(mixed)  # [F, d], features of group g at rows g*F/G ...
        freq = (jnp.arange(per_group) + 1.0) ** -power
        self._cdf = jnp.cumsum(freq / freq.sum())  # [F/G] within-group draw distribution
        # What each batch is generated from, on the host (`features` stays uncommitted, for
        # use beside arrays on any device).
        host = host_device()
        self._key, self._cdf, self._host_features = jax.device_put(
            (self._key, self._cdf, self.features), host
        )
        self.mean_active = float(mean_active)
        self.max_active = max(1, math.ceil(4 * mean_active))
        with jax.set_mesh(None):  # on the host device, outside any mesh
            sample = self._raw(jax.random.fold_in(self._key, 2**20), 8192)
            self.scale = float(jnp.sqrt(dim / jnp.mean(jnp.sum(sample**2, axis=-1))))

    def _raw(self, key: jax.Array, n: int) -> jax.Array:
        return _generate(
            key, self._host_features, self._cdf, self.mean_active, n, self.max_active,
            self.num_groups,
        )  # fmt: skip

    def batch(self, split: str, step: int, size: int) -> np.ndarray:
        """Deterministic [size, d] float32 batch number `step` of `split` ('train' or 'eval'),
        generated on the host device."""
        with jax.set_mesh(None):  # on the host device, outside any mesh
            key = jax.random.fold_in(jax.random.fold_in(self._key, _SPLITS[split]), step)
            return np.asarray(self._raw(key, size) * self.scale)

    def batches(self, split: str, rows: slice, batch_size: int, start: int = 0) -> Iterator[Batch]:
        """This process's `rows` of batches start, start + 1, ... (position = batches done),
        generated PREFETCH_BATCHES ahead in a thread; close the iterator to stop it."""
        return prefetch(self._batches(split, rows, batch_size, start), PREFETCH_BATCHES)

    def _batches(self, split: str, rows: slice, batch_size: int, start: int) -> Iterator[Batch]:
        for step in itertools.count(start):
            yield Batch(self.batch(split, step, batch_size)[rows], step + 1)

    def planted(self, split: str, step: int, size: int) -> tuple[np.ndarray, ...]:
        """The ground truth of batch(split, step, size): feature ids [size, m] (-1 where a slot
        is unused), their magnitudes [size, m] (before the global scale) and groups [size]."""
        with jax.set_mesh(None):
            key = jax.random.fold_in(jax.random.fold_in(self._key, _SPLITS[split]), step)
            ids, mag, group = _draw(key, self._cdf, self.mean_active, size, self.max_active,
                                    self.num_groups)  # fmt: skip
        ids, mag = np.asarray(ids), np.asarray(mag)
        return np.where(mag > 0, ids, -1), mag, np.asarray(group)[:, 0]

    def max_batches(self, batch_size: int) -> float:
        return math.inf

    def sample(self, size: int) -> np.ndarray:
        """A [size, d] sample for data-dependent initialisation (not a training batch)."""
        return np.asarray(self.batch("train", 2**30, size))


def _unit(v: jax.Array) -> jax.Array:
    return v / jnp.linalg.norm(v, axis=-1, keepdims=True)


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _generate(key, features, cdf, mean_active, n: int, max_active: int, groups: int):
    """[n, d]: sum over a token's drawn features of magnitude * direction."""
    ids, mag, _ = _draw(key, cdf, mean_active, n, max_active, groups)
    return jnp.einsum("nm,nmd->nd", mag, features[ids])


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _draw(key, cdf, mean_active, n: int, max_active: int, groups: int):
    """Each token's feature ids [n, max_active], magnitudes (0 past its count) and group."""
    k_group, k_count, k_ids, k_mag = jax.random.split(key, 4)
    group = jax.random.randint(k_group, (n, 1), 0, groups)
    count = jax.random.poisson(k_count, mean_active, (n,))
    within = jnp.searchsorted(cdf, jax.random.uniform(k_ids, (n, max_active)) * cdf[-1])
    ids = group * cdf.shape[0] + jnp.minimum(within, cdf.shape[0] - 1)
    mag = jax.random.uniform(k_mag, (n, max_active), minval=0.5, maxval=1.5)
    mag = mag * (jnp.arange(max_active) < count[:, None])
    return ids, mag, group
