"""Data-dependent initialisation: the geometric median of a sample for b_dec and b_router."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnames=("iters",))
def geometric_median(points: jax.Array, iters: int = 64, eps: float = 1e-6) -> jax.Array:
    """Weiszfeld's algorithm: argmin_y sum_i ||x_i - y||. points: [n, d] -> [d]."""
    points = points.astype(jnp.float32)

    def step(y, _):
        w = 1.0 / jnp.maximum(jnp.linalg.norm(points - y, axis=-1), eps)
        return (w[:, None] * points).sum(0) / w.sum(), None

    y, _ = jax.lax.scan(step, points.mean(0), None, length=iters)
    return y
