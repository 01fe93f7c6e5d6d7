"""The ragged exchange: the CPU emulation of `ragged_all_to_all` against the numpy model of its
docstring, the offsets of `plan_exchange`, and the round trip to the experts' devices and back.

Exchanges run along 'expert' of a (1, 8) mesh and, as two independent groups, of a (2, 4) mesh.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from reference import ragged_all_to_all as ragged_reference

from sae_jax.dispatch import exchange
from sae_jax.mesh import AXES, make_mesh

MESHES = {"1x8": (1, 8), "2x4": (2, 4)}
SPEC = P(AXES)  # every per-device array is stacked along axis 0 in device order
D = 3
T_LOCAL, N_LOCAL = 16, 2  # tokens per device, experts per device (round trip)


def sharded(fn, mesh, n_in: int, n_out: int):
    """jit(shard_map(fn)) with every input and output split over all devices."""
    out_specs = SPEC if n_out == 1 else (SPEC,) * n_out
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(SPEC,) * n_in, out_specs=out_specs))


def layout(rng: np.random.Generator, sizes: np.ndarray, rows: int) -> np.ndarray:
    """Offsets that place slices of these sizes in `rows` rows, in random order, with gaps."""
    order = rng.permutation(len(sizes))
    gaps = np.sort(rng.integers(0, rows - sizes.sum() + 1, len(sizes)))
    start = gaps + np.cumsum(sizes[order]) - sizes[order]
    offsets = np.empty(len(sizes), np.int32)
    offsets[order] = start
    return offsets


def receiver_view(a: np.ndarray, s: int) -> np.ndarray:
    """[sender, K] -> [receiver, K]: entry (src, dst * S + j) moves to (dst, src * S + j),
    which is what `all_to_all(a, axis, 0, 0, tiled=True)` does."""
    e, k = a.shape
    return a.reshape(e, e, s).transpose(1, 0, 2).reshape(e, k)


def group_case(rng, sizes: np.ndarray, s: int, n: int, m: int) -> dict[str, np.ndarray]:
    """Arguments of one group of E devices; sizes [E, K]: rows device src sends as slice k."""
    e = sizes.shape[0]
    recv_sizes = receiver_view(sizes, s)
    recv_at = np.stack([layout(rng, recv_sizes[dst], m) for dst in range(e)])
    return {
        "operand": rng.normal(size=(e, n, D)).astype(np.float32),
        "output": rng.normal(size=(e, m, D)).astype(np.float32),
        "input_offsets": np.stack([layout(rng, sizes[src], n) for src in range(e)]),
        "send_sizes": sizes.astype(np.int32),
        "output_offsets": receiver_view(recv_at, s),  # senders' view of receivers' offsets
        "recv_sizes": recv_sizes.astype(np.int32),
    }


# The worked example of the `jax.lax.ragged_all_to_all` docstring (an axis of size 2).
DOC_EXAMPLE = {
    "operand": [[1, 2, 2], [3, 4, 0]],
    "output": [[0, 0, 0, 0], [0, 0, 0, 0]],
    "input_offsets": [[0, 1], [0, 1]],
    "send_sizes": [[1, 2], [1, 1]],
    "output_offsets": [[0, 0], [1, 2]],
    "recv_sizes": [[1, 1], [2, 1]],
}
DOC_RESULT = [[1, 3, 0, 0], [2, 2, 4, 0]]


def test_docstring_example():
    args = [np.asarray(a, np.int32) for a in DOC_EXAMPLE.values()]
    np.testing.assert_array_equal(ragged_reference(*(list(a) for a in args)), DOC_RESULT)
    fn = functools.partial(exchange.ragged_all_to_all_emulated, axis_name="expert")
    run = sharded(fn, make_mesh((4, 2)), 6, 1)  # four copies of the example
    got = run(*(np.tile(a, (4, 1)).reshape(-1) for a in args))
    np.testing.assert_array_equal(np.asarray(got).reshape(4, 2, 4), [DOC_RESULT] * 4)


def sizes_for(kind: str, rng, e: int, k: int, n: int) -> np.ndarray:
    if kind == "empty":
        return np.zeros((e, k), np.int64)
    if kind == "one_to_one":  # device 1 sends its whole operand to the last device
        sizes = np.zeros((e, k), np.int64)
        sizes[1, k - 1] = n
        return sizes
    return rng.integers(0, 4, (e, k)) * (rng.random((e, k)) > 0.3)  # zero-size slices too


@pytest.mark.parametrize("s", [1, 2], ids=["1_slice", "2_slices"])
@pytest.mark.parametrize("mesh_shape", MESHES.values(), ids=MESHES.keys())
def test_emulation_matches_docstring_model(mesh_shape, s):
    groups, e = mesh_shape
    k = e * s
    n = 3 * k + 4  # room for random sizes below 4 plus gaps
    m = n + 2  # room for every receiver's slices and for one whole operand
    fn = functools.partial(exchange.ragged_all_to_all_emulated, axis_name="expert")
    run = sharded(fn, make_mesh(mesh_shape), 6, 1)
    rng = np.random.default_rng(s)
    for kind in ["random", "random", "random", "one_to_one", "empty"]:
        cases = [group_case(rng, sizes_for(kind, rng, e, k, n), s, n, m) for _ in range(groups)]
        names = list(cases[0])
        stacked = [np.concatenate([c[name] for c in cases]) for name in names]
        args = [a.reshape((-1,) + a.shape[2:]) for a in stacked]  # devices along rows
        got = np.asarray(run(*args)).reshape(groups, e, m, D)
        for g, case in enumerate(cases):
            want = ragged_reference(*(list(case[name]) for name in names))
            np.testing.assert_array_equal(got[g], np.stack(want), err_msg=kind)


def plan_fn(send_sizes):
    out, back = exchange.plan_exchange(send_sizes, "expert")
    return (*out, *back)


@pytest.mark.parametrize("mesh_shape", MESHES.values(), ids=MESHES.keys())
def test_plan_offsets(mesh_shape):
    groups, e = mesh_shape
    rng = np.random.default_rng(0)
    send = rng.integers(0, 5, (groups, e, e)) * (rng.random((groups, e, e)) > 0.3)
    send[0, 1] = [0] * (e - 1) + [7]  # one sender's rows all to the last device
    got = sharded(plan_fn, make_mesh(mesh_shape), 1, 8)(send.reshape(-1).astype(np.int32))
    got = [np.asarray(a).reshape(groups, e, e) for a in got]
    for g in range(groups):
        sizes = send[g]  # [s, r]: rows s sends r
        before_r = np.cumsum(sizes, axis=1) - sizes
        before_s = np.cumsum(sizes, axis=0) - sizes
        out = [before_r, sizes, before_s, sizes.T]  # row = this device as the sender
        back = [before_s.T, sizes.T, before_r.T, sizes]  # row = this device
        names = [f"{trip}.{f}" for trip in ("out", "back") for f in exchange.RaggedPlan._fields]
        for name, a, b in zip(names, [x[g] for x in got], out + back, strict=True):
            np.testing.assert_array_equal(a, b, err_msg=name)
        # The op's precondition: send_sizes == all_to_all(recv_sizes).
        np.testing.assert_array_equal(got[1][g], receiver_view(got[3][g], 1))
        np.testing.assert_array_equal(got[5][g], receiver_view(got[7][g], 1))


def round_trip(x, expert, *, emulate: bool = True):
    """Per device: x [T_local, D], expert [T_local] -> each token's row function computed on
    its expert's device, back in the original rows; and rows received [1]."""
    e = jax.lax.axis_size("expert")
    t = x.shape[0]
    order, sizes = exchange.sort_by_destination(expert // N_LOCAL, e)
    out, back = exchange.plan_exchange(sizes, "expert")
    rows = exchange.max_received_rows(e, t)
    x_recv = exchange.ragged_exchange(x[order], out, "expert", rows, emulate=emulate)
    e_recv = exchange.ragged_exchange(expert[order], out, "expert", rows, emulate=emulate)
    # The device term is zero for rows that reached their expert's device.
    here = jax.lax.axis_index("expert") - e_recv // N_LOCAL
    y = x_recv * (e_recv + 1)[:, None] + 100.0 * here[:, None]
    y_back = exchange.ragged_exchange(y, back, "expert", t, emulate=emulate)
    return jnp.zeros_like(y_back).at[order].set(y_back), jnp.sum(out.recv_sizes)[None]


def routings(e: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    tokens = 8 * T_LOCAL
    own = (np.arange(tokens) // T_LOCAL % e) * N_LOCAL + rng.integers(0, N_LOCAL, tokens)
    return {
        "random": rng.integers(0, e * N_LOCAL, tokens),
        "all_to_expert_0": np.zeros(tokens, np.int64),  # device 0 receives E * T_local rows
        "own_device": own,  # nothing crosses devices
    }


@pytest.mark.parametrize("mesh_shape", MESHES.values(), ids=MESHES.keys())
def test_round_trip(mesh_shape):
    groups, e = mesh_shape
    run = sharded(round_trip, make_mesh(mesh_shape), 2, 2)
    x = np.random.default_rng(0).normal(size=(8 * T_LOCAL, D)).astype(np.float32)
    for name, expert in routings(e).items():
        y, received = run(x, expert.astype(np.int32))
        np.testing.assert_allclose(np.asarray(y), x * (expert + 1)[:, None], err_msg=name)
        dest = (expert // N_LOCAL).reshape(groups, e * T_LOCAL)
        want = [np.sum(dest == r, axis=1) for r in range(e)]
        np.testing.assert_array_equal(np.asarray(received).reshape(groups, e).T, want, name)


def test_gradient_is_the_return_trip():
    """d sum(w * received) / d operand = w sent back by the return trip's plan."""

    def grads(x, expert, w):
        e, t = jax.lax.axis_size("expert"), x.shape[0]
        order, sizes = exchange.sort_by_destination(expert // N_LOCAL, e)
        out, back = exchange.plan_exchange(sizes, "expert")
        rows = exchange.max_received_rows(e, t)

        def loss(xs):
            return jnp.sum(w * exchange.ragged_exchange(xs, out, "expert", rows, emulate=True))

        return jax.grad(loss)(x[order]), exchange.ragged_exchange(w, back, "expert", t)

    rng = np.random.default_rng(2)
    e = 8
    x = rng.normal(size=(8 * T_LOCAL, D)).astype(np.float32)
    expert = rng.integers(0, e * N_LOCAL, 8 * T_LOCAL).astype(np.int32)
    w = rng.normal(size=(8 * e * T_LOCAL, D)).astype(np.float32)
    got, want = sharded(grads, make_mesh((1, 8)), 3, 2)(x, expert, w)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_real_op_path_lowers():
    """The GPU/TPU path, and its gradient, trace and type-check (check_vma) with the same
    plan; XLA:CPU cannot compile ragged-all-to-all, so only the lowering is checked."""
    real = functools.partial(round_trip, emulate=False)

    def grad(x, expert):
        return jax.grad(lambda x: jnp.sum(real(x, expert)[0] ** 2))(x)

    x = jax.ShapeDtypeStruct((8 * T_LOCAL, D), jnp.float32)
    expert = jax.ShapeDtypeStruct((8 * T_LOCAL,), jnp.int32)
    mesh = make_mesh((2, 4))
    text = sharded(real, mesh, 2, 2).lower(x, expert).as_text()
    assert text.count("ragged_all_to_all") == 3
    # The forward's three, and the transposes of x's two trips (the plan reversed).
    text = sharded(grad, mesh, 2, 1).lower(x, expert).as_text()
    assert text.count("ragged_all_to_all") == 5
