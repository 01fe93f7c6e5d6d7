"""Mixed precision for the expert matmuls: operands in the compute dtype, float32 accumulation.

`SAEConfig.compute_dtype` ('auto', 'float32' or 'bfloat16') names the dtype of the expert
matmul operands and of the dispatched token buffers. Everything else (router, top-k values,
losses, reductions, parameters and Adam state) stays float32; parameters are cast at use.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def resolve(name: str, backend: str | None = None) -> str:
    """The concrete dtype name: 'auto' is float32 on CPU and bfloat16 on GPU/TPU.
    backend: 'cpu', 'gpu' or 'tpu' (default: jax.default_backend())."""
    if name != "auto":
        return name
    return "float32" if (backend or jax.default_backend()) == "cpu" else "bfloat16"


def einsum(spec: str, a: jax.Array, b: jax.Array, dtype: str = "float32") -> jax.Array:
    """jnp.einsum(spec, a, b) on operands cast to `dtype`, accumulated and returned in float32.

    In float32 it is the plain einsum. Below it the backward products take `dtype` operands
    too (the float32 cotangent is rounded to `dtype`) and accumulate in float32; the
    gradients come back in a's and b's own dtypes, so a float32 weight's gradient is never
    rounded to `dtype`. Every index of each operand must appear in the output or in the other
    operand (true of matmuls and batched matmuls).
    """
    if jnp.dtype(dtype) == jnp.float32:
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    return _mixed_einsum(spec, (str(jnp.dtype(dtype)), a.dtype.name, b.dtype.name), a, b)


def _specs(spec: str) -> tuple[str, str, str]:
    inputs, out = spec.replace(" ", "").split("->")
    lhs, rhs = inputs.split(",")
    if set(lhs) - set(out + rhs) or set(rhs) - set(out + lhs):
        raise ValueError(f"einsum {spec!r}: an index summed within one operand")
    return lhs, rhs, out


def _cast_mm(spec: str, a: jax.Array, b: jax.Array, dtype: str) -> jax.Array:
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _mixed_einsum(spec: str, dtypes: tuple[str, str, str], a, b):
    return _cast_mm(spec, a, b, dtypes[0])


def _mixed_fwd(spec, dtypes, a, b):
    a, b = a.astype(dtypes[0]), b.astype(dtypes[0])  # residuals kept in the compute dtype
    return _cast_mm(spec, a, b, dtypes[0]), (a, b)


def _mixed_bwd(spec, dtypes, residuals, g):
    a, b = residuals
    lhs, rhs, out = _specs(spec)
    da = _cast_mm(f"{out},{rhs}->{lhs}", g, b, dtypes[0]).astype(dtypes[1])
    db = _cast_mm(f"{out},{lhs}->{rhs}", g, a, dtypes[0]).astype(dtypes[2])
    return da, db


_mixed_einsum.defvjp(_mixed_fwd, _mixed_bwd)


def ragged_dot(lhs: jax.Array, rhs: jax.Array, sizes: jax.Array, dtype: str = "float32"):
    """`jax.lax.ragged_dot` of lhs [R, a] (rows grouped by sizes [N]) and rhs [N, a, b] on
    operands cast to `dtype`, accumulated and returned in float32: [R, b].

    As `einsum`: below float32 the backward products take `dtype` operands and accumulate in
    float32, and each gradient comes back in its operand's own dtype. (Autodiff of a cast
    ragged_dot would round rhs's gradient to `dtype`: its transpose returns the cast
    operand's dtype.)
    """
    if jnp.dtype(dtype) == jnp.float32:
        f32 = jnp.float32
        lhs, rhs = lhs.astype(f32), rhs.astype(f32)
        return jax.lax.ragged_dot(lhs, rhs, sizes, preferred_element_type=f32)
    return _mixed_ragged((str(jnp.dtype(dtype)), lhs.dtype.name, rhs.dtype.name), lhs, rhs, sizes)


def _grouped_outer(a: jax.Array, g: jax.Array, sizes: jax.Array) -> jax.Array:
    """Per group n: a[rows of n]^T g[rows of n]; a [R, a], g [R, b] -> [N, a, b] float32."""
    dims = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((0,), (0,)), ((), ())),
        lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[],
    )
    return jax.lax.ragged_dot_general(a, g, sizes, dims, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mixed_ragged(dtypes: tuple[str, str, str], lhs, rhs, sizes):
    return jax.lax.ragged_dot(lhs.astype(dtypes[0]), rhs.astype(dtypes[0]), sizes,
                              preferred_element_type=jnp.float32)  # fmt: skip


def _mixed_ragged_fwd(dtypes, lhs, rhs, sizes):
    a, b = lhs.astype(dtypes[0]), rhs.astype(dtypes[0])  # residuals in the compute dtype
    out = jax.lax.ragged_dot(a, b, sizes, preferred_element_type=jnp.float32)
    return out, (a, b, sizes)


def _mixed_ragged_bwd(dtypes, residuals, g):
    a, b, sizes = residuals
    g = g.astype(dtypes[0])
    da = jax.lax.ragged_dot(g, jnp.swapaxes(b, 1, 2), sizes, preferred_element_type=jnp.float32)
    db = _grouped_outer(a, g, sizes)
    zero_sizes = np.zeros(sizes.shape, jax.dtypes.float0)
    return da.astype(dtypes[1]), db.astype(dtypes[2]), zero_sizes


_mixed_ragged.defvjp(_mixed_ragged_fwd, _mixed_ragged_bwd)
