"""Exchange exactly the routed rows between devices: `jax.lax.ragged_all_to_all`, and its
CPU emulation.

Used by dropless dispatch across devices (sae_jax/dispatch/dropless.py). Inside
`jax.shard_map`, along a mesh axis of E devices, each device holds its T_local rows sorted
by destination device (for experts laid out contiguously per device: destination =
expert // N_local), the chunk for device j starting at row `input_offsets[j]` = sum of
`send_sizes[:j]`. Every receiver lays the chunks
it gets contiguously from row 0, in sender order.

- `plan_exchange(send_sizes, axis_name)`: one `all_gather` of the [E] send sizes gives every
  device the whole [E, E] matrix `sizes[s, r]` (rows s sends r), from which the sizes and
  offsets of both trips follow locally: `output_offsets[r]` (where this device's chunk lands
  in receiver r) depends on what the senders before it send to r, which one all_to_all of the
  sizes cannot tell a sender. Returns the `RaggedPlan` of the trip out and of the return trip
  (the same exchange with sizes and offsets swapped), which puts each result back at its
  token's original row.
- `ragged_exchange(operand, plan, axis_name, output_rows)`: the real `ragged_all_to_all` on
  GPU/TPU; on CPU (XLA:CPU does not implement ragged-all-to-all) `ragged_all_to_all_emulated`,
  which has the op's documented semantics and the same arguments.

Worst-case buffer: the receive side needs a static row count, and nothing bounds what one
device gets except that every device of the axis may send it all of its rows, so a dropless
exchange needs `output_rows = E * T_local` (`max_received_rows`). The return trip's output is
the sender's own [T_local, ...] buffer.

`ragged_all_to_all` has JAX AD rules (its transpose is the reverse exchange); the emulation
is built from gather, all_to_all and scatter, so it differentiates as well. Groups are the
named mesh axis; `axis_index_groups` is not supported.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from sae_jax.varying import vary, varying_axes


class RaggedPlan(NamedTuple):
    """Sizes and offsets of one `ragged_all_to_all` along an axis of E devices, as seen by this
    device; the four arguments of the op, each [E] int32, entry j about device j."""

    input_offsets: jax.Array  # first row in this device's operand of the chunk sent to j
    send_sizes: jax.Array  # rows sent to j
    output_offsets: jax.Array  # first row of that chunk in j's output (the receiver's buffer)
    recv_sizes: jax.Array  # rows received from j


def max_received_rows(axis_size: int, local_rows: int) -> int:
    """Static output rows of a dropless exchange: every one of E senders may send all of its
    T_local rows to the same receiver, so E * T_local."""
    return axis_size * local_rows


def sort_by_destination(dest: jax.Array, axis_size: int) -> tuple[jax.Array, jax.Array]:
    """Order rows by destination device, stably (rows keep their order inside a chunk).

    dest: [T_local] int32 in [0, E). Returns (order [T_local], send_sizes [E] int32):
    `rows[order]` is the operand of `plan_exchange(send_sizes, ...)`; `out.at[order].set(r)`
    undoes the sort.
    """
    order = jnp.argsort(dest, stable=True)
    sizes = jnp.zeros(axis_size, jnp.int32).at[dest].add(1)
    return order, sizes


def exclusive_cumsum(x: jax.Array, axis: int = 0) -> jax.Array:
    return jnp.cumsum(x, axis=axis) - x


def plan_exchange(send_sizes: jax.Array, axis_name: str) -> tuple[RaggedPlan, RaggedPlan]:
    """Sizes and offsets of the trip to the destinations and of the return trip.

    send_sizes: [E] int32, rows this device sends to each device of `axis_name` (its operand
    holds them contiguously from row 0, in destination order). Call inside `jax.shard_map`.
    Returns (out, back): `out` sends the sorted rows to their destinations, where the chunks
    land contiguously in sender order; `back` sends rows at those positions of a receiver's
    buffer back to the senders, to the rows they came from.
    """
    me = jax.lax.axis_index(axis_name)
    sizes = jax.lax.all_gather(send_sizes.astype(jnp.int32), axis_name)  # [E, E]: [s, r]
    before_receiver = exclusive_cumsum(sizes, axis=1)  # [s, r]: s's rows for receivers < r
    before_sender = exclusive_cumsum(sizes, axis=0)  # [s, r]: r's rows from senders < s
    out = RaggedPlan(
        input_offsets=before_receiver[me],
        send_sizes=sizes[me],
        output_offsets=before_sender[me],
        recv_sizes=sizes[:, me],
    )
    back = RaggedPlan(
        input_offsets=before_sender[:, me],
        send_sizes=sizes[:, me],
        output_offsets=before_receiver[:, me],
        recv_sizes=sizes[me],
    )
    return out, back


def ragged_exchange(
    operand: jax.Array,
    plan: RaggedPlan,
    axis_name: str,
    output_rows: int,
    *,
    output: jax.Array | None = None,
    emulate: bool | None = None,
) -> jax.Array:
    """Send `operand`'s chunks as `plan` says; call inside `jax.shard_map`.

    operand: [T_local, ...] (rows sorted by destination for a trip out); output: the
    [output_rows, ...] buffer received rows are written into (default zeros; rows nobody
    writes keep its values). emulate: None picks the emulation on the CPU backend only.
    Returns [output_rows, ...]: for the trip out of `plan_exchange`, the received chunks in
    sender order from row 0 (sum(plan.recv_sizes) rows); use `max_received_rows` for a
    dropless trip out.
    """
    if output is None:
        output = jnp.zeros((output_rows,) + operand.shape[1:], operand.dtype)
    if output.shape[0] != output_rows:
        raise ValueError(f"output has {output.shape[0]} rows, expected {output_rows}")
    if emulate is None:
        emulate = jax.default_backend() == "cpu"
    op = ragged_all_to_all_emulated if emulate else jax.lax.ragged_all_to_all
    # The op's result takes `output`'s type, which must vary like the data written into it.
    output = vary(output, (axis_name, *varying_axes((operand, *plan))))
    return op(operand, output, *plan, axis_name=axis_name)


def ragged_all_to_all_emulated(
    operand: jax.Array,
    output: jax.Array,
    input_offsets: jax.Array,
    send_sizes: jax.Array,
    output_offsets: jax.Array,
    recv_sizes: jax.Array,
    *,
    axis_name: str,
) -> jax.Array:
    """`jax.lax.ragged_all_to_all` (same arguments and semantics) from a dense all_to_all.

    operand: [N_rows, ...]; output: [M, ...]; offsets and sizes: [K] integers, K a multiple of
    E = the size of `axis_name`, slice k going to device k // (K / E). Each slice is padded
    into a [K, min(N_rows, M), ...] buffer (a slice cannot be longer than either), the buffer
    goes through `jax.lax.all_to_all`, and each received slice i (from device i // (K / E)) is
    scattered to rows [output_offsets_[i], output_offsets_[i] + recv_sizes[i]) of `output`,
    where output_offsets_ is the all_to_all of the senders' output_offsets.
    Cost per device: K * min(N_rows, M) rows each way, against sum(send_sizes) for the real op.
    """
    k = input_offsets.shape[0]
    rows = min(operand.shape[0], output.shape[0])
    j = jnp.arange(rows, dtype=jnp.int32)
    src = input_offsets.astype(jnp.int32)[:, None] + j  # [K, rows]
    sent = j < send_sizes[:, None]
    chunks = operand[jnp.where(sent, src, 0)]  # [K, rows, ...]
    chunks = jnp.where(_expand(sent, chunks.ndim), chunks, jnp.zeros((), chunks.dtype))
    received = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=True)
    dst_offsets = jax.lax.all_to_all(output_offsets.astype(jnp.int32), axis_name, 0, 0, tiled=True)
    dst = dst_offsets[:, None] + j
    # Rows past a slice's size go to an out-of-range row, which the scatter drops.
    dst = jnp.where(j < recv_sizes[:, None], dst, output.shape[0])
    flat = received.reshape((k * rows,) + received.shape[2:])
    return output.at[dst.reshape(-1)].set(flat.astype(output.dtype), mode="drop")


def _expand(mask: jax.Array, ndim: int) -> jax.Array:
    return mask.reshape(mask.shape + (1,) * (ndim - mask.ndim))
