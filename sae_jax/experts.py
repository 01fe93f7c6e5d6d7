"""One expert: a TopK SAE applied to a buffer of dispatched tokens, plus its AuxK term.

The encoder matmul that picks the top-k latents runs without gradient; the k chosen
pre-activations are recomputed from gathered encoder rows, so the backward pass touches only
[C, k, d] weights instead of a dense [C, L] x [L, d] product (the sparse trick of Gao et al.).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


class ExpertParams(NamedTuple):
    w_enc: jax.Array  # [L, d] encoder rows (the transpose of the paper's W_enc)
    b_enc: jax.Array  # [L]
    w_dec: jax.Array  # [L, d] unit-norm decoder rows


class ExpertOut(NamedTuple):
    recon: jax.Array  # [E, C, d] ungated decoder output W_dec^T z (no b_dec)
    latents: jax.Array  # [E, C, k] post-ReLU values of the chosen latents
    indices: jax.Array  # [E, C, k] int32 latent ids inside the expert
    fired: jax.Array  # [E, L] float32 count of valid tokens on which each latent fired
    aux_err: jax.Array  # [] sum over valid tokens of ||residual - aux recon||^2
    aux_norm: jax.Array  # [] sum over valid tokens of ||residual||^2


def preactivations(xc: jax.Array, p: ExpertParams) -> jax.Array:
    """W_enc (x - b_dec) + b_enc without gradient: [C, d] -> [C, L]. Used only to select."""
    return jax.lax.stop_gradient(xc @ p.w_enc.T + p.b_enc)


def select_topk(xc: jax.Array, p: ExpertParams, pre: jax.Array, k: int):
    """TopK(ReLU(pre)): values [C, k] (>= 0, with gradient) and latent ids [C, k]."""
    _, idx = jax.lax.top_k(pre, k)
    return _recompute(xc, p, idx), idx


def _recompute(xc: jax.Array, p: ExpertParams, idx: jax.Array) -> jax.Array:
    rows = p.w_enc[idx]  # [C, k, d]
    return jax.nn.relu(jnp.einsum("cd,ckd->ck", xc, rows) + p.b_enc[idx])


def decode(values: jax.Array, idx: jax.Array, w_dec: jax.Array) -> jax.Array:
    """Sparse decode sum_j values[:, j] * W_dec[idx[:, j]]: [C, k] -> [C, d]."""
    return jnp.einsum("ck,ckd->cd", values, w_dec[idx])


def expert_forward(p: ExpertParams, xc: jax.Array, valid: jax.Array, *, k: int):
    """One expert's TopK SAE on its buffer.

    xc: [C, d] centred tokens x - b_dec; valid: [C] bool (False for empty slots).
    Returns recon [C, d] (W_dec^T z, ungated, no b_dec), latents [C, k], indices [C, k] and
    fired [L], the count of valid tokens on which each latent was active, and the
    gradient-free pre-activations [C, L] (reused by AuxK).
    """
    pre = preactivations(xc, p)
    latents, idx = select_topk(xc, p, pre, k)
    recon = decode(latents, idx, p.w_dec)
    active = (latents > 0) * valid.astype(jnp.float32)[:, None]
    fired = jnp.zeros(p.w_enc.shape[0], jnp.float32).at[idx].add(active)
    return recon, latents, idx, fired, pre


def _auxk_sums(p: ExpertParams, xc, gate, valid, dead, recon, pre, k_aux: int):
    """AuxK on one expert: reconstruct the frozen residual x - x_hat with its top-k_aux dead
    latents. Returns sum over valid tokens of ||residual - aux||^2 and of ||residual||^2.
    dead: [L] bool; gate: [C] router probability (the aux output is gated like the main one).
    """
    g = gate[:, None]
    residual = xc - g * recon
    dead_pre = jnp.where(dead, jax.nn.relu(pre), 0.0)
    _, aux_idx = jax.lax.top_k(dead_pre, k_aux)
    aux_vals = _recompute(xc, p, aux_idx) * dead[aux_idx]
    aux_recon = g * decode(aux_vals, aux_idx, p.w_dec)
    validf = valid.astype(jnp.float32)[:, None]
    return jnp.sum(validf * (residual - aux_recon) ** 2), jnp.sum(validf * residual**2)


def _auxk_total(p, xc, gate, valid, dead, recon, pre, k_aux):
    err, norm = jax.vmap(functools.partial(_auxk_sums, k_aux=k_aux))(
        p, xc, gate, valid, dead, recon, pre
    )
    return err.sum(), norm.sum()


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def auxk_loss_sums(p: ExpertParams, xc, gate, valid, dead, recon, pre, k_aux: int):
    """AuxK sums over all local experts ([E, ...] inputs), computed only when some latent is
    dead. Gradient reaches the expert weights only (the residual target is frozen). A custom
    VJP keeps the cond's untaken branch free: no residual buffers are built for it.
    """
    zero = jnp.zeros_like(pre, shape=())  # keeps pre's varying mesh axes under shard_map
    args = (p, xc, gate, valid, dead, recon, pre)
    return jax.lax.cond(dead.any(), lambda: _auxk_total(*args, k_aux), lambda: (zero, zero))


def _auxk_fwd(*args):
    return auxk_loss_sums(*args), args[:-1]


def _auxk_bwd(k_aux, res, cotangents):
    p, xc, gate, valid, dead, recon, pre = res

    def grad_p():
        _, vjp = jax.vjp(lambda q: _auxk_total(q, xc, gate, valid, dead, recon, pre, k_aux), p)
        return vjp(cotangents)[0]

    zeros = jax.tree.map(jnp.zeros_like, p)
    g = jax.lax.cond(dead.any(), grad_p, lambda: zeros)
    return g, jnp.zeros_like(xc), jnp.zeros_like(gate), None, None, jnp.zeros_like(recon), None


auxk_loss_sums.defvjp(_auxk_fwd, _auxk_bwd)


def run_experts(
    p: ExpertParams,
    xc: jax.Array,
    gate: jax.Array,
    valid: jax.Array,
    dead: jax.Array,
    *,
    k: int,
    k_aux: int,
) -> ExpertOut:
    """All local experts on their buffers: p leaves [E, ...], xc [E, C, d], gate/valid [E, C],
    dead [E, L]. AuxK runs only when some latent is dead; it holds no collective, so each
    device may decide alone.
    """
    forward = jax.vmap(functools.partial(expert_forward, k=k))
    recon, latents, idx, fired, pre = forward(p, xc, valid)
    if k_aux == 0:
        zero = jnp.zeros((), jnp.float32)
        return ExpertOut(recon, latents, idx, fired, zero, zero)
    aux_err, aux_norm = auxk_loss_sums(p, xc, gate, valid, dead, recon, pre, k_aux)
    return ExpertOut(recon, latents, idx, fired, aux_err, aux_norm)
