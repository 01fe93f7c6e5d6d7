"""Held-out evaluation and planted-feature recovery."""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sae_jax.evaluation.recovery import feature_recovery
from sae_jax.model.losses import loss_and_metrics


def make_eval_step(
    graphdef: nnx.GraphDef, capacity_factor: float, lb_alpha: float, aux_w: float, z_w: float = 0.0
):
    @jax.jit
    def eval_step(params: nnx.State, x: jax.Array, keep: jax.Array) -> dict[str, jax.Array]:
        """x: [T, d]; keep: [T] float, 0 for outlier tokens (left out of the "kept" sums)."""
        x = x.astype(jnp.float32)  # float16 / bfloat16 shards arrive in their own dtype
        model = nnx.merge(graphdef, params)
        out = model(x, None, capacity_factor, mode="infer")
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
