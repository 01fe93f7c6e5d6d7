"""The checks of `python -m launch.devcheck`: what only the hardware can answer.

Each check returns a dict with `status` ('pass', 'fail' or 'skip'), a `reason` where it is not
a pass, and what it measured; the rules are in docs/devcheck.md. On CPU the checks CPU can run
run at small sizes; the rest are skipped with the reason (NAMED_ON_CPU: run on CPU only when
named). Times are meaningful on an accelerator only. The checks that train are in
launch/training_checks.py, the exchange's model in launch/exchange_check.py, the dense-lowering
detector in launch/ragged_dot_lowering.py.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from launch import exchange_check, training_checks
from launch import ragged_dot_lowering as dot_lowering
from launch.bench import time_step
from launch.training_checks import skip, verdict
from sae_jax import precision
from sae_jax.config import SAEConfig, TrainConfig
from sae_jax.dispatch import exchange
from sae_jax.mesh import make_mesh
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
EXCHANGE_ROWS = 256  # rows per device of the ragged_all_to_all check


def exchange_skip_reason(backend: str, expert_devices: int) -> str | None:
    """Why the ragged_all_to_all check cannot run here, or None."""
    if expert_devices < 2:
        return (f"needs >= 2 devices on the 'expert' axis ({expert_devices} here): with one, "
                "ragged_all_to_all moves nothing between devices")  # fmt: skip
    if backend == "cpu":
        return ("XLA:CPU does not implement ragged_all_to_all; the emulation is tested "
                "against a numpy model of the op (values and gradients) in "
                "tests/test_devcheck.py and tests/test_ragged.py")  # fmt: skip
    return None


def ragged_all_to_all(sz: Sizes) -> dict:
    """The real `jax.lax.ragged_all_to_all`, and the emulation (exchange.py), against a numpy
    model of the op (launch/exchange_check.py), a trip out and back over every device on
    'expert': values and gradients exactly equal, float32, bfloat16 and int32 (values only)
    payloads, random destinations and all rows to one device (its receive buffer full)."""
    expert_devices = jax.device_count()
    reason = exchange_skip_reason(jax.default_backend(), expert_devices)
    if reason:
        return skip(reason)
    mesh = make_mesh((1, -1))
    real = exchange_check.compare(mesh, jax.lax.ragged_all_to_all, EXCHANGE_ROWS, sz.d)
    emulated = exchange_check.compare(mesh, exchange.ragged_all_to_all_emulated,
                                      EXCHANGE_ROWS, sz.d)  # fmt: skip
    return {
        "devices": expert_devices,
        "real_failures": real,
        "emulation_failures": emulated,
        **verdict(not real, f"the real op differs from the model in {sorted(real)}"),
    }


def ragged_dot_lowering(sz: Sizes) -> dict:
    """Whether the backend lowers `jax.lax.ragged_dot` densely (launch/ragged_dot_lowering.py:
    the compiled FLOPs against the ragged and the dense count), forward and gradient, at the
    dropless experts' shapes (the batch's rows, N groups of [d, L/N]) in bfloat16. Dense or
    unknown is a fail on GPU/TPU; on CPU, which is known to lower it densely and is not the
    target, a skip that says what the detector found."""
    n = sz.num_experts
    found = dot_lowering.measure(sz.batch, sz.d, sz.num_latents // n, n)
    said = ", ".join(_ratio(name, found[name]) for name in dot_lowering.PRODUCTS) + f"; N = {n}"
    backend = jax.default_backend()
    if backend == "cpu":
        finding = f"XLA:CPU's lowering: {found['lowering']} ({said})"
        return {**found, **skip(f"CPU is not the target; {finding}")}
    return {**found, **lowering_verdict(found["lowering"], backend, said)}


def _ratio(name: str, found: dict) -> str:
    ratio = found["over_ragged"]
    return f"{name} {ratio:.1f}x the ragged FLOPs" if ratio else f"{name} not counted"


def lowering_verdict(lowering: str, backend: str, said: str) -> dict:
    """Pass for a ragged lowering; a dense (or uncounted) one fails, with what it costs."""
    if lowering == "ragged":
        return verdict(True, "")
    if lowering == "unknown":
        return verdict(False, f"XLA:{backend.upper()} gave no FLOP count for ragged_dot")
    cost = "grouped_matmul='ragged_dot' does N times the experts' work"
    return verdict(False, f"XLA:{backend.upper()} lowers ragged_dot densely ({said}): {cost}")


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
        **verdict(ok, f"loss off by {loss_err:.1e}, gradients by {grad_err:.1e} (relative)"),
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
            **verdict(0.8 <= ratio <= 1.25, f"the estimate is {ratio:.2f}x the compiled step"),
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
        **verdict(ok, "a step did not run"),
    }


CHECKS: dict[str, Check] = {
    "peak_memory": training_checks.peak_memory,  # first: nothing else has raised the peak
    "ragged_all_to_all": ragged_all_to_all,
    "ragged_dot_lowering": ragged_dot_lowering,
    "ragged_dot_vs_blocks": ragged_dot_vs_blocks,
    "plan_memory_capacity": plan_memory("capacity"),
    "plan_memory_dropless": plan_memory("dropless"),
    "top2_step": training_checks.top2_step,
    "zero1": training_checks.zero1,
    "auxk_compile_ahead": training_checks.auxk_compile_ahead,
    "default_fvu": training_checks.default_fvu,
    "bench": bench,
}
# Checks that run on CPU only when named (--checks): why they are skipped otherwise.
NAMED_ON_CPU = {
    "auxk_compile_ahead": "XLA:CPU's compile time is not the device's; name it in --checks "
    "to time it here",
    "default_fvu": "a full default.gin run (minutes on CPU; ~1 minute on a GPU); name it in "
    "--checks to run it here",
}


def run_checks(names: list[str] | None = None, sizes: Sizes | None = None) -> dict:
    """Runs the checks (default all) and returns the report: backend, device, sizes, checks.
    On CPU the NAMED_ON_CPU checks run only when `names` names them."""
    backend = jax.default_backend()
    sz = sizes or Sizes.for_backend(backend)
    checks = []
    for name in names or list(CHECKS):
        start = time.perf_counter()
        try:
            if backend == "cpu" and name in NAMED_ON_CPU and names is None:
                result = skip(NAMED_ON_CPU[name])
            else:
                result = CHECKS[name](sz)
        except Exception as e:  # noqa: BLE001 - a failing check is a result, not a crash
            result = {"status": "fail", "reason": f"{type(e).__name__}: {e}".splitlines()[0]}
        checks.append({"name": name, **result, "seconds": time.perf_counter() - start})
    return {
        "backend": backend,
        "device": str(jax.devices()[0].device_kind),
        "devices": jax.device_count(),
        "jax": jax.__version__,
        "sizes": dataclasses.asdict(sz),
        "checks": checks,
    }
