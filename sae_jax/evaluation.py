"""Held-out evaluation and planted-feature recovery."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sae_jax.losses import loss_and_metrics


def feature_recovery(features: jax.Array, w_dec: jax.Array, threshold: float = 0.9) -> float:
    """Fraction of planted features [F, d] whose best decoder row (of any expert) has cosine
    similarity > threshold. w_dec: [N, L, d] unit rows."""
    rows = w_dec.reshape(-1, w_dec.shape[-1])
    feats = features / jnp.linalg.norm(features, axis=-1, keepdims=True)
    best = jnp.max(feats @ rows.T, axis=-1)
    return float(jnp.mean(best > threshold))


def make_eval_step(graphdef: nnx.GraphDef, capacity_factor: float, lb_alpha: float, aux_w: float):
    @jax.jit
    def eval_step(params: nnx.State, x: jax.Array) -> dict[str, jax.Array]:
        model = nnx.merge(graphdef, params)
        out = model(x, None, capacity_factor)
        _, metrics = loss_and_metrics(x, out, lb_alpha=lb_alpha, aux_weight=aux_w)
        metrics["sq_err"] = jnp.sum((x - out.x_hat) ** 2)
        metrics["sum_x"] = x.sum(0)
        metrics["sum_x2"] = jnp.sum(x**2)
        return metrics

    return eval_step


def evaluate(
    eval_step, params: nnx.State, batch_fn, *, tokens: int, batch_size: int, features=None
) -> dict:
    """Mean metrics over `tokens` held-out tokens from batch_fn(i) -> [batch_size, d]; FVU uses
    the pooled variance of all of them. `features`: planted [F, d] directions, if known."""
    batches = max(1, tokens // batch_size)
    parts = [jax.device_get(eval_step(params, batch_fn(i))) for i in range(batches)]
    n = batches * batch_size
    result = {}
    for name in ("loss", "mse", "l0", "lb_loss", "drop_fraction", "expert_load"):
        result[name] = np.mean([p[name] for p in parts], axis=0)
    sum_x = np.sum([p["sum_x"] for p in parts], axis=0)
    total_var = np.sum([p["sum_x2"] for p in parts]) - np.sum(sum_x**2) / n
    result["fvu"] = np.sum([p["sq_err"] for p in parts]) / max(total_var, 1e-12)
    if features is not None:
        result["feature_recovery"] = feature_recovery(features, params["w_dec"][...])
    return {f"eval/{k}": v for k, v in result.items()}
