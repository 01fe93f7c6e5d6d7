"""Grouped per-expert computation without capacity buffers: sort, pad to blocks, map.

Tokens are sorted by expert and each expert's group is padded to a multiple of a block size B,
so the padded layout holds `max_blocks(T, N, B)` = ceil(T / B) + min(N, T) blocks of B rows
(enough for any routing), each block belonging to one expert. A `lax.map` over the blocks
runs a per-block function with that block's expert weights (read by dynamic index). The
work is that of T + N * B rows, against N * T for dispatch with a capacity of every token,
and no [N, T, ...] array is built.

Differentiable with respect to the weights and the token inputs (tested). The backward
accumulates the weight gradients in an [N, ...] carry of the reverse scan, one block's
expert updated per step (see `map_blocks` for how that stays in place). The dropless
training dispatch (sae_jax/dropless.py) uses the pieces: `plan_blocks`, `to_blocks`,
`map_blocks`, `from_blocks`.

`jax.lax.ragged_dot` is the native grouped matmul on GPU/TPU; XLA:CPU runs it as a dense
masked product over all N groups, so this block form is the one that saves work everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any
# fn(weights of one expert, tokens [B, ...], valid [B] bool) -> pytree of [B, ...]
BlockFn = Callable[[PyTree, PyTree, jax.Array], PyTree]


class BlockPlan(NamedTuple):
    """Where each token goes in the padded, expert-sorted layout of `blocks` x B rows."""

    row: jax.Array  # [T] int32 row of each token in [0, blocks * B)
    block_expert: jax.Array  # [blocks] int32 expert of each block (N - 1 for unused blocks)
    block_used: jax.Array  # [blocks] bool: the block holds at least one token
    valid: jax.Array  # [blocks, B] bool: the row holds a token (False for padding)


def max_blocks(tokens: int, num_experts: int, block_size: int) -> int:
    """Upper bound on the blocks any routing of `tokens` tokens to N experts needs:
    sum_i ceil(c_i / B) <= ceil(T / B) + (number of non-empty experts)."""
    return math.ceil(tokens / block_size) + min(num_experts, tokens)


def plan_blocks(expert: jax.Array, num_experts: int, block_size: int) -> BlockPlan:
    """Sort tokens by expert (stable: tokens keep their order inside a group) and pad each
    expert's group to a multiple of block_size. expert: [T] int32 in [0, N)."""
    tokens = expert.shape[0]
    blocks = max_blocks(tokens, num_experts, block_size)
    counts = jnp.zeros(num_experts, jnp.int32).at[expert].add(1)
    expert_blocks = -(-counts // block_size)  # ceil
    block_end = jnp.cumsum(expert_blocks)  # [N] first block after each expert's blocks
    token_start = jnp.cumsum(counts) - counts  # [N] first sorted position of each expert
    order = jnp.argsort(expert, stable=True)
    sorted_expert = expert[order]
    rank = jnp.arange(tokens, dtype=jnp.int32) - token_start[sorted_expert]
    sorted_row = (block_end - expert_blocks)[sorted_expert] * block_size + rank
    row = jnp.zeros(tokens, jnp.int32).at[order].set(sorted_row, unique_indices=True)
    block_ids = jnp.arange(blocks, dtype=jnp.int32)
    # searchsorted(block_end, block_ids, side="right") as a [blocks, N] count (jnp.searchsorted
    # fails under shard_map in jax 0.10 when only one operand varies over the mesh).
    block_expert = jnp.sum(block_end[None, :] <= block_ids[:, None], axis=1, dtype=jnp.int32)
    valid = jnp.zeros(blocks * block_size, bool).at[row].set(True, unique_indices=True)
    return BlockPlan(
        row=row,
        block_expert=jnp.minimum(block_expert, num_experts - 1),
        block_used=block_ids < block_end[-1],
        valid=valid.reshape(blocks, block_size),
    )


def grouped_apply(
    fn: BlockFn,
    weights: PyTree,
    tokens: PyTree,
    expert: jax.Array,
    *,
    num_experts: int,
    block_size: int,
) -> PyTree:
    """Run each token's expert on it, one block of B same-expert tokens at a time.

    fn: (weights of one expert (each leaf's [N, ...] indexed at the block's expert),
         tokens of the block (each leaf [B, ...]), valid [B] bool) -> pytree of [B, ...].
         Padding rows hold zeros and valid=False; their outputs are discarded.
    weights: pytree of [N, ...] arrays; tokens: pytree of [T, ...] arrays;
    expert: [T] int32 routed expert of each token.
    Returns fn's outputs per token: pytree of [T, ...], in the original token order.
    """
    plan = plan_blocks(expert, num_experts, block_size)
    padded = jax.tree.map(lambda a: to_blocks(a, plan), tokens)
    out = map_blocks(fn, weights, padded, plan)
    return jax.tree.map(lambda a: from_blocks(a, plan), out)


def to_blocks(a: jax.Array, plan: BlockPlan) -> jax.Array:
    """Per-token values [T, ...] -> the padded layout [blocks, B, ...] (zeros in padding)."""
    blocks, block_size = plan.valid.shape
    buf = jnp.zeros((blocks * block_size,) + a.shape[1:], a.dtype)
    buf = buf.at[plan.row].set(a, unique_indices=True)
    return buf.reshape((blocks, block_size) + a.shape[1:])


def from_blocks(a: jax.Array, plan: BlockPlan) -> jax.Array:
    """The padded layout [blocks, B, ...] -> per-token values [T, ...] in token order."""
    return a.reshape((-1,) + a.shape[2:])[plan.row]


def map_blocks(fn: BlockFn, weights: PyTree, padded: PyTree, plan: BlockPlan) -> PyTree:
    """fn on every block with its expert's weights: padded leaves [blocks, B, ...] -> fn's
    outputs stacked over blocks. Unused blocks hold only padding (valid all False).

    Every block runs: skipping unused ones with a `lax.cond` corrupts memory in XLA:CPU's
    backward on meshes with several devices (jax 0.10), and the bound `max_blocks` is
    what any routing may need. The block's weights are sliced in the loop body, so the
    backward adds each block's weight gradient into the [N, ...] accumulator as a
    dynamic-update-slice of one expert, in place (checked in the compiled HLO).
    """

    def run_block(args):
        e, x, valid = args
        return fn(_expert_weights(weights, e), x, valid)

    return jax.lax.map(run_block, (plan.block_expert, padded, plan.valid))


def _expert_weights(weights: PyTree, e: jax.Array | int) -> PyTree:
    return jax.tree.map(lambda w: jax.lax.dynamic_index_in_dim(w, e, keepdims=False), weights)
