"""Which mesh axes a value varies over inside `jax.shard_map`, and marking the missing ones.

Under `shard_map` every value's type says which mesh axes it varies over. A loop carry, a
buffer that an op writes into, or an accumulator started from constants (zeros) must already
vary over every axis the values written into it vary over, or the loop or op does not
type-check. `vary` marks them (`jax.lax.pcast(..., to="varying")`, which moves no data).
Outside `shard_map` nothing varies and every function here returns its input.
"""

from __future__ import annotations

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
