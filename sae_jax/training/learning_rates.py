"""Adam with a learning rate per parameter group, all on one warm-up / hold / decay schedule.

Gao et al.'s width rule, LR = BASE_LR / sqrt(M / 2^14), keeps the step of a latent in line
with how often it fires: B x k / M tokens per latent per step for a TopK SAE of M latents, and
the same for a balanced Switch of M latents in all at any experts-per-token e (each token
reaches e x L latents of its experts and keeps k of them, and the experts share the batch).
So the experts take the rule at the width of the whole routed dictionary, NUM_LATENTS, not at
that of one expert; a shared dictionary, which every token reaches, at its own width; the
router its own LR (ROUTER_LR; by default the experts'). A fixed LR applies to every group
unless ROUTER_LR sets the router's.

GROUPS maps each parameter to its group. The scaling acts leaf by leaf on the parameter
names, so it works on any part of the parameter tree: the update applies it one chunk of
expert rows at a time (training/update.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from sae_jax.config import SAEConfig, TrainConfig
from sae_jax.training.update import leaf_names

GROUPS = {
    "w_enc": "experts", "b_enc": "experts", "w_dec": "experts", "enc_scale": "experts",
    "b_dec": "experts",
    "w_router": "router", "b_router": "router",
    "shared_w_enc": "shared", "shared_b_enc": "shared", "shared_w_dec": "shared",
    "log_threshold": "threshold",
}  # fmt: skip


def group_lrs(cfg: SAEConfig, tcfg: TrainConfig) -> dict[str, float]:
    """The peak LR of each parameter group the model has: experts, router (N > 1), shared,
    threshold (JumpReLU's log-thresholds: TrainConfig.threshold_lr, None: the experts')."""
    lrs = {"experts": tcfg.learning_rate(cfg.num_latents)}
    if cfg.kind.learned_threshold:
        lrs["threshold"] = tcfg.threshold_lr or lrs["experts"]
    if cfg.num_experts > 1:
        lrs["router"] = router_lr(tcfg, cfg.num_latents)
    if cfg.shared_latents:
        lrs["shared"] = tcfg.learning_rate(cfg.shared_latents)
    return lrs


def router_lr(tcfg: TrainConfig, num_latents: int) -> float:
    """The router's peak LR: ROUTER_LR, or the experts' (the rule at NUM_LATENTS)."""
    return tcfg.learning_rate(num_latents) if tcfg.router_lr is None else tcfg.router_lr


def router_bias_step(tcfg: TrainConfig, num_latents: int) -> float:
    """How far a routing bias moves per step: ROUTER_BIAS_RATE x the router's peak LR (its
    logits move at the pace of its Adam steps, and the bias has to keep up)."""
    return tcfg.router_bias_rate * router_lr(tcfg, num_latents)


def lr_message(cfg: SAEConfig, tcfg: TrainConfig) -> str:
    """One start-up line: the peak LR of each group and where it comes from."""
    lrs = group_lrs(cfg, tcfg)
    width = {"experts": cfg.num_latents, "shared": cfg.shared_latents}
    rule = "LR" if tcfg.lr is not None else "BASE_LR / sqrt(width / 2^14)"
    parts = []
    for group, lr in lrs.items():
        why = f"{width[group]} latents" if group in width and tcfg.lr is None else ""
        if group == "router":
            why = "ROUTER_LR" if tcfg.router_lr is not None else "the experts'"
        parts.append(f"{group} {lr:.3g}" + (f" ({why})" if why else ""))
    return f"learning rates ({rule}): " + ", ".join(parts)


def schedule(tcfg: TrainConfig, peak: float) -> optax.Schedule:
    """0 -> peak linearly over the first `warmup_fraction` of the steps, held, then linearly
    to 0 over the last `decay_fraction`."""
    warmup_steps = int(round(tcfg.steps * tcfg.warmup_fraction))
    decay_steps = int(round(tcfg.steps * tcfg.decay_fraction))
    hold = tcfg.steps - warmup_steps - decay_steps
    parts = [optax.constant_schedule(peak), optax.linear_schedule(peak, 0.0, max(decay_steps, 1))]
    bounds = [hold]
    if warmup_steps:
        parts.insert(0, optax.linear_schedule(0.0, peak, warmup_steps))
        bounds = [warmup_steps, warmup_steps + hold]
    return optax.join_schedules(parts, bounds)


def group_of(path) -> str:
    """The group (GROUPS) of a parameter leaf, from the names on its pytree path."""
    (group,) = {GROUPS[n] for n in leaf_names(path) if n in GROUPS}
    return group


def scale_by_group_schedule(schedules: dict[str, optax.Schedule]) -> optax.GradientTransformation:
    """optax.scale_by_learning_rate with one schedule per group: each leaf times -schedule of
    its group at the step count (one count for all). Elementwise, and the same numbers as
    optax.adam's last stage when every group has the same schedule."""

    def init_fn(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        del params

        def leaf(path, g):
            return jnp.array(-schedules[group_of(path)](state.count), dtype=g.dtype) * g

        updates = jax.tree_util.tree_map_with_path(leaf, updates)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(cfg: SAEConfig, tcfg: TrainConfig) -> optax.GradientTransformation:
    """Adam at each group's LR (group_lrs) on the run's schedule. The step clips gradients by
    their global norm (`tcfg.grad_clip`) before it (see update.apply_update)."""
    schedules = {group: schedule(tcfg, lr) for group, lr in group_lrs(cfg, tcfg).items()}
    return optax.chain(optax.scale_by_adam(), scale_by_group_schedule(schedules))
