"""Which mesh axes a value varies over inside `jax.shard_map`, and marking the missing ones.

Under `shard_map` every value's type says which mesh axes it varies over. A loop carry, a
buffer that an op writes into, or an accumulator started from constants (zeros) must already
vary over every axis the values written into it vary over, or the loop or op does not
type-check. `vary` marks them (`jax.lax.pcast(..., to="varying")`, which moves no data).
Outside `shard_map` nothing varies and every function here returns its input.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def varying_axes(tree: PyTree) -> tuple[str, ...]:
    """Mesh axes any leaf of `tree` varies over, sorted (empty outside `jax.shard_map`)."""
    axes = set().union(*(jax.typeof(a).mat.varying for a in jax.tree.leaves(tree)))
    return tuple(sorted(axes))


def vary(a: jax.Array, axes: Iterable[str]) -> jax.Array:
    """a, marked varying over the mesh axes `axes` too."""
    missing = tuple(sorted(set(axes) - jax.typeof(a).mat.varying))
    return jax.lax.pcast(a, missing, to="varying") if missing else a


def vary_as(a: jax.Array, like: PyTree) -> jax.Array:
    """a, marked varying over every mesh axis a leaf of `like` varies over."""
    return vary(a, varying_axes(like))


def vary_all(tree: PyTree, axes: Iterable[str]) -> PyTree:
    """Every leaf of `tree` marked varying over all of `axes`."""
    axes = tuple(axes)
    return jax.tree.map(lambda a: vary(a, axes), tree)


def zeros_varying(shape: tuple[int, ...], dtype, like: PyTree) -> jax.Array:
    """Zeros varying over the mesh axes of `like`: the start of a loop carry or accumulator
    that values of `like`'s type are added or written into."""
    return vary_as(jnp.zeros(shape, dtype), like)


def sum_to_type(g: jax.Array, primal: jax.Array) -> jax.Array:
    """A gradient g that varies over more mesh axes than its primal, psum'd over the extra
    ones (what the transpose of a replicated value's use does)."""
    extra = tuple(sorted(set(varying_axes(g)) - set(varying_axes(primal))))
    return jax.lax.psum(g, extra) if extra else g


def reduce_scattered(tree: PyTree, shards: PyTree, axes: Iterable[str]) -> PyTree:
    """`tree`, replicated over the mesh axes `axes`, marked varying over them as by `vary_all`,
    but with its gradient reduce-scattered into `shards` instead of summed over `axes` into
    `tree`'s (which gets none): each leaf's gradient is summed over `axes` and split along the
    first axis where its leaf of `shards` is shorter (axis 0 [N, ...] -> [N / n, ...], or axis
    1 [N, L, ...] -> [N, L / n, ...]), a device getting the i-th part of its index i, as the
    gradient of its leaf of `shards` (values unused). ZeRO-1: a device gets the summed
    gradient of just the rows whose optimizer state it holds, with one reduce-scatter."""
    dims = tuple(
        next((i for i, (a, b) in enumerate(zip(t.shape, s.shape, strict=True)) if a != b), 0)
        for t, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shards), strict=True)
    )
    return _reduce_scattered(tree, shards, tuple(axes), dims)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _reduce_scattered(tree: PyTree, shards: PyTree, axes: tuple[str, ...], dims) -> PyTree:
    return vary_all(tree, axes)


def _scattered_fwd(tree, shards, axes, dims):
    return vary_all(tree, axes), None


def _scattered_bwd(axes, dims, _, ct):
    leaves, treedef = jax.tree.flatten(ct)
    scattered = [
        jax.lax.psum_scatter(g, axes, scatter_dimension=dim, tiled=True)
        for g, dim in zip(leaves, dims, strict=True)
    ]
    return None, jax.tree.unflatten(treedef, scattered)


_reduce_scattered.defvjp(_scattered_fwd, _scattered_bwd)
