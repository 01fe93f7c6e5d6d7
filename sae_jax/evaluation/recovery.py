"""Planted-feature recovery: each planted feature's best cosine with any decoder row.

The cosines of F features with N x L decoder rows are an [F, N x L] matrix (4 TiB on
pod.gin's eval); they are streamed instead: one expert's [chunk, L] block at a time, with a
running max over the experts, chunks of features bounded to FEATURE_CHUNK_BYTES. A decoder
sharded over mesh axes is read where it lies (`jax.shard_map`): each device takes the max
over its own experts and rows, then a pmax over those axes, so no decoder row moves.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from sae_jax.varying import vary, varying_axes

FEATURE_CHUNK_BYTES = 256 * 2**20  # the [chunk, L] float32 cosines computed at once


def feature_recovery(features: jax.Array, w_dec: jax.Array, threshold: float = 0.9) -> float:
    """Fraction of planted features [F, d] whose best decoder row (of any expert) has cosine
    similarity > threshold. w_dec: [N, L, d] unit rows, numpy or JAX, sharded or not."""
    return float(jnp.mean(best_cosines(features, w_dec) > threshold))


def best_cosines(
    features: jax.Array, w_dec: jax.Array, chunk_bytes: int = FEATURE_CHUNK_BYTES
) -> jax.Array:
    """[F]: each planted feature's largest cosine with a decoder row ([N, L, d] unit rows),
    never holding more than [chunk, L] cosines, chunk x L x 4 bytes <= chunk_bytes."""
    return best_cosines_program(features, w_dec, chunk_bytes)(features, w_dec)


def best_cosines_program(
    features: jax.Array, w_dec: jax.Array, chunk_bytes: int = FEATURE_CHUNK_BYTES
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The jitted (features, w_dec) -> [F] program `best_cosines` runs for these shapes and
    w_dec's layout: under `jax.shard_map` when w_dec is sharded over a mesh (a concrete
    array's sharding; inside a caller's jit a traced w_dec has none, and one device's program
    runs, which XLA partitions as it likes)."""
    num, lat = features.shape[0], w_dec.shape[1]
    rows = int(min(max(num, 1), max(1, chunk_bytes // (4 * lat))))
    sharding = getattr(w_dec, "sharding", None)
    if isinstance(sharding, NamedSharding) and any(sharding.spec):
        spec = tuple(sharding.spec) + (None,) * (3 - len(sharding.spec))
        return _sharded_program(sharding.mesh, spec, rows)
    return _program(rows)


@functools.cache
def _program(rows: int):
    return jax.jit(functools.partial(_local_best, rows=rows))


@functools.cache
def _sharded_program(mesh: jax.sharding.Mesh, spec: tuple, rows: int):
    """`_local_best` on each device's block of a w_dec laid out as `spec` on `mesh`."""
    max_axes, sum_axes = _axes(spec[0]) + _axes(spec[1]), _axes(spec[2])

    def local(features, w_dec):
        best = _local_best(features, w_dec, rows, sum_axes)
        return jax.lax.pmax(best, max_axes) if max_axes else best

    in_specs = (PartitionSpec(None, spec[2]), PartitionSpec(*spec))
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=PartitionSpec()))


def _axes(entry) -> tuple:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _local_best(features: jax.Array, w_dec: jax.Array, rows: int, sum_axes: tuple = ()):
    """[F] max over w_dec's [N, L, d] rows of the cosines: chunks of `rows` features, each
    against one expert's [L, d] at a time. sum_axes: the mesh axes d is split over (partial
    dot products and norms are summed over them)."""
    if sum_axes:  # the norm of the whole feature, not of this device's share of d
        norm = jax.lax.psum(jnp.sum(features * features, axis=-1, keepdims=True), sum_axes)
        feats = features / jnp.sqrt(norm)
    else:
        feats = features / jnp.linalg.norm(features, axis=-1, keepdims=True)
    num = feats.shape[0]
    chunks = jnp.pad(feats, ((0, -num % rows), (0, 0))).reshape(-1, rows, feats.shape[1])
    carry_axes = set(varying_axes(w_dec)) - set(sum_axes)  # the max's mesh type in the loop

    def chunk_best(f):  # [rows, d] -> [rows]
        def expert(best, w):
            cos = f @ w.T  # [rows, L]
            if sum_axes:
                cos = jax.lax.psum(cos, sum_axes)
            return jnp.maximum(best, jnp.max(cos, axis=-1)), None

        init = vary(jnp.full((rows,), -jnp.inf, f.dtype), carry_axes)
        return jax.lax.scan(expert, init, w_dec)[0]

    return jax.lax.map(chunk_best, chunks).reshape(-1)[:num]
