"""Training loss and the per-batch metrics computed from a forward pass.

Reconstruction is the per-dimension MSE, mean over tokens and d. The load-balancing term
alpha * N * sum_i f_i P_i is added against it (alpha = 3 as in the Switch SAE reference, whose
summed-over-d error with alpha * d is the same objective times d). AuxK is the normalised
error of reconstructing the residual with dead latents, as in Gao et al. The router z-loss
(ST-MoE) z_weight * mean_t logsumexp(router logits_t)^2 is added when z_weight > 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sae_jax.kernels.routing import load_balance_loss
from sae_jax.model.switch import SwitchOut


def loss_and_metrics(
    x: jax.Array, out: SwitchOut, *, lb_alpha: float, aux_weight: float, z_weight: float = 0.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x: [T, d] input; returns the scalar loss and a dict of scalar/[N] metrics."""
    tokens, d = x.shape
    n = out.expert_counts.shape[0]
    x = x.astype(jnp.float32)
    sq_err = jnp.sum((x - out.x_hat) ** 2)
    mse = sq_err / (tokens * d)
    total_var = jnp.sum((x - x.mean(axis=0)) ** 2)
    lb = load_balance_loss(out.expert_counts, out.prob_sums, tokens)
    aux = jnp.where(out.aux_norm > 0, out.aux_err / jnp.maximum(out.aux_norm, 1e-12), 0.0)
    loss = mse + aux_weight * aux
    z = out.z_sum / tokens
    if n > 1:
        loss = loss + lb_alpha * lb
    if n > 1 and z_weight > 0:
        loss = loss + z_weight * z
    metrics = {
        "loss": loss,
        "mse": mse,
        "fvu": sq_err / jnp.maximum(total_var, 1e-12),
        "l0": out.l0_sum / tokens,
        "lb_loss": lb,
        "aux_loss": aux,
        "router_z_loss": z,
        # the mean of the dropped, not 1 - mean(kept): never a negative rounding error
        "drop_fraction": jnp.mean(jnp.logical_not(out.kept).astype(jnp.float32)),
        "padding_overhead": out.rows / tokens,  # rows computed per token (capacity / blocks)
        "expert_load": out.expert_counts / tokens,
    }
    return loss, metrics
