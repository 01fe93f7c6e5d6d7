"""Routing beyond top-1: one TopK over the latents of a token's e experts (Scale SAE's global
TopK, Xu et al. 2025), on any dispatch path.

A token routed to experts i_1..i_e with router probabilities g_1..g_e gets the k latents with
the largest gated values g_j * ReLU(pre-activation) among all e x L latents of its experts, and
decodes x_hat = sum_j g_j W_dec[i_j]^T z_j + b_dec, z_j its chosen latents in expert i_j. With
e = 1 that is the Switch SAE.

Each token travels as e rows, one per expert, choice-major (row j * T + t is token t's j-th
choice, most probable first), so capacity dispatch, which gives slots in row order, places
every token's first choice before any second choice: under overflow a token loses its last
choices first, and rarely all of them. The rows go through the path twice:

1. candidates: every row's expert returns its own top-k values and ids, without gradient
   (`ExpertSettings.encode_only`; the global top-k is among these e x k candidates);
2. the chosen ones: here, on the token's device, the k largest gated candidates are kept and
   sent back with the rows; the experts decode them (`ExpertRows.chosen`), with gradients
   through those values as in a plain TopK. The encoder matmul runs once in stage 1; stage 2
   reuses its values (only the backward's weight gradient touches the encoder again).

AuxK (kernels/auxk.py) is defined on the token: its residual is x - x_hat of the whole token,
and its reconstruction sums the gated AuxK outputs of the token's e experts (each from its
own dead latents, `ExpertSettings.aux_out`), so dead latents learn what no routed expert
explained. A token counts in AuxK's normaliser when one of its experts has a dead latent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from sae_jax.dispatch.routed import DispatchPath, Routed, TokenOut
from sae_jax.kernels.activations import batch_keep
from sae_jax.kernels.records import ExpertParams, ExpertSettings

Choice = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array | None]]
"""choose(latents, indices [T * e, k'] the rows' candidates, token-major; gate [T, e]) ->
(indices, values [T * e, k'] the chosen ones, zero elsewhere; a batch threshold [] or None)."""


def run(
    path: DispatchPath,
    routed: Routed,
    p: ExpertParams,
    dead_ids: jax.Array | None,
    s: ExpertSettings,
    also: jax.Array | None = None,
    choose: Choice | str | None = "top_k",
) -> TokenOut:
    """routed: T tokens with expert and gate [T, e]; p, dead_ids, s as for `path`, with s.k the
    candidates per row; also: [T, d] what the rest of the model reconstructs (a shared
    dictionary), left out of AuxK's residual too; choose: the selection among the rows'
    candidates (default 'top_k': `top_k_choice` of s.k, the global TopK; `batch_choice`:
    BatchTopK over the batch); None: no selection, each row
    keeps its own (a per-row rule; one pass). Returns the tokens' TokenOut with recon [T, d]
    the GATED sum over the e experts (not ungated as a path's), kept [T] all e rows kept, the
    AuxK sums of the whole tokens, and the choice's batch threshold if any."""
    tokens, e = routed.expert.shape
    if choose == "top_k":
        choose = top_k_choice(s.k)
    rows = Routed(jnp.tile(routed.x, (e, 1)), routed.expert.T.reshape(-1),
                  routed.gate.T.reshape(-1), routed.b_dec)  # fmt: skip
    if choose is not None:
        first = path(rows, jax.lax.stop_gradient(p), None, dataclasses.replace(s, encode_only=True))
        candidates = (_token_major(first.latents, e), _token_major(first.indices, e))
        indices, values, threshold = choose(*candidates, routed.gate)
        rows = rows._replace(chosen=(_choice_major(indices, e), _choice_major(values, e)))
    aux = dead_ids is not None and s.k_aux > 0
    out = path(rows, p, dead_ids, dataclasses.replace(s, aux_out=aux))
    recon = _per_token(rows.gate[:, None] * out.recon, tokens)
    result = out._replace(recon=recon, kept=jnp.all(out.kept.reshape(e, tokens), axis=0),
                          aux_recon=None)  # fmt: skip
    if choose is not None:
        result = result._replace(threshold=threshold)
    if aux:
        has_dead = _has_dead(dead_ids, p.w_enc.shape[1], s.expert_axis)
        weight = jnp.any(has_dead[routed.expert], axis=1).astype(jnp.float32)[:, None]
        explained = recon if also is None else recon + also
        residual = jax.lax.stop_gradient(routed.x.astype(jnp.float32) - explained)
        err = residual - _per_token(out.aux_recon, tokens)
        result = result._replace(aux_err=jnp.sum(weight * err**2),
                                 aux_norm=jnp.sum(weight * residual**2))  # fmt: skip
    return result


def top_k_choice(k: int) -> Choice:
    """The global TopK (`select`) of k latents per token."""
    return lambda latents, indices, gate: (*select(latents, indices, gate, k), None)


def batch_choice(k: int, axes: tuple[str, ...], gated: bool = True) -> Choice:
    """BatchTopK over every routed row of the batch on every device of the mesh `axes` (the
    axes the tokens are split over): of all rows' candidates, the k x T largest gated values
    gate x value (as the global TopK compares them; ungated values with gated=False), T the
    tokens of the whole batch (kernels.activations.batch_keep). The threshold is on the
    values compared."""

    def choose(latents, indices, gate):
        tokens = gate.shape[0] * (jax.lax.axis_size(axes) if axes else 1)
        latents = jax.lax.stop_gradient(latents)
        scale = jax.lax.stop_gradient(gate).reshape(-1, 1) if gated else 1.0
        scored, threshold = batch_keep(latents * scale, k, tokens, axes)
        return indices, jnp.where(scored > 0, latents, 0.0), threshold

    return choose


def select(
    latents: jax.Array, indices: jax.Array, gate: jax.Array, k: int
) -> tuple[jax.Array, jax.Array]:
    """The global TopK over a token's rows: latents, indices [T * e, k'] the rows' candidates
    (row t * e + j is token t's j-th expert), gate [T, e]. Keeps, per token, the k largest
    gate * value among its e x k' candidates (ties: the earlier row and slot) and zeroes the
    rest. Returns (indices, values) [T * e, k'] for `Routed.chosen`."""
    tokens, e = gate.shape
    per_row = latents.shape[1]
    values = latents.reshape(tokens, e * per_row)
    scored = values * jnp.repeat(jax.lax.stop_gradient(gate), per_row, axis=1)
    _, top = jax.lax.top_k(scored, k)
    keep = jnp.zeros(scored.shape, bool).at[jnp.arange(tokens)[:, None], top].set(True)
    kept = jnp.where(keep, values, 0.0).reshape(tokens * e, per_row)
    return indices, jax.lax.stop_gradient(kept)


def _per_token(a: jax.Array, tokens: int) -> jax.Array:
    """Sum a token's e rows (choice-major, row j * T + t): [e * T, ...] -> [T, ...]."""
    return a.reshape((-1, tokens) + a.shape[1:]).sum(axis=0)


def _token_major(a: jax.Array, e: int) -> jax.Array:
    """Rows j * T + t -> t * e + j: [e * T, ...] -> [T * e, ...]."""
    return jnp.swapaxes(a.reshape((e, -1) + a.shape[1:]), 0, 1).reshape(a.shape)


def _choice_major(a: jax.Array, e: int) -> jax.Array:
    """Rows t * e + j -> j * T + t, the inverse of `_token_major`."""
    return jnp.swapaxes(a.reshape((-1, e) + a.shape[1:]), 0, 1).reshape(a.shape)


def _has_dead(dead_ids: jax.Array, latents: int, expert_axis: str | None) -> jax.Array:
    """[N] bool: the expert has a dead latent (dead_ids [N_local, B] padded with L), gathered
    over the 'expert' axis inside shard_map."""
    local = jnp.any(dead_ids < latents, axis=1)
    if expert_axis is None:
        return local
    return jax.lax.all_gather(local, expert_axis, tiled=True)
