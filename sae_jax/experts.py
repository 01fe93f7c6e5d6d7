"""One expert: a TopK SAE applied to a buffer of dispatched tokens, plus its AuxK term.

The top-k latents are chosen on gradient-free pre-activations; gradients reach only the k
chosen latents. Two kernels compute the chosen values and the decode:

- `gather` (wide experts): the k encoder/decoder rows of each token are gathered
  ([C, k, d]), so no [C, L] x [L, d] product is differentiated (Gao et al.'s sparse trick).
- `dense` (narrow experts, the usual Switch case): values are read off the [C, L]
  pre-activation matmul and decoding multiplies the sparse [C, L] codes by W_dec; every
  step is a plain matmul, which beats gathering k*d floats per token once L is small.
  The encoder takes raw x and subtracts W_enc b_dec as an [L] vector, so no gradient with
  respect to the [C, d] token buffer is ever formed.

`SAEConfig.expert_kernel = 'auto'` picks dense for experts of at most 1024 latents (on CPU the two
tie at 1024; dense is 1.8x faster at 256 latents and 1.8x slower at 4096).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

DENSE_MAX_LATENTS = 1024
AUX_CHUNK_BYTES = 2**28  # gathered AuxK rows held at once by a device (gather kernel)


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


def use_dense(kernel: str, latents: int) -> bool:
    """kernel: one of config.EXPERT_KERNELS (validated by SAEConfig)."""
    return kernel == "dense" or (kernel == "auto" and latents <= DENSE_MAX_LATENTS)


def dense_preactivations(x: jax.Array, b_dec: jax.Array, p: ExpertParams) -> jax.Array:
    """W_enc (x - b_dec) + b_enc with gradient to the weights and b_dec only: [C, L]."""
    return x @ p.w_enc.T - p.w_enc @ b_dec + p.b_enc


def encode_selected(x, b_dec, p: ExpertParams, idx, pre_grad=None) -> jax.Array:
    """ReLU of the pre-activations of latents idx [C, k] -> [C, k], with gradient.

    pre_grad: the differentiable [C, L] pre-activations (dense kernel); None gathers rows.
    """
    if pre_grad is not None:
        return jax.nn.relu(jnp.take_along_axis(pre_grad, idx, axis=1))
    rows = p.w_enc[idx]  # [C, k, d]
    return jax.nn.relu(jnp.einsum("cd,ckd->ck", x - b_dec, rows) + p.b_enc[idx])


def decode(values: jax.Array, idx: jax.Array, w_dec: jax.Array, dense: bool) -> jax.Array:
    """sum_j values[:, j] * W_dec[idx[:, j]]: [C, k] -> [C, d]."""
    if dense:
        rows = jnp.arange(values.shape[0])[:, None]
        codes = jnp.zeros((values.shape[0], w_dec.shape[0]), values.dtype)
        return codes.at[rows, idx].set(values) @ w_dec
    return jnp.einsum("ck,ckd->cd", values, w_dec[idx])


def expert_forward(p: ExpertParams, x, b_dec, valid, *, k: int, dense: bool):
    """One expert's TopK SAE on its buffer.

    x: [C, d] dispatched raw tokens; b_dec: [d]; valid: [C] bool (False for empty slots).
    Returns recon [C, d] (W_dec^T z, ungated, no b_dec), latents [C, k], indices [C, k],
    fired [L] (valid tokens on which each latent was active) and the gradient-free
    pre-activations [C, L] (reused by AuxK).
    """
    if dense:
        pre_grad = dense_preactivations(x, b_dec, p)
        pre = jax.lax.stop_gradient(pre_grad)
    else:
        pre_grad = None
        pre = jax.lax.stop_gradient((x - b_dec) @ p.w_enc.T + p.b_enc)
    _, idx = jax.lax.top_k(pre, k)
    latents = encode_selected(x, b_dec, p, idx, pre_grad)
    recon = decode(latents, idx, p.w_dec, dense)
    active = (latents > 0) * valid.astype(jnp.float32)[:, None]
    fired = jnp.zeros(p.w_enc.shape[0], jnp.float32).at[idx].add(active)
    return recon, latents, idx, fired, pre


def _auxk_sums(p: ExpertParams, x, b_dec, gate, valid, dead, recon, pre, k_aux, dense, chunk_bytes):
    """AuxK on one expert: reconstruct the frozen residual x - x_hat with its top-k_aux dead
    latents. Returns sum over valid tokens of ||residual - aux||^2 and of ||residual||^2.
    dead: [L] bool; gate: [C] router probability (the aux output is gated like the main one).
    Only the expert weights get a gradient: the residual, gate and b_dec are constants here.
    """
    x, b_dec, g = (jax.lax.stop_gradient(v) for v in (x, b_dec, gate[:, None]))
    residual = jax.lax.stop_gradient(x - b_dec - g * recon)
    dead_pre = jnp.where(dead, jax.nn.relu(pre), 0.0)
    _, aux_idx = jax.lax.top_k(dead_pre, k_aux)
    validf = valid.astype(jnp.float32)[:, None]
    norm = jnp.sum(validf * residual**2)
    if dense:
        aux_vals = encode_selected(x, b_dec, p, aux_idx, dense_preactivations(x, b_dec, p))
        aux_recon = g * decode(aux_vals * dead[aux_idx], aux_idx, p.w_dec, dense=True)
        return jnp.sum(validf * (residual - aux_recon) ** 2), norm
    error = _gathered_auxk_error(p, x - b_dec, g, validf, dead, residual, aux_idx, chunk_bytes)
    return error, norm


def _gathered_auxk_error(p: ExpertParams, centred, g, validf, dead, residual, aux_idx, chunk_bytes):
    """The AuxK error sum with gathered rows, one chunk of tokens at a time.

    Gathering k_aux rows per token at once would build [C, k_aux, d] buffers (1.6 GB at
    C=4096, k_aux=256, d=384). A scan over chunks of at most chunk_bytes of rows bounds
    that; the backward keeps only each chunk's values and gathers the decoder rows again
    (measured on CPU, N=1, M=16384: peak 3849 -> 1339 MiB, a step with AuxK 2% slower).
    centred, residual: [C, d]; g, validf: [C, 1]; aux_idx: [C, k_aux].
    """
    tokens, k_aux, d = aux_idx.shape[0], aux_idx.shape[1], centred.shape[1]
    chunks = math.ceil(tokens / max(1, chunk_bytes // (4 * k_aux * d)))
    size = math.ceil(tokens / chunks)
    pad = chunks * size - tokens  # padded tokens have validf = 0

    def split(a):
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
        return a.reshape((chunks, size) + a.shape[1:])

    # Keep only the [size, k_aux] values; the backward regathers the decoder rows.
    @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.save_only_these_names("v"))
    def chunk_error(total, args):
        x_c, idx, res, g_c, v = args
        vals = jax.nn.relu(jnp.einsum("cd,ckd->ck", x_c, p.w_enc[idx]) + p.b_enc[idx])
        vals = checkpoint_name(vals, "v")
        aux = g_c * jnp.einsum("ck,ckd->cd", vals * dead[idx], p.w_dec[idx])
        return total + jnp.sum(v * (res - aux) ** 2), None

    args = tuple(split(a) for a in (centred, aux_idx, residual, g, validf))
    total, _ = jax.lax.scan(chunk_error, jnp.zeros_like(centred, shape=()), args)
    return total


def run_experts(
    p: ExpertParams,
    x: jax.Array,
    b_dec: jax.Array,
    gate: jax.Array,
    valid: jax.Array,
    dead: jax.Array | None,
    *,
    k: int,
    k_aux: int,
    kernel: str = "auto",
) -> ExpertOut:
    """All local experts on their buffers: p leaves [E, ...], x [E, C, d] raw tokens,
    b_dec [d], gate/valid [E, C], dead [E, L] (None: no AuxK). Whether any latent is dead
    is decided once per step, outside (see train_step), so a step without dead latents
    compiles no AuxK at all.
    """
    dense = use_dense(kernel, p.w_enc.shape[1])
    forward = jax.vmap(functools.partial(expert_forward, k=k, dense=dense), in_axes=(0, 0, None, 0))
    recon, latents, idx, fired, pre = forward(p, x, b_dec, valid)
    if dead is None or k_aux == 0:
        zero = jnp.zeros_like(pre, shape=())  # keeps pre's varying mesh axes under shard_map
        return ExpertOut(recon, latents, idx, fired, zero, zero)
    chunk_bytes = AUX_CHUNK_BYTES // p.w_enc.shape[0]  # the local experts run side by side
    one = functools.partial(_auxk_sums, k_aux=k_aux, dense=dense, chunk_bytes=chunk_bytes)
    err, norm = jax.vmap(one, in_axes=(0, 0, None, 0, 0, 0, 0, 0))(
        p, x, b_dec, gate, valid, dead, recon, pre
    )
    return ExpertOut(recon, latents, idx, fired, err.sum(), norm.sum())
