"""One expert: a TopK SAE applied to a buffer of dispatched tokens, plus its AuxK term.

The top-k latents are chosen on gradient-free pre-activations; gradients reach only the k
chosen latents. Two kernels compute the chosen values and the decode:

- `gather` (wide experts): values are read off the gradient-free pre-activations, and the
  decode and both gradients touch only the k rows of each token (sae_jax/kernels/sparse_rows.py,
  one of the k at a time), so no [C, L] x [L, d] product is differentiated (Gao et al.'s
  sparse trick).
- `dense` (narrow experts, the usual Switch case): values are read off the [C, L]
  pre-activation matmul and decoding multiplies the sparse [C, L] codes by W_dec; every
  step is a plain matmul, which beats gathering k*d floats per token once L is small.

Tokens arrive centred (x - b_dec, computed in float32 before any rounding to the compute
dtype), so a large mean does not cancel in the encoder matmul; b_dec's encoder gradient comes
through an [L]-sized term whose value is zero (`with_b_dec_grad`), so no gradient with respect
to a [C, d] token buffer is formed. The matmuls take operands in the compute dtype
(sae_jax/precision.py) and accumulate in float32; top-k runs on float32 pre-activations.

`SAEConfig.expert_kernel = 'auto'` picks dense for experts of at most 1024 latents (on CPU the two
tie at 1024; dense is 1.8x faster at 256 latents and 1.8x slower at 4096; measured before
the gather kernel's slot-by-slot ops).

AuxK runs on each expert's dead latents only: their ids, compacted on device to one of a few
static sizes B (`dead_buckets`, chosen on the host from lagged counts, see train_step), give
[C, B] pre-activations, a top-k_aux among them and a [C, B] x [B, d] decode, so its cost
follows the number of dead latents; a step with none compiles no AuxK. B is capped at a
share of the expert's latents (`max_bucket`, TrainConfig.aux_max_share): with more dead
latents than that, each step takes B of them, starting at a latent id that moves by B every
step, so all of them take turns and AuxK never costs more than a fixed share of the step.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sae_jax import precision
from sae_jax.kernels import sparse_rows

DENSE_MAX_LATENTS = 1024
# AuxK runs on the dead latents only, compacted to one of a few static sizes (`dead_buckets`).
AUX_MIN_BUCKET, AUX_BUCKET_GROWTH = 16, 4


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


def encode_selected(xc, p: ExpertParams, idx, pre, pre_grad=None, value=None):
    """ReLU of the pre-activations of latents idx [C, k] -> [C, k] float32, with gradient.

    xc: [C, d] centred tokens; pre: the gradient-free [C, L] pre-activations; pre_grad: the
    differentiable ones (dense kernel); None reads the values off `pre` and sends the
    gradient to the k rows (sparse_rows.selected_preactivations). value: [C, k] the ReLU
    values a forward computed already: returned as they are, with the same gradient, so
    nothing reads `pre` or `pre_grad` and their matmul is dead code.
    """
    if pre_grad is not None:
        selected = jnp.take_along_axis(pre_grad, idx, axis=1)
    else:
        selected = sparse_rows.selected_preactivations(pre, idx, xc, p.w_enc, p.b_enc)
    return jax.nn.relu(selected if value is None else valued_as(selected, value))


@jax.custom_vjp
def valued_as(x: jax.Array, value: jax.Array) -> jax.Array:
    """`value` with the gradient of x. For value = relu(x) computed before, relu(valued_as(x,
    value)) has relu(x)'s value and gradient (the same mask, value > 0 where x > 0), and
    nothing reads x: its computation is dead code."""
    return value


def _valued_fwd(x, value):
    return value, None


def _valued_bwd(_, g):
    return g, None


valued_as.defvjp(_valued_fwd, _valued_bwd)


def decode(
    values: jax.Array, idx: jax.Array, w_dec: jax.Array, dense: bool, dtype: str = "float32"
) -> jax.Array:
    """sum_j values[:, j] * W_dec[idx[:, j]]: [C, k] -> [C, d] float32; idx distinct per row
    (a top-k's), which makes the codes' scatter and its gradient plain scatters (with
    duplicates allowed, JAX differentiates a scatter by scattering ids to find each winner)."""
    if dense:
        rows = jnp.arange(values.shape[0])[:, None]
        codes = jnp.zeros((values.shape[0], w_dec.shape[0]), dtype)
        codes = codes.at[rows, idx].set(values.astype(dtype), unique_indices=True)
        return precision.einsum("cl,ld->cd", codes, w_dec, dtype)
    return sparse_rows.gather_decode(values, idx, w_dec.astype(dtype))


def expert_forward(
    p: ExpertParams, x, b_dec, valid, *, k: int, dense: bool, dtype: str = "float32"
):
    """One expert's TopK SAE on a buffer of raw tokens x [C, d]; see `centred_forward`."""
    return centred_forward(p, centre(x, b_dec, dtype), b_dec, valid, k=k, dense=dense, dtype=dtype)


def centred_forward(
    p: ExpertParams, xc, b_dec, valid, *, k: int, dense: bool, dtype: str = "float32",
    chosen: tuple[jax.Array, jax.Array] | None = None,
):  # fmt: skip
    """One expert's TopK SAE on its buffer.

    xc: [C, d] dispatched tokens, centred (x - b_dec) in the compute dtype; b_dec: [d] (for
    its gradient); valid: [C] bool (False for empty slots); chosen: (indices, latents) [C, k]
    that a forward of the same weights and tokens returned, reused instead of the top-k and
    the encoder values (a backward then needs no encoder matmul; see grouped.map_blocks).
    Returns recon [C, d] (W_dec^T z, ungated, no b_dec), latents [C, k], indices [C, k],
    fired [L] (valid tokens on which each latent was active), all float32 but the indices.
    """
    p = with_b_dec_grad(p, b_dec)
    pre_grad = dense_preactivations(xc, p, dtype)
    pre = jax.lax.stop_gradient(pre_grad)
    idx, value = (jax.lax.top_k(pre, k)[1], None) if chosen is None else chosen
    latents = encode_selected(xc, p, idx, pre, pre_grad if dense else None, value)
    recon = decode(latents, idx, p.w_dec, dense, dtype)
    active = (latents > 0) * valid.astype(jnp.float32)[:, None]
    fired = jnp.zeros(p.w_enc.shape[0], jnp.float32).at[idx].add(active)
    return recon, latents, idx, fired


def dead_buckets(latents: int) -> tuple[int, ...]:
    """The static sizes a compacted dead set is padded to: AUX_MIN_BUCKET times powers of
    AUX_BUCKET_GROWTH below `latents`, then `latents` itself (a handful of compiled steps)."""
    sizes, size = [], AUX_MIN_BUCKET
    while size < latents:
        sizes.append(size)
        size *= AUX_BUCKET_GROWTH
    return (*sizes, latents)


def max_bucket(latents: int, max_share: float = 1.0) -> int:
    """The largest bucket AuxK may use: the largest of `dead_buckets(latents)` within
    max_share * latents (at least the smallest bucket)."""
    fits = [b for b in dead_buckets(latents) if b <= max_share * latents]
    return max(fits, default=dead_buckets(latents)[0])


def bucket_for(dead_count: int, latents: int, max_share: float = 1.0) -> int:
    """The smallest of `dead_buckets(latents)` that holds `dead_count` dead latents, capped at
    `max_bucket(latents, max_share)`; 0 for none."""
    if dead_count <= 0:
        return 0
    fits = next(b for b in dead_buckets(latents) if b >= dead_count)
    return min(fits, max_bucket(latents, max_share))


def compact_dead(dead: jax.Array, size: int, start: jax.Array | int = 0) -> jax.Array:
    """Dead masks [E, L] bool -> [E, size] int32: each expert's first `size` dead latent ids
    counting cyclically from latent `start` (the same for every expert), padded with L."""
    lat = dead.shape[-1]
    rolled = jnp.roll(dead, -start, axis=-1)
    ids = jax.vmap(lambda m: jnp.nonzero(m, size=size, fill_value=lat)[0])(rolled)
    return jnp.where(ids < lat, (ids + start) % lat, lat).astype(jnp.int32)


def _auxk_sums(p: ExpertParams, xc, gate, valid, dead_ids, recon, k_aux, dtype):
    """AuxK on one expert: reconstruct the frozen residual x - x_hat with its top-k_aux dead
    latents. Returns the sums over valid tokens of ||residual - aux||^2 and ||residual||^2,
    both 0 when this expert has no dead latent (tokens of experts without dead latents do not
    dilute the normalised loss).

    Only the B dead columns are computed: their [C, B] pre-activations, top-k_aux over them
    (none needed when B <= k_aux) and the decode through their B rows, so the cost is
    proportional to the bucket B, not to L.
    xc: [C, d] centred tokens; dead_ids: [B] int32 dead latent ids padded with L (see
    `compact_dead`); gate: [C] router probability (the aux output is gated like the main
    one). Only the expert weights get a gradient: the residual, gate and b_dec are constants.
    """
    lat = p.w_enc.shape[0]
    ok = dead_ids < lat
    ids = jnp.where(ok, dead_ids, 0)
    xc, g = (jax.lax.stop_gradient(v) for v in (xc, gate[:, None]))
    residual = jax.lax.stop_gradient(xc.astype(jnp.float32) - g * recon)
    validf = valid.astype(jnp.float32)[:, None] * jnp.any(ok)
    if ids.shape[0] < lat:  # the B dead rows, gathered
        w_enc, b_enc, w_dec = p.w_enc[ids], p.b_enc[ids], p.w_dec[ids]
    else:  # every latent: the weights as they are (a gather would copy them), dead ones masked
        w_enc, b_enc, w_dec = p
        ok = jnp.zeros(lat, jnp.int32).at[ids].max(ok.astype(jnp.int32)) > 0
    pre = precision.einsum("cd,bd->cb", xc, w_enc, dtype) + b_enc  # [C, B]
    acts = jax.nn.relu(pre) * ok
    if k_aux < ids.shape[0]:  # keep each token's k_aux largest; the rest decode as zeros
        _, top = jax.lax.top_k(jax.lax.stop_gradient(acts), k_aux)
        rows = jnp.arange(acts.shape[0])[:, None]
        acts = acts * jnp.zeros_like(acts).at[rows, top].set(1.0)
    aux_recon = g * precision.einsum("cb,bd->cd", acts, w_dec, dtype)
    return jnp.sum(validf * (residual - aux_recon) ** 2), jnp.sum(validf * residual**2)


def expert_out(
    p: ExpertParams, xc, b_dec, gate, valid, dead_ids, *, k: int, k_aux: int, dense: bool,
    dtype: str = "float32", chosen: tuple[jax.Array, jax.Array] | None = None,
) -> ExpertOut:  # fmt: skip
    """One expert on one buffer of its tokens: the forward and, given dead ids, AuxK.

    p leaves for one expert ([L, d], [L]); xc [C, d] centred tokens; gate/valid [C];
    dead_ids [B] int32 (`compact_dead`) or None (no AuxK); chosen: see `centred_forward`.
    Returns ExpertOut for this buffer (recon [C, d], ..., fired [L], AuxK sums []).
    """
    recon, latents, idx, fired = centred_forward(p, xc, b_dec, valid, k=k, dense=dense,
                                                 dtype=dtype, chosen=chosen)  # fmt: skip
    if dead_ids is None or k_aux == 0:
        zero = jnp.zeros_like(recon, shape=())  # keeps the varying mesh axes under shard_map
        return ExpertOut(recon, latents, idx, fired, zero, zero)
    err, norm = _auxk_sums(p, xc, gate, valid, dead_ids, recon, k_aux, dtype)
    return ExpertOut(recon, latents, idx, fired, err, norm)


def run_experts(
    p: ExpertParams,
    xc: jax.Array,
    b_dec: jax.Array,
    gate: jax.Array,
    valid: jax.Array,
    dead_ids: jax.Array | None,
    *,
    k: int,
    k_aux: int,
    kernel: str = "auto",
    dtype: str = "float32",
) -> ExpertOut:
    """All local experts on their buffers: p leaves [E, ...], xc [E, C, d] centred tokens
    (x - b_dec, see `centre`) in the compute dtype `dtype`, b_dec [d], gate/valid [E, C],
    dead_ids [E, B] (`compact_dead`; None: no AuxK). Whether any latent is dead, and the
    bucket B, are decided once per step, outside (see train_step), so a step without dead
    latents compiles no AuxK at all.
    """
    dense = use_dense(kernel, p.w_enc.shape[1])
    one = functools.partial(expert_out, k=k, k_aux=k_aux, dense=dense, dtype=dtype)
    if dense:  # batched matmuls
        dead_axis = None if dead_ids is None else 0
        out = jax.vmap(one, in_axes=(0, 0, None, 0, 0, dead_axis))(p, xc, b_dec, gate, valid,
                                                                     dead_ids)  # fmt: skip
    else:  # one expert at a time: vmapped, the gather kernel's row gathers ran 4x slower
        out = jax.lax.map(lambda a: one(a[0], a[1], b_dec, a[2], a[3], a[4]),
                          (p, xc, gate, valid, dead_ids))  # fmt: skip
    return out._replace(aux_err=out.aux_err.sum(), aux_norm=out.aux_norm.sum())
