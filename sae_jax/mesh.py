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


# ZeRO-1's layouts of the expert rows' Adam state [N, L, ...]: the expert axis over 'expert'
# and then 'data' (by experts), or the experts over 'expert' and the latents over 'data'.
ROW_SPLITS = (PartitionSpec(("expert", "data")), PartitionSpec("expert", "data"))


def zero_rows_axis(data: int, local_experts: int, latents: int) -> int | None:
    """ZeRO-1 on a 'data' axis of `data` devices: the axis of the N_local x L expert rows of
    an 'expert' index over which their Adam state splits, each device of 'data' holding 1 /
    data of them: 0 (whole experts) where data divides N_local, else 1 (the same latent rows
    of every expert) where it divides L; None (replicated) for one device or neither."""
    if data < 2:
        return None
    return 0 if local_experts % data == 0 else 1 if latents % data == 0 else None


def zero_rows_spec(mesh, num_experts: int, latents: int) -> PartitionSpec | None:
    """The partition spec (ROW_SPLITS) of the Adam state and the reduce-scattered gradient of
    the expert rows [N, L, ...] on `mesh` (concrete or abstract), None where it is not split
    over 'data' (`zero_rows_axis`)."""
    if mesh.empty:
        return None
    local = num_experts // mesh.shape["expert"]
    axis = zero_rows_axis(mesh.shape["data"], local, latents)
    return None if axis is None else ROW_SPLITS[axis]
