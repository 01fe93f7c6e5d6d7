"""Grouped per-expert computation without capacity buffers: sort, pad to blocks, map.

Tokens are sorted by expert and each expert's group is padded to a multiple of a block size B,
so the padded layout holds `max_blocks(T, N, B)` = ceil(T / B) + min(N, T) blocks of B rows
(enough for any routing), each block belonging to one expert; the used blocks come first. A
loop over the experts reads each expert's weights once (by dynamic index) and runs a
per-block function on that expert's blocks. The work is that of at most T + N * B rows,
against N * T for dispatch with a capacity of every token, and no [N, T, ...] array is built.

Differentiable with respect to the weights, the token inputs and shared arrays (tested):
`map_blocks` has a custom VJP whose backward loops over the used blocks again, summing each
expert's weight gradient over its blocks and writing it once into the [N, ...] gradient. The
dropless training dispatch (sae_jax/dispatch/dropless.py) uses the pieces: `plan_blocks`,
`to_blocks`, `map_blocks`, `from_blocks`.

`jax.lax.ragged_dot` is the native grouped matmul on GPU/TPU; XLA:CPU runs it as a dense
masked product over all N groups, so this block form is the one that saves work everywhere.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sae_jax.varying import (
    sum_to_type,
    vary,
    vary_all,
    vary_as,
    varying_axes,
    zeros_varying,
)

PyTree = Any
# fn(weights of one expert, tokens [B, ...], valid [B] bool, *shared) -> pytree of [B, ...]
BlockFn = Callable[[PyTree, PyTree, jax.Array], PyTree]


class BlockPlan(NamedTuple):
    """Where each token goes in the padded, expert-sorted layout of `blocks` x B rows."""

    row: jax.Array  # [T] int32 row of each token in [0, blocks * B) (blocks * B: absent)
    block_expert: jax.Array  # [blocks] int32 expert of each block (N - 1 for unused blocks)
    block_used: jax.Array  # [blocks] bool: the block holds at least one token
    valid: jax.Array  # [blocks, B] bool: the row holds a token (False for padding)
    used_blocks: jax.Array  # [] int32: blocks holding tokens, the first ones of the layout
    expert_bounds: jax.Array  # [N + 1] int32: expert e's blocks are [bounds[e], bounds[e + 1])


def max_blocks(tokens: int, num_experts: int, block_size: int) -> int:
    """Upper bound on the blocks any routing of `tokens` tokens to N experts needs:
    sum_i ceil(c_i / B) <= ceil(T / B) + (number of non-empty experts)."""
    return math.ceil(tokens / block_size) + min(num_experts, tokens)


def plan_blocks(
    expert: jax.Array, num_experts: int, block_size: int, present: jax.Array | None = None
) -> BlockPlan:
    """Sort tokens by expert (stable: tokens keep their order inside a group) and pad each
    expert's group to a multiple of block_size. expert: [T] int32 in [0, N); present: [T]
    bool, False for rows that hold no token (they get no row: `to_blocks` drops them and
    `from_blocks` reads zeros there), None: every row is a token."""
    tokens = expert.shape[0]
    blocks = max_blocks(tokens, num_experts, block_size)
    if present is None:
        present = jnp.ones(tokens, bool)
    key = jnp.where(present, expert, num_experts)  # absent rows sort last, in no group
    counts = jnp.zeros(num_experts + 1, jnp.int32).at[key].add(1)[:num_experts]
    expert_blocks = -(-counts // block_size)  # ceil
    block_end = jnp.cumsum(expert_blocks)  # [N] first block after each expert's blocks
    token_start = jnp.cumsum(counts) - counts  # [N] first sorted position of each expert
    order = jnp.argsort(key, stable=True)
    sorted_key = key[order]
    sorted_expert = jnp.minimum(sorted_key, num_experts - 1)
    rank = jnp.arange(tokens, dtype=jnp.int32) - token_start[sorted_expert]
    sorted_row = (block_end - expert_blocks)[sorted_expert] * block_size + rank
    sorted_row = jnp.where(sorted_key < num_experts, sorted_row, blocks * block_size)
    row = jnp.zeros(tokens, jnp.int32).at[order].set(sorted_row, unique_indices=True)
    block_ids = jnp.arange(blocks, dtype=jnp.int32)
    # searchsorted(block_end, block_ids, side="right") as a [blocks, N] count (jnp.searchsorted
    # fails under shard_map in jax 0.10 when only one operand varies over the mesh).
    block_expert = jnp.sum(block_end[None, :] <= block_ids[:, None], axis=1, dtype=jnp.int32)
    valid = jnp.zeros(blocks * block_size, bool).at[row].set(True, mode="drop")
    return BlockPlan(
        row=row,
        block_expert=jnp.minimum(block_expert, num_experts - 1),
        block_used=block_ids < block_end[-1],
        valid=valid.reshape(blocks, block_size),
        used_blocks=block_end[-1],
        expert_bounds=jnp.concatenate([jnp.zeros(1, jnp.int32), block_end.astype(jnp.int32)]),
    )


def grouped_apply(
    fn: BlockFn,
    weights: PyTree,
    tokens: PyTree,
    expert: jax.Array,
    *,
    num_experts: int,
    block_size: int,
    present: jax.Array | None = None,
) -> PyTree:
    """Run each token's expert on it, one block of B same-expert tokens at a time.

    fn: (weights of one expert (each leaf's [N, ...] indexed at the block's expert),
         tokens of the block (each leaf [B, ...]), valid [B] bool) -> pytree of [B, ...].
         Padding rows hold zeros and valid=False; their outputs are discarded.
    weights: pytree of [N, ...] arrays; tokens: pytree of [T, ...] arrays;
    expert: [T] int32 routed expert of each token; present: [T] bool, False for rows that hold
    no token (they get no block row, and zeros as outputs; see `plan_blocks`).
    Returns fn's outputs per token: pytree of [T, ...], in the original token order.
    """
    plan = plan_blocks(expert, num_experts, block_size, present)
    padded = jax.tree.map(lambda a: to_blocks(a, plan), tokens)
    out = map_blocks(fn, weights, padded, plan)
    return jax.tree.map(lambda a: from_blocks(a, plan), out)


def to_blocks(a: jax.Array, plan: BlockPlan) -> jax.Array:
    """Per-token values [T, ...] -> the padded layout [blocks, B, ...] (zeros in padding)."""
    blocks, block_size = plan.valid.shape
    buf = jnp.zeros((blocks * block_size,) + a.shape[1:], a.dtype)
    buf = buf.at[plan.row].set(a, mode="drop")  # rows of absent tokens are out of range
    return buf.reshape((blocks, block_size) + a.shape[1:])


def from_blocks(a: jax.Array, plan: BlockPlan) -> jax.Array:
    """The padded layout [blocks, B, ...] -> per-token values [T, ...] in token order."""
    return a.reshape((-1,) + a.shape[2:]).at[plan.row].get(mode="fill", fill_value=0)


def map_blocks(
    fn: BlockFn,
    weights: PyTree,
    padded: PyTree,
    plan: BlockPlan,
    shared: tuple = (),
    token_grads: bool = True,
    keep: Callable[[PyTree], PyTree] | None = None,
) -> PyTree:
    """fn on every used block with its expert's weights: padded leaves [blocks, B, ...] -> fn's
    outputs stacked over blocks (zeros for the unused blocks, which hold only padding).

    fn(weights of one expert, tokens [B, ...], valid [B], *shared): `shared` holds arrays every
    block uses (say b_dec) that need a gradient; fn must not close over differentiated values.
    token_grads=False: the tokens get no gradient (saves its matmuls in the backward).
    keep: the outputs the backward reuses, keep(outputs) -> a pytree of some of their leaves
    (say the top-k ids and values, not the reconstruction): only these are kept for the
    backward, and fn also takes `saved=`, None in the forward and, in the backward, keep of
    the block's forward outputs, which it may return as values instead of computing them
    again (then only what the gradient needs runs; say no encoder matmul). None: fn takes no
    `saved=` and the backward keeps none of the outputs.
    Only the used blocks run, forward and backward, so the work follows the tokens, not the
    worst-case layout: a loop over the experts reads each expert's weights once and runs an
    inner loop over its blocks (reading them per block cost more than the matmuls at small B).
    The backward (a custom VJP) runs the blocks again, each block's `jax.vjp` recomputing what
    its gradient needs: nothing per block is kept between the passes but keep's outputs (a
    scan's backward would keep each block's copy of its expert's weights); an expert's weight
    gradient is summed over its blocks and written once into the [N, ...] gradient.
    """
    if keep is not None:
        fn = _Replay(fn, keep)
    return _used_blocks_map(fn, token_grads, weights, padded, plan.expert_bounds, plan.valid,
                            *shared)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class _Replay:
    """A block function that takes `saved=` (map_blocks' keep): None in the forward."""

    fn: Callable
    keep: Callable[[PyTree], PyTree]  # the outputs kept for the backward's `saved=`

    def __call__(self, *args, saved=None):
        return self.fn(*args, saved=saved)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _used_blocks_map(fn, token_grads, weights, padded, bounds, valid, *shared):
    return _forward(fn, weights, padded, bounds, valid, shared)


def _for_experts(weights: PyTree, bounds: jax.Array, body: Callable, init: PyTree) -> PyTree:
    """body(e, weights of expert e, its blocks' range (start, stop), carry) -> carry, for each
    expert e in order; its weights are read once, for all its blocks."""
    num_experts = jax.tree.leaves(weights)[0].shape[0]

    def expert(e, carry):
        return body(e, _expert_weights(weights, e), (bounds[e], bounds[e + 1]), carry)

    return jax.lax.fori_loop(0, num_experts, expert, init)


def _forward(fn, weights, padded, bounds, valid, shared):
    # Inside the loop every value varies over the mesh axes of the tokens (see _backward_rule).
    axes = varying_axes((weights, padded, bounds, valid, shared))
    weights, padded, shared = (vary_all(t, axes) for t in (weights, padded, shared))

    def expert(e, w, blocks, outs):
        def run(i, outs):
            return _set(outs, i, fn(w, _index(padded, i), valid[i], *shared))

        return jax.lax.fori_loop(*blocks, run, outs)

    example = (_expert_weights(weights, 0), _index(padded, 0), valid[0], *shared)
    shapes = jax.eval_shape(fn, *example)
    outs = jax.tree.map(
        lambda s: vary(jnp.zeros((valid.shape[0],) + s.shape, s.dtype), axes), shapes
    )
    return _for_experts(weights, bounds, expert, outs)


def _forward_rule(fn, token_grads, weights, padded, bounds, valid, *shared):
    out = _forward(fn, weights, padded, bounds, valid, shared)
    saved = fn.keep(out) if isinstance(fn, _Replay) else None
    return out, (weights, padded, bounds, valid, shared, saved)


def _backward_rule(fn, token_grads, residuals, cotangents):
    *residuals, saved = residuals
    weights, padded, bounds, valid, shared = residuals
    # Inside the loop every value varies over the mesh axes of the tokens: a collective there
    # (the psum that transposes a replicated value's use) would run a device-dependent number
    # of times. Replicated inputs' gradients are summed over devices after the loop instead.
    axes = varying_axes(residuals)
    weights, padded, shared = (vary_all(t, axes) for t in (weights, padded, shared))
    x_leaves = _diff_leaves(padded) if token_grads else []
    zeros = jax.tree.map(_zeros_like, (_diff_leaves(weights), x_leaves, _diff_leaves(shared)))

    def expert(e, w, blocks, grads):
        def run(i, grads):
            g_e, g_x, g_s = grads
            x = _index(padded, i)

            def block(w_d, x_d, s_d):
                x_b = _merge(x, x_d) if token_grads else x
                args = (_merge(w, w_d), x_b, valid[i], *_merge(shared, s_d))
                out = fn(*args) if saved is None else fn(*args, saved=_index(saved, i))
                return _diff_leaves(out)

            x_d = _diff_leaves(x) if token_grads else []
            _, vjp = jax.vjp(block, _diff_leaves(w), x_d, _diff_leaves(shared))
            d_w, d_x, d_s = vjp(_diff_leaves(_index(cotangents, i)))
            return jax.tree.map(_plus, g_e, d_w), _set(g_x, i, d_x), jax.tree.map(_plus, g_s, d_s)

        g_w, g_x, g_s = grads
        g_e = jax.tree.map(_zeros_like, _diff_leaves(w))
        g_e, g_x, g_s = jax.lax.fori_loop(*blocks, run, (g_e, g_x, g_s))
        return jax.tree.map(lambda g, d: _set_at(g, e, d), g_w, g_e), g_x, g_s

    g_w, g_x, g_s = _for_experts(weights, bounds, expert, zeros)
    weights, padded, _, _, shared = residuals
    g_x = _cotangent(padded, g_x) if token_grads else jax.tree.map(lambda _: None, padded)
    return (_cotangent(weights, g_w), g_x, None, None, *_cotangent(shared, g_s))


def _cotangent(primal: PyTree, grads: list) -> PyTree:
    """The gradients of primal's floating-point leaves, each summed over the mesh axes that
    its leaf is replicated on, in primal's structure (None for the other leaves)."""
    leaves = _diff_leaves(primal)
    summed = [sum_to_type(g, p) for g, p in zip(grads, leaves, strict=True)]
    return _merge(primal, summed, fill=None)


_used_blocks_map.defvjp(_forward_rule, _backward_rule)


def _is_diff(a) -> bool:
    return jnp.issubdtype(a.dtype, jnp.inexact)


def _diff_leaves(tree: PyTree) -> list:
    """The floating-point leaves of a pytree (what gets cotangents), in flattening order."""
    return [a for a in jax.tree.leaves(tree) if _is_diff(a)]


def _merge(tree: PyTree, diff: list, fill: Any = "keep") -> PyTree:
    """tree with its floating-point leaves replaced, in order, by `diff`; the other leaves
    kept (fill='keep') or replaced by `fill`."""
    leaves, treedef = jax.tree.flatten(tree)
    it = iter(diff)
    new = [next(it) if _is_diff(a) else (a if fill == "keep" else fill) for a in leaves]
    return jax.tree.unflatten(treedef, new)


def _index(tree: PyTree, i) -> PyTree:
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), tree)


def _set(tree: PyTree, i, values: PyTree) -> PyTree:
    def put(a, v):
        return jax.lax.dynamic_update_index_in_dim(a, vary_as(v.astype(a.dtype), a), i, 0)

    return jax.tree.map(put, tree, values)


def _plus(acc: jax.Array, value: jax.Array) -> jax.Array:
    return vary_as(acc + value, acc)


def _set_at(acc: jax.Array, e, value: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(acc, vary_as(value, acc), e, 0)


def _zeros_like(a: jax.Array) -> jax.Array:
    return zeros_varying(a.shape, a.dtype, a)


def _expert_weights(weights: PyTree, e: jax.Array | int) -> PyTree:
    return jax.tree.map(lambda w: jax.lax.dynamic_index_in_dim(w, e, keepdims=False), weights)
