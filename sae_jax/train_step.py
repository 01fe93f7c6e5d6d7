"""The jitted training step: loss, decoder-gradient projection, Adam, row renormalisation."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from sae_jax.config import TrainConfig
from sae_jax.losses import loss_and_metrics
from sae_jax.model import SwitchSAE, unit_rows


@struct.dataclass
class TrainState:
    step: jax.Array  # [] int32
    params: nnx.State
    opt_state: Any
    since_fired: jax.Array  # [N, L] int32 training tokens since each latent last fired


def make_optimizer(tcfg: TrainConfig, num_latents: int) -> optax.GradientTransformation:
    """Adam with global-norm clipping; constant LR then linear decay to 0 over the last part."""
    lr = tcfg.learning_rate(num_latents)
    decay_steps = int(round(tcfg.steps * tcfg.decay_fraction))
    hold = tcfg.steps - decay_steps
    schedule = optax.join_schedules(
        [optax.constant_schedule(lr), optax.linear_schedule(lr, 0.0, max(decay_steps, 1))], [hold]
    )
    return optax.chain(optax.clip_by_global_norm(tcfg.grad_clip), optax.adam(schedule))


def init_state(model: SwitchSAE, tx: optax.GradientTransformation) -> TrainState:
    _, params = nnx.split(model)
    cfg = model.cfg
    since = jnp.zeros((cfg.num_experts, cfg.latents_per_expert), jnp.int32)
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), since)


def setup_training(model: SwitchSAE, tcfg: TrainConfig):
    """(graphdef, initial TrainState, jitted step) for a model built under the current mesh;
    the step keeps the state in the layout it was created in."""
    tx = make_optimizer(tcfg, model.cfg.num_latents)
    graphdef, state = nnx.graphdef(model), init_state(model, tx)
    return graphdef, state, make_train_step(graphdef, tx, tcfg, sharding_of(state))


def sharding_of(tree: Any) -> Any:
    """The shardings of a pytree of arrays (same structure)."""
    return jax.tree.map(lambda a: a.sharding, tree)


def project_decoder_grad(grad: jax.Array, w_dec: jax.Array) -> jax.Array:
    """Remove the gradient component parallel to each (unit) decoder row. [N, L, d]."""
    return grad - jnp.sum(grad * w_dec, axis=-1, keepdims=True) * w_dec


def _map_w_dec(fn, tree: nnx.State, *others: nnx.State) -> nnx.State:
    """Apply fn to the w_dec leaf (and the matching leaves of `others`), identity elsewhere."""

    def leaf(path, v, *o):
        names = {getattr(k, "key", getattr(k, "name", None)) for k in path}
        return fn(v, *o) if "w_dec" in names else v

    return jax.tree_util.tree_map_with_path(leaf, tree, *others)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    tcfg: TrainConfig,
    state_sharding: Any = None,
):
    """Returns step(state, x [T, d]) -> (state, metrics); jitted, the state buffers donated.

    `state_sharding` (a pytree of shardings, see `sharding_of`) pins the new state to the
    layout of the old one, so the second step does not recompile for a different layout.
    """

    def loss_fn(params, x, dead):
        out = nnx.merge(graphdef, params)(x, dead)
        loss, metrics = loss_and_metrics(x, out, lb_alpha=tcfg.lb_alpha, aux_weight=tcfg.aux_weight)
        return loss, (metrics, out.fired)

    out_shardings = None
    if state_sharding is not None:
        mesh = jax.tree.leaves(state_sharding)[0].mesh
        out_shardings = (state_sharding, NamedSharding(mesh, PartitionSpec()))

    @functools.partial(jax.jit, donate_argnums=0, out_shardings=out_shardings)
    def step(state: TrainState, x: jax.Array):
        dead = state.since_fired >= tcfg.dead_after_tokens
        grad_fn = jax.grad(loss_fn, has_aux=True)
        # AuxK only costs when some latent is dead; one branch per step, chosen on device.
        grads, (metrics, fired) = jax.lax.cond(
            dead.any(),
            lambda: grad_fn(state.params, x, dead),
            lambda: grad_fn(state.params, x, None),
        )
        grads = _map_w_dec(project_decoder_grad, grads, state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = _map_w_dec(unit_rows, optax.apply_updates(state.params, updates))
        tokens = x.shape[0]
        since = jnp.where(
            fired > 0, 0, jnp.minimum(state.since_fired + tokens, tcfg.dead_after_tokens)
        )
        metrics["dead_fraction"] = jnp.mean(since >= tcfg.dead_after_tokens)
        metrics["grad_norm"] = optax.tree.norm(grads)
        new = TrainState(state.step + 1, params, opt_state, since.astype(jnp.int32))
        return new, metrics

    return step
