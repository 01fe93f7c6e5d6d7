"""Capacity-limited token dispatch into per-expert buffers, and back.

Single-device building blocks; the expert-parallel path wraps the same functions around a
`jax.lax.all_to_all`. Nothing here builds a [tokens, latents] array: buffers are [N, C, d].
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def capacity(tokens: int, num_experts: int, capacity_factor: float) -> int:
    """C = ceil(capacity_factor * tokens / N), at least 1 and at most `tokens`."""
    return max(1, min(tokens, math.ceil(capacity_factor * tokens / num_experts)))


def assign_slots(expert: jax.Array, num_experts: int) -> jax.Array:
    """Slot of each token in its expert's buffer: the count of earlier tokens sent there.

    expert: [tokens] int32 -> [tokens] int32. Slots >= capacity mean the token is dropped.
    """
    one_hot = jax.nn.one_hot(expert, num_experts, dtype=jnp.int32)
    position = jnp.cumsum(one_hot, axis=0) - 1
    return jnp.take_along_axis(position, expert[:, None], axis=1)[:, 0]


def to_buffers(
    values: jax.Array, expert: jax.Array, slot: jax.Array, num_experts: int, cap: int
) -> jax.Array:
    """Scatter per-token values [tokens, ...] into [N, C, ...]; overflow tokens are dropped."""
    buf = jnp.zeros((num_experts, cap) + values.shape[1:], values.dtype)
    return buf.at[expert, slot].set(values, mode="drop")


def from_buffers(buf: jax.Array, expert: jax.Array, slot: jax.Array) -> jax.Array:
    """Gather [N, C, ...] back to [tokens, ...]; dropped tokens read zeros."""
    return buf.at[expert, slot].get(mode="fill", fill_value=0)
