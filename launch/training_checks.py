"""The device checks of `python -m launch.devcheck` that run training steps: the runtime peak
memory against usable memory, the top-2 (two-stage global TopK) step, ZeRO-1, default.gin's
bf16 eval FVU, and the time to compile every AuxK bucket ahead. Rules in docs/devcheck.md.
"""

from __future__ import annotations

import math
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from sae_jax import precision
from sae_jax.config import SAEConfig, TrainConfig
from sae_jax.distributed import put_batch
from sae_jax.evaluation.held_out import make_eval_step
from sae_jax.kernels.auxk import max_bucket
from sae_jax.mesh import make_mesh, token_sharding
from sae_jax.model.switch import SwitchSAE
from sae_jax.plan import estimate
from sae_jax.plan.suggest import device_memory_bytes
from sae_jax.training.step import DEAD_COUNT_LAG, TrainState, setup_training

DEFAULT_FVU = 0.018  # default.gin's final eval FVU (README quick start)
FVU_TOLERANCE = 0.05  # relative
# Compiling every AuxK bucket before the first step must not cost more than this: the loop
# waits for it (on a pod every host does), and at the checks' shapes the 2 to 4 step variants
# take seconds each on a GPU; over a minute, a run of a few hundred steps loses more than
# compile_ahead=False would (each bucket then compiles at its first use, if ever).
COMPILE_AHEAD_LIMIT_S = 60.0
PLANNER_SLACK = 1.25  # the runtime peak may exceed the planner's estimate by this factor


def skip(reason: str) -> dict:
    return {"status": "skip", "reason": reason}


def verdict(ok: bool, reason: str) -> dict:
    return {"status": "pass"} if ok else {"status": "fail", "reason": reason}


def model_and_state(cfg: SAEConfig, tcfg: TrainConfig, mesh):
    """(graphdef, step-0 TrainState, TrainStep) of `cfg` built under `mesh` (set by caller)."""
    model = nnx.jit(lambda: SwitchSAE(cfg, rngs=nnx.Rngs(0)))()
    return setup_training(model, tcfg)


def random_batches(count: int, batch: int, d: int, mesh, seed: int = 0) -> list[jax.Array]:
    """`count` distinct [batch, d] float32 batches placed on the mesh's token sharding."""
    rng = np.random.default_rng(seed)
    tokens = token_sharding(mesh)
    return [put_batch(rng.normal(size=(batch, d)).astype(np.float32), tokens) for _ in range(count)]


def experts_mesh(num_experts: int):
    """A (1, E) mesh, E the most devices that divide N."""
    return make_mesh((1, math.gcd(jax.device_count(), num_experts)))


def check_cfg(sz, **changes) -> SAEConfig:
    """The checks' SAE at `sz`'s shapes, dropless, in the backend's 'auto' dtype."""
    fields = dict(d=sz.d, num_latents=sz.num_latents, num_experts=sz.num_experts, k=32,
                  dispatch="dropless", compute_dtype=precision.resolve("auto"))  # fmt: skip
    return SAEConfig(**{**fields, **changes}).validate()


# Runtime peak memory.


def peak_bytes() -> int | None:
    """The first local device's peak_bytes_in_use; None where the backend has none (CPU)."""
    stats = jax.local_devices()[0].memory_stats()
    return stats.get("peak_bytes_in_use") if stats else None


def memory_verdict(peak: float, usable: float, planned: float) -> dict:
    """Fail when the peak exceeds usable memory, or the planner's figure (which check_fits
    judges runs by) by more than PLANNER_SLACK."""
    if peak > usable:
        return verdict(False, f"the peak {peak / 2**30:.2f} GiB exceeds the usable "
                              f"{usable / 2**30:.2f} GiB")  # fmt: skip
    ratio = peak / planned
    why = "launch.plan and check_fits underestimate the run"
    return verdict(ratio <= PLANNER_SLACK, f"the peak is {ratio:.2f}x the planner's estimate "
                                           f"(> {PLANNER_SLACK}): {why}")  # fmt: skip


def peak_memory(sz) -> dict:
    """Steps as the training loop runs them and the eval step (`run_like_the_loop`), then the
    device's peak_bytes_in_use against usable memory (plan.suggest.device_memory_bytes) and
    the planner's estimate of the step plus the queued batches."""
    before = peak_bytes()
    if before is None:
        return skip(f"the {jax.default_backend()} backend reports no peak_bytes_in_use "
                    "(device.memory_stats() is None)")  # fmt: skip
    cfg, mesh = check_cfg(sz), experts_mesh(sz.num_experts)
    tcfg = TrainConfig(steps=1000, batch_size=sz.batch, mesh_shape=tuple(mesh.shape.values()))
    run_like_the_loop(cfg, tcfg, mesh)
    peak = peak_bytes()
    shapes = estimate.Shapes.of(cfg, tcfg, tcfg.mesh_shape, jax.default_backend())
    terms = estimate.memory(shapes)
    planned = terms["total"] + (DEAD_COUNT_LAG - 1) * terms["batch"]
    usable = device_memory_bytes() or float("inf")
    return {
        "peak_mib": peak / 2**20,
        "peak_before_mib": before / 2**20,
        "usable_mib": usable / 2**20,
        "planned_mib": planned / 2**20,
        "peak_over_planned": peak / planned,
        **memory_verdict(peak, usable, planned),
    }


def run_like_the_loop(cfg: SAEConfig, tcfg: TrainConfig, mesh) -> dict:
    """DEAD_COUNT_LAG steps dispatched back to back, each on its own batch placed beforehand
    (as many batches on the device as the loop holds while the host is ahead), alternating
    the largest AuxK bucket the run can use and the plain step, then the eval step on the
    last state; returns the eval step's metrics."""
    with jax.set_mesh(mesh):
        graphdef, state, step = model_and_state(cfg, tcfg, mesh)
        batches = random_batches(DEAD_COUNT_LAG, tcfg.batch_size, cfg.d, mesh)
        largest = max_bucket(cfg.latents_per_expert, tcfg.aux_max_share)
        for i, x in enumerate(batches):
            state, _ = step.for_bucket(0 if i % 2 else largest)(state, x)
        eval_step = make_eval_step(graphdef, cfg.eval_capacity_factor, tcfg.lb_alpha,
                                   tcfg.aux_weight, tcfg.router_z_weight)  # fmt: skip
        keep = put_batch(np.ones(tcfg.batch_size, np.float32), token_sharding(mesh))
        return jax.device_get(eval_step(state.params, batches[0], keep))


# The top-2 step: EXPERTS_PER_TOKEN = 2, the two-stage global TopK.


def top2_step(sz, steps: int = 3) -> dict:
    """A few EXPERTS_PER_TOKEN=2 dropless training steps on a (1, E) mesh: every loss finite,
    and l0 = k (dropless keeps every token, and its k of 2 x L candidates are positive)."""
    cfg = check_cfg(sz, experts_per_token=2)
    mesh = experts_mesh(sz.num_experts)
    tcfg = TrainConfig(steps=1000, batch_size=sz.batch, mesh_shape=tuple(mesh.shape.values()))
    with jax.set_mesh(mesh):
        _, state, step = model_and_state(cfg, tcfg, mesh)
        x = random_batches(1, sz.batch, sz.d, mesh)[0]
        losses, l0 = [], []
        for _ in range(steps):
            state, metrics = step(state, x)
            losses.append(float(metrics["loss"]))
            l0.append(float(metrics["l0"]))
    finite = bool(np.all(np.isfinite(losses)))
    l0_ok = all(abs(v - cfg.k) <= 0.01 * cfg.k for v in l0)
    return {
        "experts_axis": mesh.shape["expert"],
        "losses": losses,
        "l0": l0,
        **verdict(finite and l0_ok, f"losses {losses}, l0 {l0} (expected finite, l0 = {cfg.k})"),
    }


# ZeRO-1.


def zero1(sz, steps: int = 2) -> dict:
    """Steps on a (D, 1) mesh, D > 1 devices on 'data' (the Adam moments of the expert rows
    split over it) against the same steps on one device: the moments are split D ways, and
    the parameters' change agrees within 1% (relative Frobenius norm), float32."""
    data = math.gcd(jax.device_count(), sz.num_experts)
    if data < 2:
        why = "ZeRO-1 splits the Adam moments over it"
        return skip(f"needs >= 2 devices on the 'data' axis that divide N = {sz.num_experts} "
                    f"({why}); {jax.device_count()} here")  # fmt: skip
    cfg = check_cfg(sz, compute_dtype="float32")
    runs = {shape: _run_steps(cfg, sz, shape, steps) for shape in ((data, 1), (1, 1))}
    (zero_delta, split), (ref_delta, _) = runs[(data, 1)], runs[(1, 1)]
    err = max(
        float(np.linalg.norm(zero_delta[k] - ref_delta[k]) / (np.linalg.norm(ref_delta[k]) or 1))
        for k in ref_delta
    )  # fmt: skip
    expected = sz.num_experts // data
    why = f"moments hold {split} experts per device (expected {expected}); updates differ by"
    return {
        "data_axis": data,
        "moment_experts_per_device": split,
        "update_rel_err": err,
        **verdict(split == expected and err < 1e-2, f"{why} {err:.1e}"),
    }


def _run_steps(cfg: SAEConfig, sz, shape: tuple[int, int], steps: int) -> tuple[dict, int]:
    """({parameter: change over `steps` steps}, experts of w_enc's first Adam moment per
    device) on a mesh of `shape`, from the seed-0 model and batch."""
    mesh = make_mesh(shape)
    tcfg = TrainConfig(steps=1000, batch_size=sz.batch, mesh_shape=shape)
    with jax.set_mesh(mesh):
        _, state, step = model_and_state(cfg, tcfg, mesh)
        before = _expert_params(state)
        x = random_batches(1, sz.batch, sz.d, mesh)[0]
        for _ in range(steps):
            state, _ = step(state, x)
        after = _expert_params(state)
    return {k: after[k] - before[k] for k in before}, _moment_experts(state)


def _expert_params(state: TrainState) -> dict[str, np.ndarray]:
    params = nnx.to_pure_dict(state.params)
    return {k: np.asarray(jax.device_get(params[k])) for k in ("w_enc", "b_enc", "w_dec")}


def _moment_experts(state: TrainState) -> int:
    """Leading-axis length of one device's shard of w_enc's Adam moment (N / D under ZeRO-1)."""
    leaves = jax.tree_util.tree_leaves_with_path(state.opt_state)
    moment = next(v for p, v in leaves if "w_enc" in jax.tree_util.keystr(p) and v.ndim == 3)
    return moment.addressable_shards[0].data.shape[0]


# default.gin's bf16 eval FVU.


def default_fvu(sz) -> dict:
    """default.gin trained in bfloat16 (COMPUTE_DTYPE='bfloat16', ~1 minute on a GPU): its
    final eval FVU within FVU_TOLERANCE of DEFAULT_FVU."""
    fvu = default_run_fvu()
    return {"fvu": fvu, "expected_fvu": DEFAULT_FVU, **fvu_verdict(fvu)}


def default_run_fvu(bindings: tuple[str, ...] = ()) -> float:
    """The final eval FVU of default.gin in bfloat16 (then `bindings`), in a scratch workdir."""
    import gin

    from sae_jax.gin_setup import parse
    from sae_jax.training.loop import train

    try:
        sae_cfg, tcfg = parse([], ["COMPUTE_DTYPE='bfloat16'", *bindings])
        with tempfile.TemporaryDirectory() as workdir:
            final = train(sae_cfg, tcfg, workdir, progress=False)
    finally:
        gin.clear_config()  # else default.gin's bindings fill the later checks' configs
    return float(final["eval/fvu"])


def fvu_verdict(fvu: float) -> dict:
    off = abs(fvu / DEFAULT_FVU - 1)
    return verdict(off <= FVU_TOLERANCE, f"eval FVU {fvu:.4f}, {off:.0%} off {DEFAULT_FVU}")


# Compiling every AuxK bucket ahead.


def auxk_compile_ahead(sz) -> dict:
    """TrainStep.compile for a run whose latents can die (every bucket up to the cap), timed;
    fails over COMPILE_AHEAD_LIMIT_S."""
    cfg = check_cfg(sz)
    mesh = experts_mesh(sz.num_experts)
    tcfg = TrainConfig(steps=1000, batch_size=sz.batch, dead_after_tokens=sz.batch,
                       mesh_shape=tuple(mesh.shape.values()))  # fmt: skip
    with jax.set_mesh(mesh):
        _, state, step = model_and_state(cfg, tcfg, mesh)
        x = jax.ShapeDtypeStruct((sz.batch, sz.d), np.float32, sharding=token_sharding(mesh))
        start = time.perf_counter()
        compiled = step.compile(state, x)
        seconds = time.perf_counter() - start
    limit = COMPILE_AHEAD_LIMIT_S
    why = f"compiling {compiled} steps took {seconds:.0f} s > {limit:.0f}"
    return {
        "buckets": list(step.buckets(state)),
        "compiled": compiled,
        "compile_seconds": seconds,
        **verdict(seconds <= limit, why),
    }
