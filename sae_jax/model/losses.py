"""Training loss and the per-batch metrics computed from a forward pass.

Reconstruction is the per-dimension MSE, mean over tokens and d. The load-balancing term
alpha * N * sum_i f_i P_i is added against it (alpha = 3 as in the Switch SAE reference, whose
summed-over-d error with alpha * d is the same objective times d). AuxK is the normalised
error of reconstructing the residual with dead latents, as in Gao et al. The router z-loss
(ST-MoE) z_weight * mean_t logsumexp(router logits_t)^2 is added when z_weight > 0.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sae_jax.kernels.routing import load_balance_loss
from sae_jax.model.switch import SwitchOut


def loss_and_metrics(
    x: jax.Array,
    out: SwitchOut,
    *,
    lb_alpha: float,
    aux_weight: float,
    z_weight: float = 0.0,
    kind: KindLoss | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x: [T, d] input; returns the scalar loss and a dict of scalar/[N] metrics. kind: the
    activation's own terms (None: TopK's, none)."""
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
    extra = {}
    if kind is not None and out.kind_sums is not None:
        kind_loss, extra = kind.terms(out.kind_sums, tokens, d, total_var)
        loss = loss + kind_loss
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
        "batch_threshold": jnp.asarray(out.batch_threshold, jnp.float32),
        **extra,
    }
    return loss, metrics


@dataclasses.dataclass(frozen=True)
class KindLoss:
    """An activation kind's loss terms from SwitchOut.kind_sums (kernels/activations.py),
    chosen by its row in config.KINDS.

    prefixes (Matryoshka): each prefix's squared error per element, summed with the whole
    model's MSE (Bussmann et al. 2025 sum the prefix losses). Otherwise (a learned threshold,
    JumpReLU): l0_coeff x the batch's variance per element x (L0 / l0_target - 1)^2, L0 the
    mean over tokens with JumpReLU's straight-through gradient for the thresholds; scaled by
    the variance, l0_coeff does not depend on the data's scale.
    """

    prefixes: bool
    l0_target: float = 0.0
    l0_coeff: float = 0.0

    def terms(self, sums, tokens, d, total_var):
        if self.prefixes:
            prefix_mse = sums / (tokens * d)
            return jnp.sum(prefix_mse), {"prefix_mse": prefix_mse}
        l0 = sums[0] / tokens
        variance = jax.lax.stop_gradient(total_var) / (tokens * d)
        penalty = self.l0_coeff * variance * (l0 / self.l0_target - 1.0) ** 2
        return penalty, {"l0_penalty": penalty}


def kind_loss(cfg, tcfg) -> KindLoss | None:
    """The KindLoss of a config (SAEConfig, TrainConfig); None for a kind with no loss term
    of its own (TopK, BatchTopK)."""
    kind = cfg.kind
    if not (kind.prefixes or kind.learned_threshold):
        return None
    return KindLoss(kind.prefixes, float(cfg.routed_k), float(tcfg.l0_coeff))
