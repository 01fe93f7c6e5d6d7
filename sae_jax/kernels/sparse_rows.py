"""The gather kernel's sparse ops on k rows per token, one of the k at a time.

Written as one gather of [C, k, d] rows, XLA:CPU builds that buffer and then reduces it, and
transposes the gather into a scatter-add of the whole buffer. A loop over the k slots, each a
[C, d] gather fused into the multiply-add or a [C, d] scatter-add into the row gradient, does
the same work without the [C, k, d] buffer, several times faster (docs/benchmarks.md). The
gradients are written out (custom_vjp): differentiating the loop instead copies the [L, d]
row gradient it carries on every trip.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sae_jax.varying import sum_to_type, zeros_varying


def _slot(idx: jax.Array, j) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(idx, j, axis=1, keepdims=False)


def _scatter_rows(coef: jax.Array, vecs: jax.Array, idx: jax.Array, rows: int) -> jax.Array:
    """sum over (c, j) of coef[c, j] * vecs[c] added to row idx[c, j]: -> [rows, d] float32."""

    def body(j, acc):
        return acc.at[_slot(idx, j)].add(_slot(coef, j)[:, None] * vecs)

    acc = zeros_varying((rows, vecs.shape[1]), jnp.float32, (coef, vecs, idx))
    return jax.lax.fori_loop(0, idx.shape[1], body, acc)


def _gather_dots(w: jax.Array, idx: jax.Array, vecs: jax.Array, dtype=None) -> jax.Array:
    """[C, k]: vecs[c] . w[idx[c, j]] (float32; rows rounded to dtype first, see `_rows`),
    one column per loop step (a stack of the k columns, unrolled, ran slower)."""

    def column(j):
        return jnp.sum(_rows(w, _slot(idx, j), dtype) * vecs, axis=-1)

    def body(j, out):
        return jax.lax.dynamic_update_index_in_dim(out, column(j), j, axis=1)

    out = zeros_varying(idx.shape, jnp.float32, (w, idx, vecs))
    return jax.lax.fori_loop(0, idx.shape[1], body, out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gather_decode(values: jax.Array, idx: jax.Array, w: jax.Array, dtype=None) -> jax.Array:
    """sum_j values[:, j] * w[idx[:, j]]: values [C, k], idx [C, k] int32, w [L, d] -> [C, d]
    float32. dtype: the rows are rounded to it (None: w's dtype), and so is w's gradient.

    The backward keeps w itself, not a rounded copy: in a loop over experts, a residual
    computed in the loop is stacked into an [N, L, d] buffer, one that is the loop's input is
    not. The forward reads a rounded copy (one expert's, a temporary).
    """
    # Without the barrier XLA fuses the producers of values and idx (top-k, the gather from
    # the pre-activations) into every output element of the decode, which made the step slower.
    values, idx = jax.lax.optimization_barrier((values, idx))
    w = w if dtype is None else w.astype(dtype)  # rounded rows, the same as `_rows`'s

    def term(j):  # the slot's [C, d] gather fuses into its multiply-add
        return _slot(values, j)[:, None].astype(jnp.float32) * w[_slot(idx, j)].astype(jnp.float32)

    # A loop, not k unrolled terms: unrolled, XLA:CPU sometimes built all k gathered [C, d]
    # buffers before summing them.
    return jax.lax.fori_loop(1, idx.shape[1], lambda j, out: out + term(j), term(0))


def _rows(w: jax.Array, ids: jax.Array, dtype) -> jax.Array:
    """Rows ids of w rounded to dtype (None: as they are), as float32."""
    rows = w[ids]
    return (rows if dtype is None else rows.astype(dtype)).astype(jnp.float32)


def _decode_fwd(values, idx, w, dtype):
    return gather_decode(values, idx, w, dtype), (values, idx, w)


def _decode_bwd(dtype, res, g):
    primals = res  # their types, before the barrier (which makes its outputs vary alike)
    values, idx, w, g = jax.lax.optimization_barrier((*res, g))
    d_values = _gather_dots(w, idx, g, dtype).astype(values.dtype)
    d_w = _scatter_rows(values.astype(jnp.float32), g, idx, w.shape[0])
    if dtype is not None:  # the gradient of the rounded rows, as before the rounding moved here
        d_w = d_w.astype(dtype)
    return sum_to_type(d_values, primals[0]), None, sum_to_type(d_w.astype(w.dtype), primals[2])


gather_decode.defvjp(_decode_fwd, _decode_bwd)


@jax.custom_vjp
def selected_preactivations(
    pre: jax.Array, idx: jax.Array, xc: jax.Array, w_enc: jax.Array, b_enc: jax.Array
) -> jax.Array:
    """The pre-activations w_enc[i] . xc + b_enc[i] of latents idx [C, k], read off `pre`
    [C, L] (their value, computed already without gradient); the gradient reaches w_enc
    [L, d], b_enc [L] and xc [C, d] as if they had been computed from the gathered rows."""
    return jnp.take_along_axis(pre, idx, axis=1)


def _selected_fwd(pre, idx, xc, w_enc, b_enc):
    return selected_preactivations(pre, idx, xc, w_enc, b_enc), (idx, xc, w_enc, b_enc)


def _selected_bwd(res, g):
    primals = res[1:]  # xc, w_enc, b_enc with their types before the barrier
    idx, xc, w_enc, b_enc, g = jax.lax.optimization_barrier((*res, g.astype(jnp.float32)))
    d_w = _scatter_rows(g, xc.astype(jnp.float32), idx, w_enc.shape[0]).astype(w_enc.dtype)
    d_b = jnp.zeros(b_enc.shape, jnp.float32).at[idx].add(g).astype(b_enc.dtype)
    d_xc = gather_decode(g, idx, w_enc).astype(xc.dtype)
    # A replicated dictionary (the shared one) used on varying tokens: its gradient is the
    # sum over the devices' tokens, as autodiff's transpose of the replication would give.
    grads = (d_xc, d_w, d_b)
    return None, None, *(sum_to_type(g, p) for g, p in zip(grads, primals, strict=True))


selected_preactivations.defvjp(_selected_fwd, _selected_bwd)
