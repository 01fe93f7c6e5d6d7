"""Held-out evaluation and planted-feature recovery."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from sae_jax.model.losses import loss_and_metrics
from sae_jax.varying import vary, varying_axes


def feature_recovery(features: jax.Array, w_dec: jax.Array, threshold: float = 0.9) -> float:
    """Fraction of planted features [F, d] whose best decoder row (of any expert) has cosine
    similarity > threshold. w_dec: [N, L, d] unit rows, numpy or JAX, sharded or not."""
    return float(jnp.mean(best_cosines(features, w_dec) > threshold))


def best_cosines(features: jax.Array, w_dec: jax.Array) -> jax.Array:
    """[F]: each planted feature's largest cosine with a decoder row ([N, L, d] unit rows).

    A running max over the experts of [F, L] products, so the [F, N x L] matrix (4 TiB on
    pod.gin's eval) is never built. A w_dec sharded over mesh axes is read where it lies: each
    device takes the max over its own experts and rows, then a pmax over those axes; nothing
    expert-sized moves between devices.
    """
    return best_cosines_program(w_dec)(features, w_dec)


def best_cosines_program(w_dec: jax.Array) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The jitted (features, w_dec) -> [F] program `best_cosines` runs for w_dec's layout:
    under `jax.shard_map` when w_dec is sharded over a mesh (a concrete array's sharding;
    inside a caller's jit a traced w_dec has none, and the plain scan runs)."""
    sharding = getattr(w_dec, "sharding", None)
    if isinstance(sharding, NamedSharding) and any(sharding.spec):
        return _sharded_best(sharding.mesh, _spec3(sharding.spec))
    return _best


def _local_best(features: jax.Array, w_dec: jax.Array, sum_axes: tuple = ()) -> jax.Array:
    """[F] max over w_dec's [N, L, d] rows of the cosines, one expert's [F, L] at a time;
    sum_axes: the mesh axes d is split over (partial dot products are summed over them)."""
    if sum_axes:  # the norm of the whole feature, not of this device's share of d
        norm = jax.lax.psum(jnp.sum(features * features, axis=-1, keepdims=True), sum_axes)
        feats = features / jnp.sqrt(norm)
    else:
        feats = features / jnp.linalg.norm(features, axis=-1, keepdims=True)

    def expert(best, rows):
        cos = feats @ rows.T  # [F, L]
        if sum_axes:
            cos = jax.lax.psum(cos, sum_axes)
        return jnp.maximum(best, jnp.max(cos, axis=-1)), None

    carry_axes = set(varying_axes(w_dec)) - set(sum_axes)  # the max's mesh type in the loop
    init = vary(jnp.full(features.shape[:1], -jnp.inf, feats.dtype), carry_axes)
    return jax.lax.scan(expert, init, w_dec)[0]


_best = jax.jit(_local_best)


def _spec3(spec: PartitionSpec) -> tuple:
    return tuple(spec) + (None,) * (3 - len(spec))


def _axes(entry) -> tuple:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


@functools.cache
def _sharded_best(mesh: jax.sharding.Mesh, spec: tuple):
    """`_local_best` on each device's block of a w_dec laid out as `spec` on `mesh`."""
    max_axes, sum_axes = _axes(spec[0]) + _axes(spec[1]), _axes(spec[2])

    def local(features, w_dec):
        best = _local_best(features, w_dec, sum_axes)
        return jax.lax.pmax(best, max_axes) if max_axes else best

    in_specs = (PartitionSpec(None, spec[2]), PartitionSpec(*spec))
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=PartitionSpec()))


def make_eval_step(
    graphdef: nnx.GraphDef, capacity_factor: float, lb_alpha: float, aux_w: float, z_w: float = 0.0
):
    @jax.jit
    def eval_step(params: nnx.State, x: jax.Array, keep: jax.Array) -> dict[str, jax.Array]:
        """x: [T, d]; keep: [T] float, 0 for outlier tokens (left out of the "kept" sums)."""
        x = x.astype(jnp.float32)  # float16 / bfloat16 shards arrive in their own dtype
        model = nnx.merge(graphdef, params)
        out = model(x, None, capacity_factor)
        _, metrics = loss_and_metrics(x, out, lb_alpha=lb_alpha, aux_weight=aux_w, z_weight=z_w)
        sq_err = jnp.sum((x - out.x_hat) ** 2, axis=-1)
        for suffix, w in (("", keep), ("_all", jnp.ones_like(keep))):
            metrics["n" + suffix] = jnp.sum(w)
            metrics["sq_err" + suffix] = jnp.sum(w * sq_err)
            metrics["sum_x" + suffix] = w @ x
            metrics["sum_x2" + suffix] = jnp.sum(w * jnp.sum(x**2, axis=-1))
        return metrics

    return eval_step


def fvu_from_sums(sq_err: float, sum_x2: float, sum_x: np.ndarray, n: float) -> float:
    """FVU from running sums over n tokens: squared error / sum ||x - mean||^2."""
    total_var = float(sum_x2) - float(np.sum(np.square(sum_x))) / max(n, 1)
    return float(sq_err / max(total_var, 1e-12))


def pooled_fvu(parts: list[dict], suffix: str) -> float:
    """Squared error over the pooled variance of all evaluated tokens."""
    return fvu_from_sums(
        np.sum([p["sq_err" + suffix] for p in parts]),
        np.sum([p["sum_x2" + suffix] for p in parts]),
        np.sum([p["sum_x" + suffix] for p in parts], axis=0),
        sum(p["n" + suffix] for p in parts),
    )


def evaluate(
    eval_step, params: nnx.State, batches: Iterable, *, outliers: bool = False, features=None
) -> dict:
    """Metrics over held-out batches of (x [T, d], keep [T] float). FVU and MSE leave out
    tokens with keep = 0 (outliers); `outliers=True` also reports FVU with them.
    `features`: planted [F, d] directions, if known."""
    parts = [jax.device_get(eval_step(params, x, keep)) for x, keep in batches]
    result = {}
    for name in ("loss", "l0", "lb_loss", "router_z_loss", "drop_fraction", "padding_overhead",
                 "expert_load"):  # fmt: skip
        result[name] = np.mean([p[name] for p in parts], axis=0)
    d = parts[0]["sum_x"].shape[-1]
    result["mse"] = np.sum([p["sq_err"] for p in parts]) / max(sum(p["n"] for p in parts) * d, 1)
    result["fvu"] = pooled_fvu(parts, "")
    if outliers:
        result["fvu_with_outliers"] = pooled_fvu(parts, "_all")
        result["outlier_fraction"] = 1 - sum(p["n"] for p in parts) / sum(p["n_all"] for p in parts)
    if features is not None:
        result["feature_recovery"] = feature_recovery(features, params["w_dec"][...])
    return {f"eval/{k}": v for k, v in result.items()}
