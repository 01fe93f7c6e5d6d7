"""The optimizer update, applied one local expert at a time.

Adam, the decoder-gradient projection and the row renormalisation are elementwise or per row,
so they can run expert by expert. Written over whole [N, L, d] tensors, XLA left an
expert-sized temporary for nearly every stage, several times the weights at pod scale (the
figures are in docs/pod_scale.md). Here, inside shard_map, a fori_loop updates expert i of
every local expert tensor in place (the loop carries the donated buffers), so the update's
temporaries are one expert's size.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from sae_jax.model.switch import unit_rows

# State leaves whose leading axis is the expert axis (parameters, their Adam moments, counters).
EXPERT_LEAVES = frozenset({"w_enc", "b_enc", "w_dec", "enc_scale", "since_fired"})
UPDATE_CHUNK_BYTES = 2**25  # rows of one expert tensor updated per loop iteration


def _names(path) -> set:
    return {getattr(k, "key", getattr(k, "name", None)) for k in path}


def is_expert_leaf(path, value) -> bool:
    """Whether a leaf (by its pytree path) has the expert axis first."""
    return bool(_names(path) & EXPERT_LEAVES) and jnp.ndim(value) > 0


def partition_specs(tree):
    """P('expert') for expert leaves (split over 'expert', replicated over 'data'), else P()."""
    return jax.tree_util.tree_map_with_path(
        lambda path, v: PartitionSpec("expert") if is_expert_leaf(path, v) else PartitionSpec(),
        tree,
    )


def map_w_dec(fn, tree, *others):
    """Apply fn to the w_dec leaf (and the matching leaves of `others`), identity elsewhere."""

    def leaf(path, v, *o):
        return fn(v, *o) if "w_dec" in _names(path) else v

    return jax.tree_util.tree_map_with_path(leaf, tree, *others)


def decoder_dots(grads, params) -> jax.Array:
    """Per decoder row, the gradient's component along the (unit) row: [N, L]."""
    (dots,) = [
        jnp.sum(g * w, axis=-1)
        for (path, g), w in zip(
            jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(params), strict=True
        )
        if "w_dec" in _names(path)
    ]
    return dots


def project(g: jax.Array, w: jax.Array, dots: jax.Array) -> jax.Array:
    """Remove the component of g along each unit row of w; dots = sum(g * w, -1)."""
    return g - dots[..., None] * w


def projected_norm(grads, params, dots: jax.Array) -> jax.Array:
    """Global L2 norm of the gradients with the decoder gradient projected (no copy of it)."""
    sq = [
        jnp.sum(jnp.square(project(g, w, dots) if "w_dec" in _names(path) else g))
        for (path, g), w in zip(
            jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(params), strict=True
        )
    ]
    return jnp.sqrt(sum(sq))


def apply_update(tx: optax.GradientTransformation, grads, opt_state, params, *, clip: float):
    """Project the decoder gradient, clip by the global norm, `tx`, renormalise decoder rows.

    Returns (params, opt_state, grad_norm). `tx` must act elementwise (Adam does). Under a
    mesh the loop over local experts runs in shard_map over 'expert'.
    """
    dots = decoder_dots(grads, params)
    norm = projected_norm(grads, params, dots)
    scale = jnp.where(norm < clip, 1.0, clip / norm)  # optax.clip_by_global_norm's rule

    def local(grads, opt_state, params, dots, scale):
        return _update_experts(tx, grads, opt_state, params, dots, scale)

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        specs = partition_specs((grads, opt_state, params))
        local = jax.shard_map(
            local, mesh=mesh, in_specs=(*specs, PartitionSpec("expert"), PartitionSpec()),
            out_specs=partition_specs((params, opt_state)), axis_names={"expert"},
        )  # fmt: skip
    params, opt_state = local(grads, opt_state, params, dots, scale)
    return params, opt_state, norm


def chunk_rows(latents: int, row_bytes: int) -> int:
    """The most latents (a divisor of `latents`) whose rows fit in UPDATE_CHUNK_BYTES."""
    budget = UPDATE_CHUNK_BYTES
    fits = [r for r in range(1, latents + 1) if latents % r == 0 and r * row_bytes <= budget]
    return max(fits, default=1)


def _after(tree, start: tuple) -> tuple:
    """`start`, computed from a read of every expert leaf of `tree` there, so that what is
    indexed with it happens after those leaves are written (XLA cannot fold the min away)."""
    reads = [
        jnp.isnan(jax.lax.dynamic_slice(v, start[: v.ndim], (1,) * v.ndim)).sum(dtype=jnp.int32)
        for path, v in jax.tree_util.tree_leaves_with_path(tree)
        if is_expert_leaf(path, v)
    ]
    e = start[0]
    return (jnp.minimum(e, e + sum(reads)), *start[1:])


def _update_experts(tx, grads, opt_state, params, dots, scale):
    """One device's update: expert leaves hold its [N_local, L, ...] experts, updated in place
    a chunk of latents of one expert at a time. The moments are written only after the
    parameters (see _after): otherwise XLA fuses the parameter write with reads of the
    moments that the moment writes change, and copies whole moment tensors every iteration.
    """
    num_local, latents = dots.shape
    widest = max(
        math.prod(v.shape[2:]) * v.dtype.itemsize
        for path, v in jax.tree_util.tree_leaves_with_path(params)
        if is_expert_leaf(path, v)
    )
    rows = chunk_rows(latents, widest)
    per_expert = latents // rows

    def pick(original, current, start):
        """Expert leaves: the chunk at `start` of `current` (not yet updated); others: original."""
        return jax.tree_util.tree_map_with_path(
            lambda path, o, c: jax.lax.dynamic_slice(c, start[: c.ndim], (1, rows) + c.shape[2:])
            if is_expert_leaf(path, o) else o,
            original, current,
        )  # fmt: skip

    def put(current, new, start):
        return jax.tree_util.tree_map_with_path(
            lambda path, c, n: jax.lax.dynamic_update_slice(c, n, start[: c.ndim])
            if is_expert_leaf(path, c) else n,
            current, new,
        )  # fmt: skip

    def body(j, carry):
        cur_params, cur_state = carry
        zero = jnp.zeros((), j.dtype)
        start = (j // per_expert, (j % per_expert) * rows, zero)
        p, s = pick(params, cur_params, start), pick(opt_state, cur_state, start)
        dots_j = jax.lax.dynamic_slice(dots, start[:2], (1, rows))
        g = map_w_dec(lambda gw, w: project(gw, w, dots_j), pick(grads, grads, start), p)
        updates, s = tx.update(jax.tree.map(lambda v: v * scale.astype(v.dtype), g), s, p)
        new_params = put(cur_params, map_w_dec(unit_rows, optax.apply_updates(p, updates)), start)
        return new_params, put(cur_state, s, _after(new_params, start))

    return jax.lax.fori_loop(0, num_local * per_expert, body, (params, opt_state))
