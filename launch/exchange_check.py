"""An implementation of `ragged_all_to_all` against a numpy model of the op: values and
gradients, for the device check `ragged_all_to_all` (launch/device_checks.py).

Every device of the 'expert' axis sends its rows to destination devices and gets them back
(`exchange.plan_exchange`, the dropless trip out and the return trip). The loss
sum(w_out * received) + sum(w_back * returned) has, for a row of device s that landed at
row o of device r's receive buffer, the gradient w_back[row] + w_out[r][o]: the numpy model
computes the received buffers and that gradient by the exchange's bookkeeping, with no JAX
AD, so it also checks the op's transpose (the reverse exchange) without trusting it. Weights
and payloads are small integers, exact in bfloat16, so every comparison is exact.

Cases: payloads float32 and bfloat16 (values and gradient) and int32 (values only); routings
'random' (uniform destinations) and 'skewed' (every device sends all its rows to device 0,
whose receive buffer of E x T_local rows is then full: the worst case).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from sae_jax.dispatch import exchange
from sae_jax.mesh import AXES
from sae_jax.varying import vary, varying_axes

PAYLOADS = ("float32", "bfloat16", "int32")
ROUTINGS = ("random", "skewed")
AXIS = "expert"
Op = Callable[..., jax.Array]  # jax.lax.ragged_all_to_all's signature


def destinations(routing: str, devices: int, rows: int, seed: int = 0) -> np.ndarray:
    """[devices * rows] int32 destination device of every row, device-major."""
    if routing == "skewed":
        return np.zeros(devices * rows, np.int32)
    return np.random.default_rng(seed).integers(0, devices, devices * rows).astype(np.int32)


def small_integers(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Values in [-8, 8], exact in every payload dtype and in their sums of two."""
    return np.random.default_rng(seed).integers(-8, 9, shape).astype(np.float32)


def model_trip(x: np.ndarray, dest: np.ndarray, w_out: np.ndarray, w_back: np.ndarray) -> dict:
    """The numpy model: x [E, T, d], dest [E, T], w_out [E, E*T, d], w_back [E, T, d] ->
    received [E, E*T, d], returned [E, T, d] (= x) and the loss's gradient [E, T, d]."""
    e, t = dest.shape
    received = np.zeros((e, e * t) + x.shape[2:], x.dtype)
    grad = w_back.astype(np.float32).copy()
    filled = np.zeros(e, np.int64)  # rows of each receiver written so far, in sender order
    for s in range(e):
        for r in range(e):
            rows = np.flatnonzero(dest[s] == r)  # stable: in the sender's order
            at = filled[r] + np.arange(rows.size)
            received[r, at] = x[s, rows]
            grad[s, rows] += w_out[r, at]
            filled[r] += rows.size
    return {"received": received, "returned": x.copy(), "grad": grad}


@functools.lru_cache(maxsize=8)  # the jitted trips of one op compile once per payload dtype
def op_trips(mesh, op: Op) -> tuple[Callable, Callable]:
    """Jitted trips through `op` inside shard_map over `mesh`'s 'expert' axis (the only axis
    of more than one device), on device-major flat arrays: values(x, dest) -> (received,
    returned), and with_grad(x, dest, w_out, w_back) -> (loss's gradient, (received,
    returned)) for float payloads."""
    spec = PartitionSpec(AXES)
    trip = jax.shard_map(lambda x, dest: _trip(op, x, dest), mesh=mesh,
                         in_specs=(spec, spec), out_specs=(spec, spec))  # fmt: skip

    def loss(x, dest, w_out, w_back):
        received, returned = trip(x, dest)
        f32 = jnp.float32
        value = jnp.sum(w_out * received.astype(f32)) + jnp.sum(w_back * returned.astype(f32))
        return value, (received, returned)

    return jax.jit(trip), jax.jit(jax.grad(loss, has_aux=True))


def op_trip(trips: tuple[Callable, Callable], x: np.ndarray, dest: np.ndarray, w_out, w_back):
    """The trip of `op_trips` on the model's arguments; the same dict as `model_trip`'s (no
    gradient for integer payloads)."""
    values, with_grad = trips
    e, t = dest.shape
    flat_x, flat_dest = x.reshape(e * t, *x.shape[2:]), dest.reshape(-1)
    out = {}
    if jnp.issubdtype(x.dtype, jnp.floating):
        flat_w_out = w_out.reshape(e * e * t, *x.shape[2:])
        grad, received = with_grad(flat_x, flat_dest, flat_w_out, w_back.reshape(flat_x.shape))
        out["grad"] = np.asarray(jax.device_get(grad), np.float32).reshape(x.shape)
    else:
        received = values(flat_x, flat_dest)
    received, returned = jax.device_get(received)
    out["received"] = received.reshape(e, e * t, *x.shape[2:])
    out["returned"] = returned.reshape(x.shape)
    return out


def _trip(op: Op, x: jax.Array, dest: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per device: (the receive buffer [E x T_local, ...], the rows back in their order)."""
    e, t = jax.lax.axis_size(AXIS), x.shape[0]
    order, sizes = exchange.sort_by_destination(dest, e)
    out, back = exchange.plan_exchange(sizes, AXIS)
    received = _exchange(op, x[order], out, exchange.max_received_rows(e, t))
    returned = _exchange(op, received, back, t)
    return received, jnp.zeros_like(returned).at[order].set(returned)


def _exchange(op: Op, operand: jax.Array, plan: exchange.RaggedPlan, rows: int) -> jax.Array:
    """`exchange.ragged_exchange` with the op given: into a zero buffer of `rows` rows."""
    output = jnp.zeros((rows,) + operand.shape[1:], operand.dtype)
    output = vary(output, (AXIS, *varying_axes((operand, *plan))))
    return op(operand, output, *plan, axis_name=AXIS)


def compare(mesh, op: Op, rows: int, d: int) -> dict[str, str]:
    """Every payload x routing case of `op` against the model over `mesh` (E devices on
    'expert', `rows` rows each, d columns): {case: what differs} for the cases that differ."""
    e = mesh.shape[AXIS]
    w_out, w_back = small_integers((e, e * rows, d), 1), small_integers((e, rows, d), 2)
    trips, failures = op_trips(mesh, op), {}
    for payload in PAYLOADS:
        x = small_integers((e, rows, d), 3).astype(jnp.dtype(payload))
        for routing in ROUTINGS:
            dest = destinations(routing, e, rows).reshape(e, rows)
            want = model_trip(x, dest, w_out, w_back)
            got = op_trip(trips, x, dest, w_out, w_back)
            wrong = [k for k in got if not _equal(got[k], want[k])]
            if wrong:
                failures[f"{payload}/{routing}"] = ", ".join(wrong) + " differ"
    return failures


def _equal(a: np.ndarray, b: np.ndarray) -> bool:
    return np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
