"""The optimizer update, applied one local expert at a time; ZeRO-1 over the 'data' axis.

Adam, the decoder-gradient projection and the row renormalisation are elementwise or per row,
so they can run expert by expert. Written over whole [N, L, d] tensors, XLA left an
expert-sized temporary for nearly every stage, several times the weights at pod scale (the
figures are in docs/pod_scale.md). Here, inside shard_map, a fori_loop updates a chunk of
latent rows of one local expert at a time, in place (the loop carries the donated buffers),
so the update's temporaries are one chunk's size.

ZeRO-1: on a mesh with a 'data' axis of more than one device, the expert parameters stay
replicated over 'data' (the forward needs them whole), but the Adam moments of w_enc, b_enc and
w_dec are split over it: of the N_local x L expert rows of an 'expert' index, each device of
'data' holds and updates 1 / data (`state_specs`, mesh.zero_rows_spec): N_local / data whole
experts where data divides N_local, else L / data latent rows of every expert where data
divides L (a data-parallel TopK, N = 1, among them); where neither divides, the state stays
replicated (`zero_message` says so at start-up). Their gradient arrives reduce-scattered over
'data' (varying.reduce_scattered: one reduce-scatter where a replicated optimizer state needed
an all-reduce) and the updated rows are all-gathered back into the replicated parameters, a
chunk at a time. The split by experts is preferred: split by latent rows with N_local > 1, XLA
copies each gradient into a layout with the latent axis outermost for the reduce-scatter
(still less memory than the replicated state on XLA:CPU: docs/training.md).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from sae_jax.kernels.records import ExpertParams
from sae_jax.mesh import zero_rows_axis, zero_rows_spec
from sae_jax.model.switch import unit_rows

# State leaves whose leading axis is the expert axis (parameters, their Adam moments, counters).
EXPERT_LEAVES = frozenset({"w_enc", "b_enc", "w_dec", "enc_scale", "since_fired",
                           "log_threshold"})  # fmt: skip
# Expert leaves whose axis 1 is the expert's latents ([N, L, ...]): updated by chunks of latent
# rows, and under ZeRO-1 their Adam moments and gradients split over 'data' too.
ROW_LEAVES = frozenset({"w_enc", "b_enc", "w_dec"})
UPDATE_CHUNK_BYTES = 2**25  # rows of one expert tensor updated per loop iteration


def leaf_names(path) -> set:
    """The names (dict keys, attributes) on a leaf's pytree path."""
    return {getattr(k, "key", getattr(k, "name", None)) for k in path}


def is_expert_leaf(path, value) -> bool:
    """Whether a leaf (by its pytree path) has the expert axis first."""
    return bool(leaf_names(path) & EXPERT_LEAVES) and jnp.ndim(value) > 0


def is_row_leaf(path, value) -> bool:
    """Whether a leaf is an expert leaf with the expert's latents on axis 1 (ROW_LEAVES)."""
    return bool(leaf_names(path) & ROW_LEAVES) and jnp.ndim(value) > 1


def partition_specs(tree, split: PartitionSpec | None = None):
    """P('expert') for expert leaves (split over 'expert', replicated over 'data'), else P();
    with `split` (ZeRO-1, mesh.ROW_SPLITS), row leaves `split` (over 'data' too)."""

    def spec(path, v):
        if split is not None and is_row_leaf(path, v):
            return split
        return PartitionSpec("expert") if is_expert_leaf(path, v) else PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec, tree)


def zero_split(data: int, local_experts: int, latents: int) -> bool:
    """Whether ZeRO-1 splits the expert rows' Adam state over a 'data' axis of `data` devices,
    `local_experts` experts of `latents` latents per 'expert' index (mesh.zero_rows_axis)."""
    return zero_rows_axis(data, local_experts, latents) is not None


def zero_message(mesh, num_experts: int, latents: int) -> str:
    """One line: whether ZeRO-1 is on for the experts [N, L, ...] on `mesh`, and why not."""
    data, local = mesh.shape["data"], num_experts // mesh.shape["expert"]
    axis = zero_rows_axis(data, local, latents)
    if data == 1:
        return "ZeRO-1: off ('data' axis of 1 device)"
    if axis is None:
        return (f"ZeRO-1: off ('data' axis of {data} devices divides neither the {local} "
                f"experts of an 'expert' index nor their {latents} latents)")  # fmt: skip
    how = "whole experts" if axis == 0 else "latent rows of every expert"
    return f"ZeRO-1: Adam state of the expert rows split over 'data' ({data} devices, by {how})"


def state_specs(state: Any, mesh) -> Any:
    """Partition specs of a TrainState: expert leaves over 'expert', the rest replicated; the
    Adam moments of row leaves also split over 'data' where mesh.zero_rows_spec (ZeRO-1)."""
    split = zero_rows_spec(mesh, *state.since_fired.shape)
    return partition_specs(state).replace(opt_state=partition_specs(state.opt_state, split))


def grad_shards(params, mesh) -> ExpertParams | None:
    """Zeros [N, L, ...] in the ZeRO-1 layout (mesh.zero_rows_spec) of w_enc, b_enc, w_dec,
    for the model's `grad_shards`: their gradient is that of the weights, reduce-scattered
    over 'data' (varying.reduce_scattered). None where the optimizer state is not split over
    'data'. Only their shape matters: nothing reads them."""
    b_enc = params["b_enc"][...]
    split = zero_rows_spec(mesh, *b_enc.shape)
    if split is None:
        return None

    def zeros(v):
        return jax.lax.with_sharding_constraint(jnp.zeros(v.shape, v.dtype), split)

    return ExpertParams(zeros(params["w_enc"][...]), zeros(b_enc), zeros(params["w_dec"][...]))


def with_row_grads(grads, rows: ExpertParams | None):
    """grads with the row leaves' gradient taken from `rows` (the gradient of `grad_shards`,
    split over 'data'); unchanged for None."""
    if rows is None:
        return grads
    by_name = rows._asdict()

    def leaf(path, g):
        name = leaf_names(path) & ROW_LEAVES
        return by_name[name.pop()] if name and jnp.ndim(g) > 1 else g

    return jax.tree_util.tree_map_with_path(leaf, grads)


def map_w_dec(fn, tree, *others):
    """Apply fn to the w_dec leaf (and the matching leaves of `others`), identity elsewhere."""

    def leaf(path, v, *o):
        return fn(v, *o) if "w_dec" in leaf_names(path) else v

    return jax.tree_util.tree_map_with_path(leaf, tree, *others)


def decoder_dots(grads, params) -> jax.Array:
    """Per decoder row, the gradient's component along the (unit) row: [N, L]."""
    (dots,) = [
        jnp.sum(g * w, axis=-1)
        for (path, g), w in zip(
            jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(params), strict=True
        )
        if "w_dec" in leaf_names(path)
    ]
    return dots


def project(g: jax.Array, w: jax.Array, dots: jax.Array) -> jax.Array:
    """Remove the component of g along each unit row of w; dots = sum(g * w, -1)."""
    return g - dots[..., None] * w


def projected_norm(grads, params, dots: jax.Array) -> jax.Array:
    """Global L2 norm of the gradients with the decoder gradient projected (no copy of it)."""
    sq = [
        jnp.sum(jnp.square(project(g, w, dots) if "w_dec" in leaf_names(path) else g))
        for (path, g), w in zip(
            jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(params), strict=True
        )
    ]
    return jnp.sqrt(sum(sq))


def apply_update(tx: optax.GradientTransformation, grads, opt_state, params, *, clip: float):
    """Project the decoder gradient, clip by the global norm, `tx`, renormalise decoder rows.

    Returns (params, opt_state, grad_norm). `tx` must act elementwise (Adam does). Under a
    mesh the loop over local experts runs in shard_map over 'expert', and over 'data' too
    where the optimizer state is split over it (`splits_state`; `opt_state` then in the
    layout of `state_specs`, the row leaves of `grads` best split the same way, as the
    model's reduce-scatter leaves them).
    """
    dots = decoder_dots(grads, params)
    norm = projected_norm(grads, params, dots)
    scale = jnp.where(norm < clip, 1.0, clip / norm)  # optax.clip_by_global_norm's rule

    mesh = jax.sharding.get_abstract_mesh()
    split = zero_rows_spec(mesh, *dots.shape)
    axis = None if split is None else "data"

    def local(grads, opt_state, params, dots, scale):
        return _update_experts(tx, grads, opt_state, params, dots, scale, axis)

    if not mesh.empty:
        state_spec = partition_specs(opt_state, split)
        # check_vma off under ZeRO-1: the all-gathered rows are the same on every device of
        # 'data' (so the parameters are replicated there), which the type system cannot see.
        local = jax.shard_map(
            local, mesh=mesh,
            in_specs=(partition_specs(grads, split), state_spec, partition_specs(params),
                      split or PartitionSpec("expert"), PartitionSpec()),
            out_specs=(partition_specs(params), state_spec),
            axis_names={"expert", "data"} if axis else {"expert"}, check_vma=axis is None,
        )  # fmt: skip
    params, opt_state = local(grads, opt_state, params, dots, scale)
    return params, opt_state, norm


def chunk_rows(latents: int, row_bytes: int) -> int:
    """The most latents (a divisor of `latents`) whose rows fit in UPDATE_CHUNK_BYTES."""
    budget = UPDATE_CHUNK_BYTES
    fits = [r for r in range(1, latents + 1) if latents % r == 0 and r * row_bytes <= budget]
    return max(fits, default=1)


def _leaf_map(fn, tree, *others):
    """fn(rows, leaf, *other leaves) over `tree`, rows: whether it is a row leaf (ROW_LEAVES)."""

    def leaf(path, v, *o):
        return fn(is_row_leaf(path, v), v, *o)

    return jax.tree_util.tree_map_with_path(leaf, tree, *others)


def _update_experts(tx, grads, opt_state, params, dots, scale, axis: str | None = None):
    """One device's update: the leaves other than the row leaves (small: the router, biases,
    enc_scale [N_local, d], a shared dictionary) once, whole; the row leaves in place, a chunk
    of latent rows of one expert at a time (`_update_rows`, whose loop sees only them).
    Returns (params, opt_state)."""
    small = (_only(tree, rows=False) for tree in (grads, opt_state, params))
    small_params, small_state = _tx_step(tx, *small, scale)
    row_params, row_state = _update_rows(tx, grads, opt_state, params, dots, scale, axis)
    return _merge(row_params, small_params), _merge(row_state, small_state)


def _tx_step(tx, grads, opt_state, params, scale):
    """(params, opt_state) after `tx` on the gradients times `scale` (leaves may be None)."""
    updates, opt_state = tx.update(jax.tree.map(lambda v: v * scale.astype(v.dtype), grads),
                                   opt_state, params)  # fmt: skip
    return optax.apply_updates(params, updates), opt_state


def _only(tree, rows: bool, params=None):
    """`tree` with None in place of its leaves that are not row leaves (`rows`) or are (not
    `rows`); with `params`, an optimizer state's leaves of no parameter (Adam's count) stay."""
    own = [p for p, _ in jax.tree_util.tree_leaves_with_path(() if params is None else params)]

    def leaf(path, v):
        if is_row_leaf(path, v) == rows or params is not None and not _of_param(path, own):
            return v
        return None

    return jax.tree_util.tree_map_with_path(leaf, tree)


def _of_param(path, param_paths) -> bool:
    """Whether a leaf's path ends with that of a parameter (a moment of it)."""
    return any(tuple(path[-len(p) :]) == tuple(p) for p in param_paths)


def _merge(tree, other):
    """`tree`'s leaves, `other`'s where `tree` has None (two `_only` parts made whole)."""
    return jax.tree.map(lambda a, b: b if a is None else a, tree, other,
                        is_leaf=lambda v: v is None)  # fmt: skip


def _update_rows(tx, grads, opt_state, params, dots, scale, axis: str | None = None):
    """The row leaves' update, in place, a chunk of latent rows of one expert at a time.

    Row leaves of `grads` and `opt_state` hold [S, R, ...]: the N_local experts of the
    device's 'expert' index and their L latents (S = N_local, R = L), or with `axis` ('data',
    ZeRO-1) this device's share: S = N_local / data experts from index * S (R = L), or the
    R = L / data latents from index * R of every expert (S = N_local); `params` holds all
    N_local x L, into which every device's updated rows are all-gathered; dots: [S, R].
    Returns (params, opt_state) with None for every other leaf: the loop carries and reads
    only the row leaves (and the optimizer's counters, read only). The moments are written
    only after the parameters (see _after): otherwise XLA fuses the parameter write with reads
    of the moments that the moment writes change, and copies whole moment tensors every
    iteration.
    """
    share, latents = dots.shape
    parts = 1 if axis is None else jax.lax.axis_size(axis)
    every_expert, every_latent = _row_shape(params)  # N_local, L
    # Device i of `axis` updates the rows from (i * by[0], i * by[1]) of the parameters.
    by = (share if share < every_expert else 0, latents if latents < every_latent else 0)
    index = 0 if axis is None else jax.lax.axis_index(axis)
    widest = max(
        math.prod(v.shape[2:]) * v.dtype.itemsize
        for path, v in jax.tree_util.tree_leaves_with_path(params)
        if is_row_leaf(path, v)
    )
    rows = chunk_rows(latents, widest)
    per_expert = latents // rows
    grads, counters = _only(grads, rows=True), _only(opt_state, rows=True, params=params)
    params, opt_state = _only(params, rows=True), _only(opt_state, rows=True)

    def pick(original, current, e, r):
        """The chunk to update: row leaves' rows [r, r + rows) of expert e of `current`; the
        rest (the optimizer's counters) from `original`."""

        def one(row, o, c):
            if not row:
                return o
            return jax.lax.dynamic_slice(c, _at(c, e, r), (1, rows, *c.shape[2:]))

        return _leaf_map(one, original, current)

    def put(current, new, e, r, gather=False):
        """`new`'s row leaves written into `current` where `pick` read them; with `gather` (the
        parameters under ZeRO-1) the new rows of every device of `axis` are all-gathered and
        each written to its expert, expert e of the device's share."""

        def one(row, c, n):
            if not gather or axis is None:
                return jax.lax.dynamic_update_slice(c, n, _at(c, e, r))
            every = jax.lax.all_gather(n, axis)  # [parts, 1, rows, ...]
            for part in range(parts):
                at = _at(c, part * by[0] + e, part * by[1] + r)
                c = jax.lax.dynamic_update_slice(c, every[part], at)
            return c

        return _leaf_map(one, current, _only(new, rows=True))

    def body(j, carry):
        cur_params, cur_state = carry
        e, r = j // per_expert, (j % per_expert) * rows
        p = pick(params, cur_params, index * by[0] + e, index * by[1] + r)
        s = pick(counters, cur_state, e, r)
        dots_j = jax.lax.dynamic_slice(dots, (e, r), (1, rows))
        g = map_w_dec(lambda gw, w: project(gw, w, dots_j), pick(grads, grads, e, r), p)
        new, s = _tx_step(tx, g, s, p, scale)
        new_params = put(cur_params, map_w_dec(unit_rows, new), e, r, gather=True)
        e = _after(new_params, e, r)
        return new_params, put(cur_state, s, e, r)

    return jax.lax.fori_loop(0, share * per_expert, body, (params, opt_state))


def _row_shape(params) -> tuple[int, int]:
    """(experts, latents): the first two axes of the row leaves of `params`."""
    (shape,) = {v.shape[:2] for p, v in jax.tree_util.tree_leaves_with_path(params)
                if is_row_leaf(p, v)}  # fmt: skip
    return shape


def _at(v: jax.Array, *start) -> tuple:
    """A start index into v: `start`, then zeros."""
    zero = jnp.zeros((), jnp.asarray(start[-1]).dtype)
    return (*start, *(zero,) * (v.ndim - len(start)))


def _after(tree, e, r):
    """e, computed from a read of every row leaf of `tree` (the just-written parameters) at
    expert e, row r, so that what is indexed with it happens after those leaves are written
    (XLA cannot fold the min away)."""

    def read(row, v):
        if not row:
            return jnp.zeros((), jnp.int32)
        read = jax.lax.dynamic_slice(v, _at(v, e, r), (1,) * v.ndim)
        return jnp.isnan(read).sum(dtype=jnp.int32)

    return jnp.minimum(e, e + sum(jax.tree.leaves(_leaf_map(read, tree))))
