"""The real training and eval steps of a config, compiled from abstract shapes (nothing is
allocated), with XLA's per-device memory analysis and cost analysis."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any

import gin
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from sae_jax import precision, storage
from sae_jax.config import ConfigError, SAEConfig, TrainConfig
from sae_jax.data.shards import MANIFEST
from sae_jax.evaluation.held_out import make_eval_step
from sae_jax.kernels.auxk import max_bucket
from sae_jax.mesh import TOKENS
from sae_jax.model.switch import SwitchSAE, check_mesh
from sae_jax.plan import loops
from sae_jax.training.step import make_optimizer, make_train_step, new_state, state_sharding

STEPS = ("train", "train_auxk", "eval")


def abstract_state(cfg: SAEConfig, tcfg: TrainConfig, mesh: jax.sharding.Mesh):
    """(graphdef, optimizer, state of ShapeDtypeStructs carrying their shardings, shardings)."""
    model = nnx.eval_shape(lambda: SwitchSAE(cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model)
    tx = make_optimizer(cfg, tcfg)
    abstract = jax.eval_shape(functools.partial(new_state, tx=tx), params)
    shardings = state_sharding(abstract, mesh)
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return graphdef, tx, state, shardings


def state_bytes(cfg: SAEConfig, tcfg: TrainConfig, mesh: jax.sharding.Mesh) -> int:
    """Bytes per device of the training state's shards (parameters, optimizer state, counters):
    the training step's arguments less its batch."""
    with jax.set_mesh(mesh):
        state = abstract_state(cfg, tcfg, mesh)[2]
    return sum(
        math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
        for a in jax.tree.leaves(state)
    )


def compile_steps(
    cfg: SAEConfig,
    tcfg: TrainConfig,
    mesh: jax.sharding.Mesh,
    dump_root: Path | None = None,
    names: tuple[str, ...] = STEPS,
) -> dict[str, Any]:
    """The compiled steps by name (`names`, of STEPS): training without and with AuxK, and
    evaluation. With `dump_root`, XLA writes each module's dumps (memory-usage report, buffer
    assignment) into dump_root/<name>/."""
    check_mesh(cfg, dict(mesh.shape), tcfg.batch_size)
    with jax.set_mesh(mesh):
        graphdef, tx, state, shardings = abstract_state(cfg, tcfg, mesh)
        tokens = NamedSharding(mesh, TOKENS)
        x = jax.ShapeDtypeStruct((tcfg.batch_size, cfg.d), jnp.float32, sharding=tokens)
        keep = jax.ShapeDtypeStruct((tcfg.batch_size,), jnp.float32, sharding=tokens)
        eval_step = make_eval_step(
            graphdef, cfg.eval_capacity_factor, tcfg.lb_alpha, tcfg.aux_weight,
            tcfg.router_z_weight,
        )  # fmt: skip
        # AuxK at the largest bucket training can use (TrainConfig.aux_max_share)
        bucket = max_bucket(cfg.latents_per_expert, tcfg.aux_max_share)
        train = functools.partial(make_train_step, graphdef, tx, tcfg, shardings)
        lower = {
            "train": lambda: train(auxk=False).lower(state, x),
            "train_auxk": lambda: train(auxk=True, aux_bucket=bucket).lower(state, x),
            "eval": lambda: eval_step.lower(state.params, x, keep),
        }
        return {name: lower[name]().compile(_options(dump_root, name)) for name in names}


def _options(dump_root: Path | None, name: str) -> dict | None:
    return None if dump_root is None else {"xla_dump_to": str(Path(dump_root) / name)}


def memory(compiled) -> dict[str, int]:
    """XLA's per-device memory analysis; total = arguments + outputs + temporaries - aliased."""
    m = compiled.memory_analysis()
    out = {
        "arguments": int(m.argument_size_in_bytes),
        "outputs": int(m.output_size_in_bytes),
        "temporaries": int(m.temp_size_in_bytes),
        "aliased": int(m.alias_size_in_bytes),
    }
    out["total_bytes"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
    return out


def cost(compiled) -> dict:
    """Per-device FLOPs and bytes accessed of a compiled step, each while loop's body counted
    once per trip (sae_jax/plan/loops.py), beside XLA's own cost analysis, which counts each
    body once (`flops_xla`, `bytes_xla`). `loops`: the loops with their trip counts;
    `unknown_trip_loops`: loops XLA proved no trip count for (counted once: the FLOPs are then
    a lower bound). Where the HLO cannot be costed per loop, XLA's figures and `loops_counted`
    False. 0 where the backend reports no costs."""
    xla = _xla_cost(compiled)
    out = {"flops": xla["flops"], "bytes_accessed": xla["bytes_accessed"],
           "flops_xla": xla["flops"], "bytes_xla": xla["bytes_accessed"],
           "loops": [], "unknown_trip_loops": [], "loops_counted": False}  # fmt: skip
    try:
        c = loops.loop_cost(compiled.as_text())
    except Exception:  # noqa: BLE001 - private XLA API or unparsable text: XLA's figures
        return out
    out.update(flops=c.flops, bytes_accessed=c.bytes_accessed, loops=c.loops,
               unknown_trip_loops=c.unknown, loops_counted=True)  # fmt: skip
    return out


def _xla_cost(compiled) -> dict[str, float]:
    try:
        c = compiled.cost_analysis()
        c = c[0] if isinstance(c, list | tuple) else c
    except Exception:  # noqa: BLE001 - not every backend reports costs
        c = {}
    return {
        "flops": float(c.get("flops", 0.0)),
        "bytes_accessed": float(c.get("bytes accessed", 0.0)),
    }


def for_hardware(cfg: SAEConfig, hw, d: int) -> SAEConfig:
    """The config as it would run on `hw` (a plan.hardware.Hardware), input dimension d:
    COMPUTE_DTYPE 'auto' resolves to that hardware's choice, not this CPU's."""
    backend = "cpu" if hw.name == "cpu" else "accelerator"
    dtype = precision.resolve(cfg.compute_dtype, backend)
    return dataclasses.replace(cfg, d=d, compute_dtype=dtype).validate()


def input_dim(tcfg: TrainConfig, override: int | None = None) -> int:
    """d: `override`, else SyntheticData.dim for synthetic data, else the shard manifest's d
    (read from the manifest only; the shards are not opened)."""
    if override:
        return int(override)
    if tcfg.train_data == "synthetic":
        return int(_gin_value("SyntheticData.dim", 64))
    path = storage.path(tcfg.train_data) / MANIFEST
    try:
        return int(json.loads(path.read_text())["d"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        msg = f"TRAIN_DATA={tcfg.train_data!r}: cannot read d from {path} ({e})"
        raise ConfigError(msg) from None


def _gin_value(name: str, default: Any) -> Any:
    """A gin parameter's value with macros (%NAME) resolved; `default` when unbound."""
    try:
        value = gin.query_parameter(name)
    except ValueError:
        return default
    while isinstance(value, gin.config.ConfigurableReference):
        value = gin.query_parameter(str(value))  # '%MACRO'
    return value
