"""Dropless experts with `jax.lax.ragged_dot`, the grouped matmul of GPU and TPU.

Tokens sorted by expert (expert i's rows contiguous, groups in expert order, rows that hold no
token last) go through their experts as ragged_dot products with the [N, L, d] weights: no
padding to blocks, no per-block loop. The equations are `kernels.expert.expert_out`'s dense kernel:
the values come from the [R, L] pre-activations, the top-k from their gradient-free copy, the
sparse codes [R, L] multiply W_dec, and AuxK reconstructs the residual with each row's
expert's dead latents.

XLA:CPU lowers ragged_dot to a dense masked product over all N groups (N times the work), and
XLA:GPU may too, so 'auto' runs it on TPU only (dispatch/paths.py) and the block path
(sae_jax/dispatch/blocks.py) elsewhere; the tests run this one on CPU against it. The
products are `precision.ragged_dot`: in bfloat16 the weight gradients stay float32.

It holds [R, L] pre-activations for the R = T_local rows of one device (the
capacity path holds [N, C, L]), so it serves experts that are all on the device; across
devices the receive buffer's worst case (E x T_local rows) would make that E times larger,
and the block path, which computes only the blocks that hold tokens, is used.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sae_jax import precision
from sae_jax.dispatch.routed import Routed, TokenOut
from sae_jax.kernels.expert import ExpertParams, ExpertSettings


def run(routed: Routed, p: ExpertParams, dead_ids: jax.Array | None, s: ExpertSettings) -> TokenOut:
    """Every token through its routed expert, all experts on this device (p leaves [N, ...]),
    as ragged_dot products: the same results as `dropless.run` with the dense kernel (no
    padding rows). See dispatch/routed.py."""
    xc, expert, gate, b_dec = routed.x, routed.expert, routed.gate, routed.b_dec
    k, k_aux, dtype = s.k, s.k_aux, s.dtype
    n, lat = p.w_enc.shape[:2]
    order = jnp.argsort(expert, stable=True)
    sizes = jnp.zeros(n, jnp.int32).at[expert].add(1)
    e_s, xs, g_s = expert[order], xc[order], gate[order][:, None]
    # b_dec's encoder gradient as in expert.with_b_dec_grad: v = -W_enc b_dec per expert.
    v = -jnp.einsum("nld,d->nl", jax.lax.stop_gradient(p.w_enc), b_dec)
    core = _ragged(xs, jnp.swapaxes(p.w_enc, 1, 2), sizes, dtype)  # [T, L]
    pre_grad = core + (p.b_enc + (v - jax.lax.stop_gradient(v)))[e_s]
    pre = jax.lax.stop_gradient(pre_grad)
    _, idx = jax.lax.top_k(pre, k)
    latents = jax.nn.relu(jnp.take_along_axis(pre_grad, idx, axis=1))
    recon = _ragged(_codes(latents, idx, lat, dtype), p.w_dec, sizes, dtype)
    fired = jnp.zeros((n, lat), jnp.float32).at[e_s[:, None], idx].add(latents > 0)
    aux_err = aux_norm = jnp.zeros((), jnp.float32)
    if dead_ids is not None and k_aux:
        # Only the expert weights get AuxK's gradient: residual, gate and b_dec are constants.
        residual = jax.lax.stop_gradient(xs.astype(jnp.float32) - g_s * recon)
        mask = jnp.zeros((n, lat + 1), bool).at[jnp.arange(n)[:, None], dead_ids].set(True)
        mask = mask[:, :lat]  # [N, L]; the padding id L falls off
        dead_s = mask[e_s]  # [T, L]
        _, aux_idx = jax.lax.top_k(jnp.where(dead_s, jax.nn.relu(pre), 0.0), k_aux)
        aux_pre = core + p.b_enc[e_s]
        aux_vals = jax.nn.relu(jnp.take_along_axis(aux_pre, aux_idx, axis=1))
        aux_vals = aux_vals * jnp.take_along_axis(dead_s, aux_idx, axis=1)
        aux = jax.lax.stop_gradient(g_s) * _ragged(
            _codes(aux_vals, aux_idx, lat, dtype), p.w_dec, sizes, dtype
        )
        # Tokens of experts with no dead latent are left out (as in auxk.auxk_sums).
        w = jnp.any(mask, axis=1)[e_s][:, None]
        aux_err, aux_norm = jnp.sum(w * (residual - aux) ** 2), jnp.sum(w * residual**2)
    tokens = expert.shape[0]
    return TokenOut(
        recon=jnp.zeros_like(recon).at[order].set(recon, unique_indices=True),
        kept=jnp.ones(tokens, bool),
        fired=fired,
        l0_sum=jnp.sum(latents > 0).astype(jnp.float32),
        aux_err=aux_err,
        aux_norm=aux_norm,
        rows=jnp.float32(tokens),
    )


def _ragged(lhs: jax.Array, rhs: jax.Array, sizes: jax.Array, dtype: str) -> jax.Array:
    """lhs [R, a] rows grouped by `sizes` [N], times rhs [N, a, b]: [R, b] float32."""
    return precision.ragged_dot(lhs, rhs, sizes, dtype)


def _codes(values: jax.Array, idx: jax.Array, latents: int, dtype: str) -> jax.Array:
    """Sparse codes [R, L] with values [R, k] at idx [R, k]."""
    rows = jnp.arange(values.shape[0])[:, None]
    return jnp.zeros((values.shape[0], latents), dtype).at[rows, idx].set(values.astype(dtype))
