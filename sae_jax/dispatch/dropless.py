"""Dropless dispatch: every token runs its routed expert, nothing is dropped.

On the experts' device, tokens are sorted by expert and each expert's group is padded to
blocks of B rows (sae_jax/dispatch/blocks.py); each block runs the same per-expert forward and AuxK
as the capacity path (`experts.expert_out`) with its expert's weights. The layout has room
for T / B + N blocks (what any routing may need) but only the blocks holding tokens run, so
the work is that of at most T + N * B rows, and no [N, T, .] buffer is built.

Across devices (`run_dropless_exchanged`, experts split over an 'expert' mesh axis of E
devices), each device sends exactly its routed rows to the experts' devices with a ragged
all-to-all (sae_jax/dispatch/exchange.py) and gets the reconstructions back the same way.
The receive buffer must hold E * T_local rows (any routing may send every token to one device); its
unused rows get no block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sae_jax.dispatch import blocks, exchange
from sae_jax.kernels.expert import ExpertParams, TokenOut, expert_out, use_dense

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
    present: jax.Array | None = None,
) -> TokenOut:
    """Every token through its routed expert, one block of B same-expert tokens at a time.

    p leaves [N, ...] (all experts local); xc [T, d] centred tokens in `dtype`; b_dec [d];
    expert [T] int32; gate [T] router probability; dead [N, B] int32 dead latent ids
    (experts.compact_dead) or None (no AuxK); block_size 0: `auto_block_size`; present [T]
    bool: False for rows that hold no token (a received buffer's unused rows; None: all rows
    are tokens). The recon is rounded to `dtype` as the capacity path's buffers are.
    """
    n, lat = p.w_enc.shape[:2]
    block = block_size or auto_block_size(xc.shape[0], n)
    plan = blocks.plan_blocks(expert, n, block, present)
    one = functools.partial(expert_out, k=k, k_aux=k_aux, dense=use_dense(kernel, lat), dtype=dtype)

    def block_fn(w, tokens, valid, b_dec, saved):
        (p_e, dead_e), (xc_b, gate_b) = w, tokens
        # The backward reuses the forward's top-k and values: no encoder matmul, no top-k again.
        chosen = None if saved is None else (saved.indices, saved.latents)
        out = one(p_e, xc_b, b_dec, gate=gate_b, valid=valid, dead_ids=dead_e, chosen=chosen)
        return out._replace(recon=out.recon.astype(dtype))

    padded = (blocks.to_blocks(xc, plan), blocks.to_blocks(gate, plan))
    out = blocks.map_blocks(block_fn, (p, dead), padded, plan, shared=(b_dec,),
                             token_grads=False, reuse_outputs=True)  # fmt: skip
    fired = jnp.zeros((n, lat), jnp.float32).at[plan.block_expert].add(out.fired)
    return TokenOut(
        recon=blocks.from_blocks(out.recon, plan).astype(jnp.float32),
        kept=jnp.ones(expert.shape, bool),
        fired=fired,
        l0_sum=jnp.sum((out.latents > 0) * plan.valid[..., None]),
        aux_err=out.aux_err.sum(),
        aux_norm=out.aux_norm.sum(),
        rows=(plan.used_blocks * block).astype(jnp.float32),
    )


def run_dropless_exchanged(
    p: ExpertParams,
    xc: jax.Array,
    b_dec: jax.Array,
    expert: jax.Array,
    gate: jax.Array,
    dead: jax.Array | None,
    *,
    expert_axis: str,
    num_experts: int,
    k: int,
    k_aux: int,
    kernel: str,
    dtype: str,
    block_size: int = 0,
) -> TokenOut:
    """Dropless across the devices of `expert_axis`; call inside `jax.shard_map`.

    This device's tokens: xc [T_local, d] centred in `dtype`, expert [T_local] (global ids;
    device j holds experts [j * N_local, (j + 1) * N_local)), gate [T_local]. Its experts:
    p leaves [N_local, ...], dead [N_local, B] ids or None. Returns the TokenOut of this device's
    tokens (recon [T_local, d]), with fired and the sums over the tokens its experts ran.
    """
    devices, tokens = jax.lax.axis_size(expert_axis), xc.shape[0]
    n_local = num_experts // devices
    order, send_sizes = exchange.sort_by_destination(expert // n_local, devices)
    trip_out, trip_back = exchange.plan_exchange(send_sizes, expert_axis)
    rows = exchange.max_received_rows(devices, tokens)

    def send(v):
        return exchange.ragged_exchange(v[order], trip_out, expert_axis, rows)

    out = run_dropless(
        p, send(xc), b_dec, send(expert % n_local), send(gate), dead, k=k, k_aux=k_aux,
        kernel=kernel, dtype=dtype, block_size=block_size or auto_block_size(tokens, n_local),
        present=jnp.arange(rows) < jnp.sum(trip_out.recv_sizes),
    )  # fmt: skip
    back = exchange.ragged_exchange(out.recon.astype(dtype), trip_back, expert_axis, tokens)
    recon = jnp.zeros_like(back).at[order].set(back, unique_indices=True)
    return out._replace(recon=recon.astype(jnp.float32), kept=jnp.ones(tokens, bool))
