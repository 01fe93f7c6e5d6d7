"""A configuration that fits a device's memory, found with the analytic estimate.

In order of preference: the smallest 'expert' axis (the most data parallelism) that divides
N and the device count; else a larger N (a power-of-two multiple) over every device; else
the smallest power-of-two multiple of the device count that fits with N >= devices.
"""

from __future__ import annotations

import dataclasses

import jax

from sae_jax import precision
from sae_jax.config import ConfigError, SAEConfig, TrainConfig
from sae_jax.plan import estimate
from sae_jax.plan.estimate import Shapes
from sae_jax.plan.hardware import GPU_WORKSPACE_BYTES

MAX_DEVICES = 1 << 20


def suggest(s: Shapes, memory_bytes: float) -> dict | None:
    """{'mesh_shape', 'num_experts', 'devices', 'estimate_bytes', 'bindings', 'line'} for
    the first candidate whose estimated total fits `memory_bytes`; None if none does."""
    for c in candidates(s):
        total = estimate.memory(c)["total"]
        if total <= memory_bytes:
            return describe(s, c, total)
    return None


def candidates(s: Shapes):
    yield from _meshes(s, s.num_experts, s.devices)
    n = s.num_experts * 2
    while _valid_n(s, n):
        yield from _meshes(s, n, s.devices, largest_only=True)
        n *= 2
    devices = s.devices * 2
    while devices <= MAX_DEVICES and s.batch % devices == 0:
        n = max(s.num_experts, devices)
        if _valid_n(s, n):
            yield from _meshes(s, n, devices, largest_only=True)
        devices *= 2


def _valid_n(s: Shapes, n: int) -> bool:
    return s.num_latents % n == 0 and s.num_latents // n >= s.k


def _meshes(s: Shapes, n: int, devices: int, largest_only: bool = False):
    """Shapes on (devices / E, E) meshes, E dividing n and devices, smallest E first."""
    sizes = [e for e in range(1, devices + 1) if devices % e == 0 and n % e == 0]
    for e in sizes[-1:] if largest_only else sizes:
        yield dataclasses.replace(s, num_experts=n, data=devices // e, expert=e)


def describe(s: Shapes, c: Shapes, total: int) -> dict:
    bindings = [f"MESH_SHAPE=({c.data}, {c.expert})"]
    if c.num_experts != s.num_experts:
        bindings.append(f"NUM_EXPERTS={c.num_experts}")
    where = f"on {c.devices} devices" + (" (more devices)" if c.devices != s.devices else "")
    line = (f"use {' '.join('--gin.' + b for b in bindings)} {where}: "
            f"estimated {total / 2**30:.1f} GiB per device")  # fmt: skip
    return {
        "mesh_shape": [c.data, c.expert],
        "num_experts": c.num_experts,
        "devices": c.devices,
        "estimate_bytes": total,
        "bindings": bindings,
        "line": line,
    }


def device_memory_bytes() -> int | None:
    """Memory this process's first device can give the step's buffers (None on CPU): XLA's
    pool as JAX reports it (`bytes_limit`: on GPU the preallocated fraction of the card, on
    TPU what its runtime leaves), on GPU less the workspaces XLA:GPU takes from that pool
    (hardware.GPU_WORKSPACE_BYTES, an estimate)."""
    device = jax.local_devices()[0]
    stats = device.memory_stats()
    if not stats or "bytes_limit" not in stats:
        return None
    held = GPU_WORKSPACE_BYTES if device.platform == "gpu" else 0
    return int(stats["bytes_limit"] - held)


def check_fits(cfg: SAEConfig, tcfg: TrainConfig, mesh_shape: tuple[int, int],
               memory_bytes: float) -> None:  # fmt: skip
    """A one-line ConfigError, naming a MESH_SHAPE (and N) that would fit, when the analytic
    estimate of the step's memory per device exceeds `memory_bytes`."""
    cfg = dataclasses.replace(cfg, compute_dtype=precision.resolve(cfg.compute_dtype))
    s = Shapes.of(cfg, tcfg, mesh_shape, jax.default_backend())
    need = estimate.memory(s)["total"]
    if need <= memory_bytes:
        return
    hint = suggest(s, memory_bytes)
    raise ConfigError(
        f"MESH_SHAPE={tuple(mesh_shape)} needs about {need / 2**30:.1f} GiB per device "
        f"(estimate), the devices have {memory_bytes / 2**30:.1f} GiB; "
        + (hint["line"] if hint else "no mesh fits: see python -m launch.plan")
    )
