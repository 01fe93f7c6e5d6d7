"""Dropless dispatch on one device: every token runs its routed expert, nothing is dropped.

Tokens are sorted by expert and each expert's group is padded to blocks of B rows
(sae_jax/grouped.py); each block runs the same per-expert forward and AuxK as the capacity
path (`experts.expert_out`) with its expert's weights. The layout has T / B + N blocks
(what any routing may need), so the work is that of T + N * B rows, and no [N, T, .]
buffer is built. With all experts on this device no tokens move between
devices; the cross-device exchange is another path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sae_jax import grouped
from sae_jax.experts import ExpertParams, TokenOut, expert_out, use_dense

MIN_BLOCK, MAX_BLOCK = 8, 256


def auto_block_size(tokens: int, num_experts: int) -> int:
    """B for T tokens over N experts: the largest power of 2 <= T / (4N), within
    [MIN_BLOCK, MAX_BLOCK]. The T + N * B rows computed are then at most 1.25 T (as with a
    capacity factor of 1.25) where B is not clamped; smaller blocks mean more, smaller
    matmuls."""
    per_block = max(1, tokens // (4 * num_experts))
    return int(min(MAX_BLOCK, max(MIN_BLOCK, 1 << (per_block.bit_length() - 1))))


def run_dropless(
    p: ExpertParams,
    xc: jax.Array,
    b_dec: jax.Array,
    expert: jax.Array,
    gate: jax.Array,
    dead: jax.Array | None,
    *,
    k: int,
    k_aux: int,
    kernel: str,
    dtype: str,
    block_size: int = 0,
) -> TokenOut:
    """Every token through its routed expert, one block of B same-expert tokens at a time.

    p leaves [N, ...] (all experts local); xc [T, d] centred tokens in `dtype`; b_dec [d];
    expert [T] int32; gate [T] router probability; dead [N, B] int32 dead latent ids
    (experts.compact_dead) or None (no AuxK);
    block_size 0: `auto_block_size`. The recon is rounded to `dtype` as the capacity path's
    buffers are.
    """
    n, lat = p.w_enc.shape[:2]
    block = block_size or auto_block_size(xc.shape[0], n)
    plan = grouped.plan_blocks(expert, n, block)
    one = functools.partial(
        expert_out, b_dec=b_dec, k=k, k_aux=k_aux, dense=use_dense(kernel, lat), dtype=dtype
    )

    def block_fn(w, tokens, valid):
        (p_e, dead_e), (xc_b, gate_b) = w, tokens
        out = one(p_e, xc_b, gate=gate_b, valid=valid, dead_ids=dead_e)
        return out._replace(recon=out.recon.astype(dtype))

    padded = (grouped.to_blocks(xc, plan), grouped.to_blocks(gate, plan))
    out = grouped.map_blocks(block_fn, (p, dead), padded, plan)
    fired = jnp.zeros((n, lat), jnp.float32).at[plan.block_expert].add(out.fired)
    return TokenOut(
        recon=grouped.from_blocks(out.recon, plan).astype(jnp.float32),
        kept=jnp.ones(expert.shape, bool),
        fired=fired,
        l0_sum=jnp.sum((out.latents > 0) * plan.valid[..., None]),
        aux_err=out.aux_err.sum(),
        aux_norm=out.aux_norm.sum(),
        rows=jnp.zeros_like(gate, shape=()) + plan.valid.size,  # every block runs
    )
