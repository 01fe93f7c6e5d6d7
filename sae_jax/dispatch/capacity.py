"""Capacity dispatch: tokens into per-expert [N, C, d] buffers, through the experts, back.

A token's slot is the number of earlier tokens routed to the same expert; tokens past the
capacity C are dropped (they reconstruct to b_dec). Across devices the buffers go through a
`jax.lax.all_to_all` over the 'expert' axis to the experts' devices and back. Nothing here
builds a [tokens, latents] array.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sae_jax.dispatch.routed import Routed, TokenOut
from sae_jax.kernels.expert import ExpertParams, ExpertRows, ExpertSettings, run_experts


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


def run(routed: Routed, p: ExpertParams, dead_ids: jax.Array | None, s: ExpertSettings) -> TokenOut:
    """Scatter the tokens into [N, C, d] buffers (tokens past C are dropped), run the experts
    on them, gather back. With `s.expert_axis` the buffers go through an all_to_all to
    [N_local, E * C, .] on the experts' devices and back. See dispatch/routed.py."""
    axis, tokens = s.expert_axis, routed.x.shape[0]
    n = p.w_enc.shape[0] * (jax.lax.axis_size(axis) if axis else 1)
    if n == 1:
        slot, cap = jnp.arange(tokens, dtype=jnp.int32), tokens
    else:
        slot, cap = assign_slots(routed.expert, n), capacity(tokens, n, s.capacity_factor)
    kept = slot < cap

    def send(v):
        buf = to_buffers(v, routed.expert, slot, n, cap)
        return jax.lax.all_to_all(buf, axis, 0, 1, tiled=True) if axis else buf

    def back(buf):
        if axis:
            buf = jax.lax.all_to_all(buf, axis, 1, 0, tiled=True)
        return from_buffers(buf, routed.expert, slot)

    chosen = None if routed.chosen is None else tuple(map(send, routed.chosen))
    bufs = ExpertRows(send(routed.x), send(routed.gate), send(kept), chosen)
    out = run_experts(p, bufs, routed.b_dec, dead_ids, s)
    if s.encode_only:  # candidates only: there is no reconstruction to bring back
        recon = jnp.zeros(routed.x.shape, jnp.float32)
    else:
        recon = back(out.recon.astype(s.dtype)).astype(jnp.float32)
    l0_sum = jnp.sum((out.latents > 0) * bufs.valid[..., None])
    rows = jnp.float32(bufs.valid.size)  # this device's slots: N * C however the experts split
    result = TokenOut(recon, kept, out.fired, l0_sum, out.aux_err, out.aux_norm, rows,
                      kind_sums=out.kind_sums)  # fmt: skip
    if s.encode_only:
        result = result._replace(latents=back(out.latents), indices=back(out.indices))
    if out.aux_recon is not None:
        result = result._replace(aux_recon=back(out.aux_recon.astype(s.dtype)).astype(jnp.float32))
    return result
