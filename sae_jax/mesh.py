"""The ('data', 'expert') device mesh.

Axes are `Auto` (sharding annotations are hints to the compiler, as in MaxText), so the same
model code runs on one device, simulated CPU devices and a pod. Tokens are sharded over every
device; expert tensors over 'expert'; the router and biases are replicated.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from sae_jax.config import ConfigError

AXES = ("data", "expert")
TOKENS = PartitionSpec(AXES)  # the token axis split over every device


def make_mesh(shape: Sequence[int] = (1, 1), devices: Sequence[jax.Device] | None = None):
    """A ('data', 'expert') mesh; one entry of `shape` may be -1 for "all remaining devices"."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_shape(shape, len(devices))
    used = devices[: shape[0] * shape[1]]
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 2, devices=used)


def resolve_shape(shape: Sequence[int], num_devices: int) -> tuple[int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ConfigError(f"MESH_SHAPE={shape} must be a pair of positive sizes (one may be -1)")
    if -1 in shape:
        known = shape[0] * shape[1] * -1
        if num_devices % known:
            raise ConfigError(f"MESH_SHAPE={shape}: {num_devices} devices not divisible by {known}")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if shape[0] * shape[1] > num_devices:
        raise ConfigError(
            f"MESH_SHAPE={shape} needs {shape[0] * shape[1]} devices; have {num_devices}"
        )
    return shape


def token_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, TOKENS)
