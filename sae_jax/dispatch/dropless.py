"""Dropless dispatch: every token runs its routed expert, nothing is dropped.

On the experts' device, tokens are sorted by expert and each expert's group is padded to
blocks of B rows (sae_jax/dispatch/blocks.py); each block runs the same per-expert forward and AuxK
as the capacity path (`kernels.expert.expert_out`) with its expert's weights. The layout has room
for T / B + N blocks (what any routing may need) but only the blocks holding tokens run, so
the work is that of at most T + N * B rows, and no [N, T, .] buffer is built.

Across devices (`run_exchanged`, experts split over an 'expert' mesh axis of E
devices), each device sends exactly its routed rows to the experts' devices with a ragged
all-to-all (sae_jax/dispatch/exchange.py) and gets the reconstructions back the same way.
The receive buffer must hold E * T_local rows (any routing may send every token to one device); its
unused rows get no block.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sae_jax.dispatch import blocks, exchange
from sae_jax.dispatch.routed import Routed, TokenOut
from sae_jax.kernels.expert import ExpertParams, ExpertRows, ExpertSettings, expert_out

MIN_BLOCK, MAX_BLOCK = 8, 256


def auto_block_size(tokens: int, num_experts: int) -> int:
    """B for T tokens over N experts: the largest power of 2 <= T / (4N), within
    [MIN_BLOCK, MAX_BLOCK]. The T + N * B rows computed are then at most 1.25 T (as with a
    capacity factor of 1.25) where B is not clamped; smaller blocks mean more, smaller
    matmuls."""
    per_block = max(1, tokens // (4 * num_experts))
    return int(min(MAX_BLOCK, max(MIN_BLOCK, 1 << (per_block.bit_length() - 1))))


def run(routed: Routed, p: ExpertParams, dead_ids: jax.Array | None, s: ExpertSettings) -> TokenOut:
    """Every token through its routed expert, one block of B same-expert tokens at a time, all
    experts on this device (p leaves [N, ...]); s.block_size 0: `auto_block_size`. The recon is
    rounded to s.dtype as the capacity path's buffers are. See dispatch/routed.py."""
    return run_blocks(routed, p, dead_ids, s)


def run_blocks(
    routed: Routed,
    p: ExpertParams,
    dead_ids: jax.Array | None,
    s: ExpertSettings,
    present: jax.Array | None = None,
) -> TokenOut:
    """`run`, where rows with present [T] False hold no token (a received buffer's unused
    rows; None: all rows are tokens): they get no block row and read zeros."""
    n, lat = p.w_enc.shape[:2]
    block = s.block_size or auto_block_size(routed.x.shape[0], n)
    plan = blocks.plan_blocks(routed.expert, n, block, present)

    def block_fn(w, tokens, valid, b_dec, saved):
        (p_e, dead_e), (xc_b, gate_b, chosen_b) = w, tokens
        # The backward reuses the forward's top-k and values: no encoder matmul, no top-k again.
        rows = ExpertRows(xc_b, gate_b, valid, chosen_b)
        out = expert_out(p_e, rows, b_dec, dead_e, s, saved)
        # No per-block fired [L]: stacked over the blocks it would be [blocks, L].
        return out._replace(recon=out.recon.astype(s.dtype), fired=None)

    tokens = (routed.x, routed.gate, routed.chosen)
    padded = jax.tree.map(lambda a: blocks.to_blocks(a, plan), tokens)
    # Only the top-k ids and values are kept for the backward, not the [rows, d] recon.
    out = blocks.map_blocks(block_fn, (p, dead_ids), padded, plan, shared=(routed.b_dec,),
                            token_grads=False, keep=_kept_choice)  # fmt: skip
    active = (out.latents > 0) * plan.valid[..., None]  # [blocks, B, k]
    result = TokenOut(
        recon=blocks.from_blocks(out.recon, plan).astype(jnp.float32),
        kept=jnp.ones(routed.expert.shape, bool),
        fired=_fired(out.indices, active, plan.block_expert, (n, lat), s.encode_only),
        l0_sum=jnp.sum(active),
        aux_err=out.aux_err.sum(),
        aux_norm=out.aux_norm.sum(),
        rows=(plan.used_blocks * block).astype(jnp.float32),
        kind_sums=None if out.kind_sums is None else out.kind_sums.sum(axis=0),
    )
    if s.encode_only:
        lat_ids = (blocks.from_blocks(out.latents, plan), blocks.from_blocks(out.indices, plan))
        result = result._replace(latents=lat_ids[0], indices=lat_ids[1])
    if out.aux_recon is not None:
        result = result._replace(aux_recon=blocks.from_blocks(out.aux_recon, plan))
    return result


def _kept_choice(o):
    """What a block's backward reuses of its forward (`centred_forward`'s chosen): the ids and
    the ReLU values, or for the 'jump' rule the pre-activations."""
    return o.indices, o.latents if o.selected is None else o.selected


def _fired(
    indices: jax.Array, active: jax.Array, block_expert: jax.Array, shape, encode_only: bool
) -> jax.Array:
    """[N, L] float32: the valid rows on which each latent fired, counted from the blocks'
    top-k ids [blocks, B, k] and whether each fired on a valid row (active [blocks, B, k]
    bool); zeros for
    the candidates of a global TopK (encode_only), which fire nothing."""
    fired = jnp.zeros(shape, jnp.float32)
    if encode_only:
        return fired
    return fired.at[block_expert[:, None, None], indices].add(active)


def run_exchanged(
    routed: Routed, p: ExpertParams, dead_ids: jax.Array | None, s: ExpertSettings
) -> TokenOut:
    """Dropless across the E devices of `s.expert_axis`; call inside `jax.shard_map`.

    routed: this device's T_local tokens (global expert ids; device j holds experts
    [j * N_local, (j + 1) * N_local)); p, dead_ids: its N_local experts. Returns the TokenOut
    of this device's tokens (recon [T_local, d]), with fired and the sums over the tokens its
    experts ran.
    """
    axis, tokens = s.expert_axis, routed.x.shape[0]
    devices, n_local = jax.lax.axis_size(axis), p.w_enc.shape[0]
    order, send_sizes = exchange.sort_by_destination(routed.expert // n_local, devices)
    trip_out, trip_back = exchange.plan_exchange(send_sizes, axis)
    rows = exchange.max_received_rows(devices, tokens)

    def send(v):
        return exchange.ragged_exchange(v[order], trip_out, axis, rows)

    chosen = None if routed.chosen is None else tuple(map(send, routed.chosen))
    received = Routed(send(routed.x), send(routed.expert % n_local), send(routed.gate),
                      routed.b_dec, chosen)  # fmt: skip
    # Blocks sized for the tokens a device routes, not for the receive buffer's worst case.
    s = dataclasses.replace(s, block_size=s.block_size or auto_block_size(tokens, n_local))
    present = jnp.arange(rows) < jnp.sum(trip_out.recv_sizes)
    out = run_blocks(received, p, dead_ids, s, present)

    def back(v):
        got = exchange.ragged_exchange(v, trip_back, axis, tokens)
        return jnp.zeros_like(got).at[order].set(got, unique_indices=True)

    if s.encode_only:  # candidates only: there is no reconstruction to bring back
        recon = jnp.zeros(routed.x.shape, jnp.float32)
        out = out._replace(latents=back(out.latents), indices=back(out.indices))
    else:
        recon = back(out.recon.astype(s.dtype)).astype(jnp.float32)
    out = out._replace(recon=recon, kept=jnp.ones(tokens, bool))
    if out.aux_recon is not None:
        out = out._replace(aux_recon=back(out.aux_recon.astype(s.dtype)).astype(jnp.float32))
    return out
