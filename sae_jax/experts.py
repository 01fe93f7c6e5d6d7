"""One expert: a TopK SAE applied to a buffer of dispatched tokens, plus its AuxK term.

The top-k latents are chosen on gradient-free pre-activations; gradients reach only the k
chosen latents. Two kernels compute the chosen values and the decode:

- `gather` (wide experts): the k encoder/decoder rows of each token are gathered
  ([C, k, d]), so no [C, L] x [L, d] product is differentiated (Gao et al.'s sparse trick).
- `dense` (narrow experts, the usual Switch case): values are read off the [C, L]
  pre-activation matmul and decoding multiplies the sparse [C, L] codes by W_dec; every
  step is a plain matmul, which beats gathering k*d floats per token once L is small.

Tokens arrive centred (x - b_dec, computed in float32 before any rounding to the compute
dtype), so a large mean does not cancel in the encoder matmul; b_dec's encoder gradient comes
through an [L]-sized term whose value is zero (`with_b_dec_grad`), so no gradient with respect
to a [C, d] token buffer is formed. The matmuls take operands in the compute dtype
(sae_jax/precision.py) and accumulate in float32; top-k runs on float32 pre-activations.

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

from sae_jax import precision

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


class TokenOut(NamedTuple):
    """The experts' results brought back to the tokens, whatever the dispatch."""

    recon: jax.Array  # [T, d] float32 ungated decoder output (zeros for dropped tokens)
    kept: jax.Array  # [T] bool, False where the token was dropped
    fired: jax.Array  # [E, L] float32 tokens on which each local latent fired
    l0_sum: jax.Array  # [] active latents summed over kept tokens
    aux_err: jax.Array  # [] AuxK squared error sum
    aux_norm: jax.Array  # [] AuxK residual norm sum
    rows: jax.Array  # [] float32 token rows the experts computed, padding included


def use_dense(kernel: str, latents: int) -> bool:
    """kernel: one of config.EXPERT_KERNELS (validated by SAEConfig)."""
    return kernel == "dense" or (kernel == "auto" and latents <= DENSE_MAX_LATENTS)


def centre(x: jax.Array, b_dec: jax.Array, dtype: str = "float32") -> jax.Array:
    """x - b_dec in float32, rounded once to the compute dtype: [T, d] -> [T, d].

    Centring before the rounding keeps the tokens' spread when their mean is large against
    it. b_dec gets no gradient here; `with_b_dec_grad` gives it its encoder gradient.
    """
    return (x.astype(jnp.float32) - jax.lax.stop_gradient(b_dec)).astype(dtype)


def with_b_dec_grad(p: ExpertParams, b_dec: jax.Array) -> ExpertParams:
    """p with b_enc + (v - v), v = -W_enc b_dec [L]: the value is exactly b_enc, and the
    gradient reaching b_dec is -(sum over tokens of the pre-activation gradient) @ W_enc,
    what W_enc (x - b_dec) would give it, without forming a [C, d] gradient."""
    v = -(jax.lax.stop_gradient(p.w_enc) @ b_dec)
    return p._replace(b_enc=p.b_enc + (v - jax.lax.stop_gradient(v)))


def dense_preactivations(xc: jax.Array, p: ExpertParams, dtype: str = "float32") -> jax.Array:
    """W_enc xc + b_enc for centred tokens xc [C, d]: [C, L] float32."""
    return precision.einsum("cd,ld->cl", xc, p.w_enc, dtype) + p.b_enc


def encode_selected(xc, p: ExpertParams, idx, pre_grad=None, dtype: str = "float32"):
    """ReLU of the pre-activations of latents idx [C, k] -> [C, k] float32, with gradient.

    xc: [C, d] centred tokens; pre_grad: the differentiable [C, L] pre-activations (dense
    kernel); None gathers rows.
    """
    if pre_grad is not None:
        return jax.nn.relu(jnp.take_along_axis(pre_grad, idx, axis=1))
    rows = p.w_enc[idx]  # [C, k, d]
    return jax.nn.relu(precision.einsum("cd,ckd->ck", xc, rows, dtype) + p.b_enc[idx])


def decode(
    values: jax.Array, idx: jax.Array, w_dec: jax.Array, dense: bool, dtype: str = "float32"
) -> jax.Array:
    """sum_j values[:, j] * W_dec[idx[:, j]]: [C, k] -> [C, d] float32."""
    if dense:
        rows = jnp.arange(values.shape[0])[:, None]
        codes = jnp.zeros((values.shape[0], w_dec.shape[0]), dtype)
        return precision.einsum("cl,ld->cd", codes.at[rows, idx].set(values.astype(dtype)),
                                w_dec, dtype)  # fmt: skip
    return precision.einsum("ck,ckd->cd", values, w_dec[idx], dtype)


def expert_forward(
    p: ExpertParams, x, b_dec, valid, *, k: int, dense: bool, dtype: str = "float32"
):
    """One expert's TopK SAE on a buffer of raw tokens x [C, d]; see `centred_forward`."""
    return centred_forward(p, centre(x, b_dec, dtype), b_dec, valid, k=k, dense=dense, dtype=dtype)


def centred_forward(
    p: ExpertParams, xc, b_dec, valid, *, k: int, dense: bool, dtype: str = "float32"
):
    """One expert's TopK SAE on its buffer.

    xc: [C, d] dispatched tokens, centred (x - b_dec) in the compute dtype; b_dec: [d] (for
    its gradient); valid: [C] bool (False for empty slots).
    Returns recon [C, d] (W_dec^T z, ungated, no b_dec), latents [C, k], indices [C, k],
    fired [L] (valid tokens on which each latent was active) and the gradient-free
    pre-activations [C, L] (reused by AuxK), all float32 but the indices.
    """
    p = with_b_dec_grad(p, b_dec)
    if dense:
        pre_grad = dense_preactivations(xc, p, dtype)
        pre = jax.lax.stop_gradient(pre_grad)
    else:
        pre_grad = None
        pre = jax.lax.stop_gradient(dense_preactivations(xc, p, dtype))
    _, idx = jax.lax.top_k(pre, k)
    latents = encode_selected(xc, p, idx, pre_grad, dtype)
    recon = decode(latents, idx, p.w_dec, dense, dtype)
    active = (latents > 0) * valid.astype(jnp.float32)[:, None]
    fired = jnp.zeros(p.w_enc.shape[0], jnp.float32).at[idx].add(active)
    return recon, latents, idx, fired, pre


def _auxk_sums(p: ExpertParams, xc, gate, valid, dead, recon, pre, k_aux, dense, chunk_bytes,
               dtype):  # fmt: skip
    """AuxK on one expert: reconstruct the frozen residual x - x_hat with its top-k_aux dead
    latents. Returns sum over valid tokens of ||residual - aux||^2 and of ||residual||^2.
    xc: [C, d] centred tokens; dead: [L] bool; gate: [C] router probability (the aux output
    is gated like the main one).
    Only the expert weights get a gradient: the residual, gate and b_dec are constants here.
    """
    xc, g = (jax.lax.stop_gradient(v) for v in (xc, gate[:, None]))
    residual = jax.lax.stop_gradient(xc.astype(jnp.float32) - g * recon)
    dead_pre = jnp.where(dead, jax.nn.relu(pre), 0.0)
    _, aux_idx = jax.lax.top_k(dead_pre, k_aux)
    validf = valid.astype(jnp.float32)[:, None]
    norm = jnp.sum(validf * residual**2)
    if dense:
        aux_vals = encode_selected(xc, p, aux_idx, dense_preactivations(xc, p, dtype), dtype)
        aux_recon = g * decode(aux_vals * dead[aux_idx], aux_idx, p.w_dec, True, dtype)
        return jnp.sum(validf * (residual - aux_recon) ** 2), norm
    error = _gathered_auxk_error(p, xc, g, validf, dead, residual, aux_idx, chunk_bytes, dtype)
    return error, norm


def _gathered_auxk_error(p: ExpertParams, xc, g, validf, dead, residual, aux_idx, chunk_bytes,
                         dtype):  # fmt: skip
    """The AuxK error sum with gathered rows, one chunk of tokens at a time.

    Gathering k_aux rows per token at once would build [C, k_aux, d] buffers (1.6 GB at
    C=4096, k_aux=256, d=384). A scan over chunks of at most chunk_bytes of rows bounds
    that; the backward keeps only each chunk's values and gathers the decoder rows again
    (measured on CPU, N=1, M=16384: peak 3849 -> 1339 MiB, a step with AuxK 2% slower).
    xc, residual: [C, d]; g, validf: [C, 1]; aux_idx: [C, k_aux].
    """
    tokens, k_aux, d = aux_idx.shape[0], aux_idx.shape[1], xc.shape[1]
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
        vals = jax.nn.relu(precision.einsum("cd,ckd->ck", x_c, p.w_enc[idx], dtype) + p.b_enc[idx])
        vals = checkpoint_name(vals, "v")
        aux = g_c * precision.einsum("ck,ckd->cd", vals * dead[idx], p.w_dec[idx], dtype)
        return total + jnp.sum(v * (res - aux) ** 2), None

    args = tuple(split(a) for a in (xc, aux_idx, residual, g, validf))
    total, _ = jax.lax.scan(chunk_error, jnp.zeros_like(residual, shape=()), args)
    return total


def expert_out(
    p: ExpertParams, xc, b_dec, gate, valid, dead, *, k: int, k_aux: int, dense: bool,
    chunk_bytes: int, dtype: str = "float32",
) -> ExpertOut:  # fmt: skip
    """One expert on one buffer of its tokens: the forward and, with a dead mask, AuxK.

    p leaves for one expert ([L, d], [L]); xc [C, d] centred tokens; gate/valid [C];
    dead [L] bool or None (no AuxK). Returns ExpertOut for this buffer (recon [C, d], ...,
    fired [L], AuxK sums []).
    """
    recon, latents, idx, fired, pre = centred_forward(p, xc, b_dec, valid, k=k, dense=dense,
                                                      dtype=dtype)  # fmt: skip
    if dead is None or k_aux == 0:
        zero = jnp.zeros_like(pre, shape=())  # keeps pre's varying mesh axes under shard_map
        return ExpertOut(recon, latents, idx, fired, zero, zero)
    err, norm = _auxk_sums(p, xc, gate, valid, dead, recon, pre, k_aux, dense, chunk_bytes, dtype)
    return ExpertOut(recon, latents, idx, fired, err, norm)


def run_experts(
    p: ExpertParams,
    xc: jax.Array,
    b_dec: jax.Array,
    gate: jax.Array,
    valid: jax.Array,
    dead: jax.Array | None,
    *,
    k: int,
    k_aux: int,
    kernel: str = "auto",
    dtype: str = "float32",
) -> ExpertOut:
    """All local experts on their buffers: p leaves [E, ...], xc [E, C, d] centred tokens
    (x - b_dec, see `centre`) in the compute dtype `dtype`, b_dec [d], gate/valid [E, C],
    dead [E, L] (None: no AuxK). Whether any latent is dead is decided once per step,
    outside (see train_step), so a step without dead latents compiles no AuxK at all.
    """
    one = functools.partial(
        expert_out, k=k, k_aux=k_aux, dense=use_dense(kernel, p.w_enc.shape[1]),
        chunk_bytes=AUX_CHUNK_BYTES // p.w_enc.shape[0],  # the local experts run side by side
        dtype=dtype,
    )  # fmt: skip
    dead_axis = None if dead is None else 0
    out = jax.vmap(one, in_axes=(0, 0, None, 0, 0, dead_axis))(p, xc, b_dec, gate, valid, dead)
    return out._replace(aux_err=out.aux_err.sum(), aux_norm=out.aux_norm.sum())
