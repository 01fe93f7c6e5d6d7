"""The planner's counts checked against what they were not fitted to: loops with known trip
counts, a hand count of a tiny config's FLOPs, and the compiled step of a config none of the
estimate's constants were read from. In-process, on conftest's 8 simulated devices."""

import jax
import jax.numpy as jnp
import pytest

from sae_jax.config import SAEConfig, TrainConfig
from sae_jax.mesh import make_mesh
from sae_jax.plan import build, estimate, hardware


def _compiled(fn, *shapes):
    return jax.jit(fn).lower(*shapes).compile()


def test_loop_bodies_are_counted_once_per_trip():
    """XLA's cost analysis counts a while body once; build.cost scales it by the trips, nested
    loops multiplied through."""
    m, k = 64, 128
    x = jax.ShapeDtypeStruct((m, k), jnp.float32)
    w = jax.ShapeDtypeStruct((k, k), jnp.float32)
    matmul = 2 * m * k * k  # one x @ w (tanh is a transcendental, not a FLOP)

    def flat(x, w):
        return jax.lax.fori_loop(0, 10, lambda i, x: jnp.tanh(x @ w), x)

    def nested(x, w):
        inner = lambda i, x: jax.lax.fori_loop(0, 4, lambda j, x: jnp.tanh(x @ w), x)  # noqa: E731
        return jax.lax.fori_loop(0, 3, inner, x)

    for fn, trips in ((flat, 10), (nested, 12)):
        cost = build.cost(_compiled(fn, x, w))
        assert cost["flops"] == pytest.approx(trips * matmul, rel=0.01), fn.__name__
        assert cost["flops_xla"] == pytest.approx(matmul, rel=0.01)  # XLA's own: one trip
        assert cost["loops_counted"] and not cost["unknown_trip_loops"]


def test_a_loop_without_a_known_trip_count_is_named():
    def dynamic(x, w, n):
        return jax.lax.fori_loop(0, n, lambda i, x: x @ w, x)

    x = jax.ShapeDtypeStruct((8, 16), jnp.float32)
    w = jax.ShapeDtypeStruct((16, 16), jnp.float32)
    n = jax.ShapeDtypeStruct((), jnp.int32)
    cost = build.cost(_compiled(dynamic, x, w, n))
    assert len(cost["unknown_trip_loops"]) == 1
    assert cost["flops"] == pytest.approx(cost["flops_xla"])


def test_rows_gathered_in_a_loop_are_charged_as_rows():
    """A loop gathering k rows of a [V, d] table per trip moves k rows a trip, not the table
    (XLA charges a fusion the whole operand it gathers from)."""
    vocab, d, k, trips = 8192, 256, 16, 32
    table = jax.ShapeDtypeStruct((vocab, d), jnp.float32)
    ids = jax.ShapeDtypeStruct((trips, k), jnp.int32)

    def gather_rows(table, ids):
        step = lambda i, acc: acc + 2.0 * jnp.take(table, ids[i], axis=0)  # noqa: E731
        return jax.lax.fori_loop(0, trips, step, jnp.zeros((k, d), jnp.float32))

    cost = build.cost(_compiled(gather_rows, table, ids))
    assert cost["bytes_accessed"] < 0.25 * trips * vocab * d * 4  # a whole table per trip
    assert cost["bytes_accessed"] >= trips * k * d * 4  # at least the rows


def test_an_expert_cast_into_a_buffer_per_trip_is_charged_one_expert():
    """The bfloat16 copy of w_enc written an expert per trip: XLA:CPU wraps the in-place
    update in converts of the whole buffer (convert(DUS(convert(buffer), update))), which its
    cost analysis charges whole every trip."""
    experts, rows, d = 16, 256, 128
    w = jax.ShapeDtypeStruct((experts, rows, d), jnp.float32)

    def cast_each(w):
        def body(i, buf):
            row = (2.0 * w[i]).astype(jnp.bfloat16)
            return jax.lax.dynamic_update_index_in_dim(buf, row, i, 0)

        return jax.lax.fori_loop(0, experts, body, jnp.zeros((experts, rows, d), jnp.bfloat16))

    cost = build.cost(_compiled(cast_each, w))
    whole = experts * experts * rows * d  # elements, if each trip touched the whole buffer
    assert cost["flops"] < 0.25 * 2 * whole  # two converts of the buffer a trip
    assert cost["bytes_accessed"] < 0.25 * 2 * 2 * whole  # read and written, bfloat16


def _plan(cfg: SAEConfig, tcfg: TrainConfig, step: str) -> dict:
    """One compiled step's cost and memory beside the analytic estimate (this backend)."""
    mesh = make_mesh(tcfg.mesh_shape)
    compiled = build.compile_steps(cfg, tcfg, mesh, names=(step,))[step]
    shapes = estimate.Shapes.of(cfg, tcfg, tcfg.mesh_shape, jax.default_backend())
    return {
        "flops_per_token": build.cost(compiled)["flops"] * mesh.size / tcfg.batch_size,
        "flops_estimate": estimate.flops_per_token(shapes, step == "train_auxk"),
        "memory": build.memory(compiled)["total_bytes"],
        "memory_estimate": estimate.memory(shapes)["total"],
    }


def test_tiny_config_flops_against_a_hand_count():
    """d = 64, N = 4 experts of L = 256 (dense kernel), K = 8, 256 tokens on one device,
    capacity factor 1.25: C = ceil(1.25 x 256 / 4) = 80 slots per expert, 320 rows for 256
    tokens (x 1.25). Per token, forward + backward, 2 FLOPs a multiply-add:
      router    x @ W_router [64, 4], forward and both gradients   3 x 2 x 64 x 4   =   1536
      encoder   [., 64] @ [64, 256] and W_enc's gradient  2 x 2 x 256 x 64 x 1.25 =  81920
      decoder   [., 256] @ [256, 64] and both gradients   3 x 2 x 256 x 64 x 1.25 = 122880
      update    ~20 FLOPs per parameter (2 x 1024 x 64), once per 256 tokens      =  10240
    """
    hand = 1536 + 81920 + 122880 + 10240
    cfg = SAEConfig(d=64, num_latents=1024, num_experts=4, k=8, k_aux=0,
                    compute_dtype="float32").validate()  # fmt: skip
    plan = _plan(cfg, TrainConfig(batch_size=256, mesh_shape=(1, 1)), "train")
    assert plan["flops_estimate"]["total"] == hand
    # XLA's count adds the elementwise work (top-k, ReLU, losses) the hand count leaves out.
    assert hand <= plan["flops_per_token"] <= 1.1 * hand, plan["flops_per_token"]


def test_estimate_on_a_config_it_was_not_fitted_to():
    """A 2 x 4 data x expert mesh, N = 16 experts of L = 2048 at d = 256, the gather kernel,
    bfloat16, AuxK: none of estimate.py's constants were read off this config (they were read
    on pod.gin at 64 and 256 devices, (1, E) meshes, and a d = 256 dropless variant). Its
    expert loops run 4 trips (the local experts) and its k-slot loops 16: counted once, XLA's
    FLOPs are a third of the analytic count. Tolerance: 15% for both FLOPs and memory."""
    cfg = SAEConfig(d=256, num_latents=32768, num_experts=16, k=16, expert_kernel="gather",
                    compute_dtype="bfloat16").validate()  # fmt: skip
    plan = _plan(cfg, TrainConfig(batch_size=4096, mesh_shape=(2, 4)), "train_auxk")
    flops, analytic = plan["flops_per_token"], plan["flops_estimate"]["total"]
    assert abs(flops - analytic) <= 0.15 * analytic, (flops, analytic)
    memory, predicted = plan["memory"], plan["memory_estimate"]
    assert abs(predicted - memory) <= 0.15 * memory, (predicted, memory)


def test_fits_is_judged_on_usable_memory():
    """An H100 gives XLA's buffers 75% of its 80 GB by default, less workspaces; a TPU v5p its
    HBM less the runtime's share."""
    h100 = hardware.get("h100")
    assert h100.usable_bytes == 0.75 * 80e9 - hardware.GPU_WORKSPACE_BYTES
    assert hardware.get("h100", mem_fraction=0.9).usable_bytes == (
        0.9 * 80e9 - hardware.GPU_WORKSPACE_BYTES
    )
    tpu = hardware.get("tpu-v5p")
    assert tpu.usable_bytes == 95e9 - hardware.TPU_RESERVED_BYTES
    cpu = hardware.get("cpu")
    assert cpu.usable_bytes == cpu.memory_bytes


def test_a_step_between_usable_and_nominal_memory_does_not_fit():
    from sae_jax.plan import report

    measured = _measured_stub(needed=70e9)  # below the H100's 80 GB, above its 59 usable
    plan = report.plan_for(measured, hardware.get("h100"))
    assert plan["fits"] is False and plan["hardware"]["usable_bytes"] < 70e9
    assert "usable of the card's" in report.format_text(plan)


def _measured_stub(needed: float) -> dict:
    """What report.measure returns, for pod.gin-like shapes on 64 devices, with `needed` bytes."""
    shapes = estimate.Shapes(d=4096, num_latents=2**24, num_experts=1024, k=32, k_aux=256,
                             batch=131072, data=1, expert=64, capacity_factor=1.25,
                             compute_dtype="bfloat16")  # fmt: skip
    mem = {"arguments": int(needed), "outputs": 0, "temporaries": 0, "aliased": 0,
           "total_bytes": int(needed)}  # fmt: skip
    cost = {"flops": 1e12, "bytes_accessed": 1e11, "flops_xla": 1e11, "bytes_xla": 1e10,
            "loops": [], "unknown_trip_loops": [], "loops_counted": True}  # fmt: skip
    step = {"memory": mem, "cost": cost, "largest_buffers": [], "collectives": []}
    return {
        "config": {"d": 4096, "num_latents": 2**24, "num_experts": 1024, "k": 32,
                   "batch_size": 131072, "mesh_shape": [1, 64], "devices": 64,
                   "capacity_factor": 1.25, "compute_dtype": "bfloat16",
                   "dispatch": "capacity"},  # fmt: skip
        "dropless": None, "backend": "cpu", "train_step": "train",
        "memory": {"compiled": mem, "estimate": {"total_bytes": int(needed)},
                   "eval_compiled": mem, "needed_bytes": int(needed)},  # fmt: skip
        "largest_buffers": [], "collectives": [], "collective_bytes": 0, "ragged_estimate": [],
        "flops_per_token": 1.0, "flops_per_token_xla_once": 1.0,
        "flops_per_token_estimate": estimate.flops_per_token(shapes, False),
        "replicated_expert_buffers": [], "steps": {"train": step, "eval": step},
        "_shapes": shapes,
    }  # fmt: skip


def test_plan_doc_fills_every_figure_of_its_template():
    """docs/pod_scale.md is the template with every $placeholder filled from the plans; a plan
    not run shows as "not planned" and is listed."""
    import re

    from launch import plan_doc
    from sae_jax.plan import report

    template = (plan_doc.ROOT / "launch" / "plan_doc_template.md").read_text()
    plan = report.plan_for(_measured_stub(needed=30e9), hardware.get("h100"))
    plans = {name: {hw: plan for hw in p.hardware} for name, p in plan_doc.PLANS.items()}
    page = plan_doc.render(template, plans)
    assert not re.findall(r"\$\w+", page) and "not planned" not in page
    assert "| 64 | train | 27.94 GiB |" in page  # the memory table, from the plan's JSON
    del plans["pod_256_dropless"]
    page = plan_doc.render(template, plans)
    assert "left out 1 plans" in page and "| step reported | train | not planned |" in page
