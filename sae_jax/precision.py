"""Mixed precision for the expert matmuls: operands in the compute dtype, float32 accumulation.

`SAEConfig.compute_dtype` ('auto', 'float32' or 'bfloat16') names the dtype of the expert
matmul operands and of the dispatched token buffers. Everything else (router, top-k values,
losses, reductions, parameters and Adam state) stays float32; parameters are cast at use.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


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
