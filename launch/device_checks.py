"""The checks of `python -m launch.devcheck`: what only the hardware can answer.

Each check returns a dict with `status` ('pass', 'fail' or 'skip'), a `reason` where it is not
a pass, and what it measured. On CPU the checks CPU can run run at small sizes; the rest are
skipped with the reason. Times are meaningful on an accelerator only.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from launch.bench import time_step
from sae_jax import precision
from sae_jax.config import SAEConfig, TrainConfig
from sae_jax.dispatch import exchange
from sae_jax.mesh import AXES, make_mesh
from sae_jax.model.losses import loss_and_metrics
from sae_jax.model.switch import SwitchSAE


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The shapes the checks run at: small on CPU, a few seconds of work on a GPU or TPU."""

    d: int
    num_latents: int
    num_experts: int
    batch: int
    steps: int  # timed steps per measured step function

    @classmethod
    def for_backend(cls, backend: str) -> Sizes:
        if backend == "cpu":
            return cls(d=32, num_latents=512, num_experts=4, batch=256, steps=1)
        return cls(d=1024, num_latents=65536, num_experts=16, batch=16384, steps=10)


Check = Callable[[Sizes], dict]


def skip(reason: str) -> dict:
    return {"status": "skip", "reason": reason}


def _verdict(ok: bool, reason: str) -> dict:
    return {"status": "pass"} if ok else {"status": "fail", "reason": reason}


def ragged_all_to_all(sz: Sizes) -> dict:
    """The real `jax.lax.ragged_all_to_all` against the CPU emulation (exchange.py) on the
    same rows, a trip out to random destinations and back, over every device on 'expert'."""
    if jax.default_backend() == "cpu":
        return skip(
            "XLA:CPU does not implement ragged_all_to_all; the emulation is tested against a "
            "numpy model of the op in tests/test_ragged.py"
        )
    mesh = make_mesh((1, -1))
    devices = mesh.shape["expert"]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(devices * 256, sz.d)).astype(np.float32)
    dest = rng.integers(0, devices, devices * 256).astype(np.int32)
    spec = PartitionSpec(AXES)
    results = {}
    for emulate in (False, True):
        fn = jax.shard_map(lambda x, dest, emulate=emulate: _trip(x, dest, emulate), mesh=mesh,
                           in_specs=(spec, spec), out_specs=(spec, spec))  # fmt: skip
        results[emulate] = jax.device_get(jax.jit(fn)(x, dest))
    equal = all(np.array_equal(a, b) for a, b in zip(results[False], results[True], strict=True))
    back_ok = np.array_equal(results[False][1], x)
    return {
        "devices": devices,
        **_verdict(equal and back_ok, "the real op's rows differ from the emulation's"),
    }


def _trip(x: jax.Array, dest: jax.Array, emulate: bool) -> tuple[jax.Array, jax.Array]:
    """Per device: rows x [T_local, d] sent to devices dest [T_local] and returned: (the
    received buffer [E x T_local, d], the rows back in their original order [T_local, d])."""
    e, t = jax.lax.axis_size("expert"), x.shape[0]
    order, sizes = exchange.sort_by_destination(dest, e)
    out, back = exchange.plan_exchange(sizes, "expert")
    received = exchange.ragged_exchange(
        x[order], out, "expert", exchange.max_received_rows(e, t), emulate=emulate
    )
    returned = exchange.ragged_exchange(received, back, "expert", t, emulate=emulate)
    return received, jnp.zeros_like(returned).at[order].set(returned)


def ragged_dot_vs_blocks(sz: Sizes) -> dict:
    """The dropless ragged_dot path against the block path on one device, in bfloat16:
    loss and gradients (relative to the largest), and the training step's time of each."""
    base = SAEConfig(d=sz.d, num_latents=sz.num_latents, num_experts=sz.num_experts, k=32,
                     dispatch="dropless", compute_dtype="bfloat16",
                     expert_kernel="dense").validate()  # fmt: skip
    x = np.random.default_rng(1).normal(size=(sz.batch, sz.d)).astype(np.float32)
    runs = {}
    for matmul in ("ragged_dot", "blocks"):
        cfg = dataclasses.replace(base, grouped_matmul=matmul)
        runs[matmul] = (_loss_and_grads(cfg, x), _step_seconds(cfg, sz))
    (loss, grads), ragged_s = runs["ragged_dot"]
    (ref_loss, ref_grads), blocks_s = runs["blocks"]
    loss_err = abs(loss - ref_loss) / abs(ref_loss)
    grad_err = max(
        float(np.max(np.abs(grads[k] - ref_grads[k])) / (np.max(np.abs(ref_grads[k])) or 1.0))
        for k in ("w_enc", "w_dec", "b_enc", "b_dec")
    )  # fmt: skip
    ok = loss_err < 1e-2 and grad_err < 3e-2
    return {
        "loss_rel_err": loss_err,
        "grad_rel_err": grad_err,
        "ragged_dot_step_ms": 1e3 * ragged_s,
        "blocks_step_ms": 1e3 * blocks_s,
        "faster": "ragged_dot" if ragged_s < blocks_s else "blocks",
        **_verdict(ok, f"loss off by {loss_err:.1e}, gradients by {grad_err:.1e} (relative)"),
    }


def _loss_and_grads(cfg: SAEConfig, x: np.ndarray) -> tuple[float, dict]:
    """The training loss (MSE + LB) and its parameter gradients, as numpy, on one device."""
    with jax.set_mesh(make_mesh((1, 1))):
        graphdef, params, rest = nnx.split(SwitchSAE(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)

        def loss(params):
            out = nnx.merge(graphdef, params, rest)(x)
            return loss_and_metrics(x, out, lb_alpha=3.0, aux_weight=0.0)[0]

        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        return float(value), {k: np.asarray(v) for k, v in nnx.to_pure_dict(grads).items()}


def _step_seconds(cfg: SAEConfig, sz: Sizes, mesh_shape=(1, 1)) -> float:
    return time_step(cfg, sz.batch, sz.steps, mesh_shape)[0]


def plan_memory(dispatch: str) -> Check:
    """The compiled training step's memory per device against the planner's estimate, the
    experts split over as many devices as divide N."""

    def check(sz: Sizes) -> dict:
        from sae_jax.plan import report

        dtype = precision.resolve("auto")
        cfg = SAEConfig(d=sz.d, num_latents=sz.num_latents, num_experts=sz.num_experts, k=32,
                        dispatch=dispatch, compute_dtype=dtype).validate()  # fmt: skip
        experts_axis = math.gcd(jax.device_count(), sz.num_experts)
        tcfg = TrainConfig(steps=1000, batch_size=sz.batch, mesh_shape=(1, experts_axis))
        memory = report.measure(cfg, tcfg)["memory"]
        compiled = memory["compiled"]["total_bytes"]
        estimate = memory["estimate"]["total_bytes"]
        ratio = estimate / compiled
        return {
            "compiled_mib": compiled / 2**20,
            "estimate_mib": estimate / 2**20,
            "estimate_over_compiled": ratio,
            **_verdict(0.8 <= ratio <= 1.25, f"the estimate is {ratio:.2f}x the compiled step"),
        }

    return check


def bench(sz: Sizes) -> dict:
    """A short `launch.bench`: the TopK step (N = 1) and the Switch step (N experts) on one
    device, tokens/s of each."""
    speeds = {}
    for n in (1, sz.num_experts):
        cfg = SAEConfig(d=sz.d, num_latents=sz.num_latents, num_experts=n, k=32).validate()
        speeds[n] = sz.batch / _step_seconds(cfg, sz)
    ok = all(np.isfinite(v) and v > 0 for v in speeds.values())
    return {
        "topk_tokens_per_sec": speeds[1],
        "switch_tokens_per_sec": speeds[sz.num_experts],
        "switch_over_topk": speeds[sz.num_experts] / speeds[1],
        **_verdict(ok, "a step did not run"),
    }


CHECKS: dict[str, Check] = {
    "ragged_all_to_all": ragged_all_to_all,
    "ragged_dot_vs_blocks": ragged_dot_vs_blocks,
    "plan_memory_capacity": plan_memory("capacity"),
    "plan_memory_dropless": plan_memory("dropless"),
    "bench": bench,
}


def run_checks(names: list[str] | None = None, sizes: Sizes | None = None) -> dict:
    """Runs the checks (default all) and returns the report: backend, device, sizes, checks."""
    sz = sizes or Sizes.for_backend(jax.default_backend())
    checks = []
    for name in names or list(CHECKS):
        start = time.perf_counter()
        try:
            result = CHECKS[name](sz)
        except Exception as e:  # noqa: BLE001 - a failing check is a result, not a crash
            result = {"status": "fail", "reason": f"{type(e).__name__}: {e}".splitlines()[0]}
        checks.append({"name": name, **result, "seconds": time.perf_counter() - start})
    return {
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "devices": jax.device_count(),
        "jax": jax.__version__,
        "sizes": dataclasses.asdict(sz),
        "checks": checks,
    }
