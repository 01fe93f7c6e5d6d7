"""The jitted training step: loss, decoder-gradient projection, Adam, row renormalisation.

One step without AuxK, and one per dead-latent bucket with it (kernels.auxk.dead_buckets: AuxK
runs on each expert's dead latents compacted to B ids, so its cost follows B). Which one runs
is chosen on the host from the dead-latent count (the most in one expert) that the step
`DEAD_COUNT_LAG` steps earlier returned. That count's copy to the host starts as soon as its
step is dispatched (`copy_to_host_async`), and by the time it is read the step has long
finished, so the host never waits for the device: it can queue up to DEAD_COUNT_LAG - 1 steps
ahead of the one the device runs (an on-device `lax.cond` would make XLA copy its predicate to
the host and wait, every step, on GPU). The choice is a pure function of the training history
(the last counts travel in the state), so a resumed run chooses the same.

`TrainStep.compile` compiles, before the first step, the step of every bucket the run can use
(ahead of time: `jit(...).lower(state, x).compile()` with the run's shardings), and the calls
run those executables: no step stops for a compile mid-run (on a pod, every host would wait).

The state's `params` hold every model variable; only the nnx.Param ones are differentiated and
seen by the optimiser. A RouterBias (SAEConfig.router_bias) is moved by `update_router_bias`
from the step's expert loads, inside the same jitted step.
"""

from __future__ import annotations

import collections
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from sae_jax.config import TrainConfig
from sae_jax.kernels.auxk import bucket_for, compact_dead, dead_buckets, max_bucket
from sae_jax.model.losses import kind_loss, loss_and_metrics
from sae_jax.model.switch import BatchThreshold, RouterBias, SwitchSAE
from sae_jax.training.learning_rates import make_optimizer, router_bias_step
from sae_jax.training.update import (
    apply_update,
    grad_shards,
    leaf_names,
    state_specs,
    with_row_grads,
)

# A step runs AuxK when some latent was dead this many steps before it (LAG - 1 steps late at
# worst): the host reads counts of a step that finished while the LAG - 1 steps after it were
# queued, so it can stay that many steps ahead of the device.
DEAD_COUNT_LAG = 4


@struct.dataclass
class TrainState:
    step: jax.Array  # [] int32
    params: nnx.State  # every model variable: the nnx.Params and a RouterBias [N] if any
    opt_state: Any
    since_fired: jax.Array  # [N, L] int32 training tokens since each latent last fired
    recent_dead: jax.Array  # [DEAD_COUNT_LAG] int32 most dead latents in one expert, recent steps


def new_state(params: nnx.State, tx: optax.GradientTransformation) -> TrainState:
    """The state at step 0 for `params`, abstract or concrete (pure: jit- and eval_shape-able)."""
    n, lat = params["b_enc"][...].shape
    return TrainState(
        jnp.zeros((), jnp.int32), params, tx.init(trained(params)), jnp.zeros((n, lat), jnp.int32),
        jnp.zeros((DEAD_COUNT_LAG,), jnp.int32),
    )  # fmt: skip


def trained(variables: nnx.State) -> nnx.State:
    """The nnx.Param part of a model's state: what the gradient and the optimiser see."""
    return nnx.split_state(variables, nnx.Param, ...)[0]


def update_router_bias(variables: nnx.State, counts: jax.Array, step_size: float) -> nnx.State:
    """Loss-free balancing (DeepSeek-V3): each RouterBias [N] moves by step_size * sign(mean
    load - load), from the step's global per-expert token counts [N] (SwitchOut.expert_counts,
    already summed over devices, so every replica moves the same). The training step passes
    learning_rates.router_bias_step: ROUTER_BIAS_RATE x the router's LR. `variables`: a model
    state's non-Param part; returned with the biases moved (unchanged without one)."""
    bias, other = nnx.split_state(variables, RouterBias, ...)
    step = step_size * jnp.sign(jnp.mean(counts) - counts)
    bias = jax.tree.map(lambda b: b + step.astype(b.dtype), bias)
    return nnx.merge_state(bias, other)


def update_batch_threshold(
    variables: nnx.State, batch: jax.Array, step: jax.Array, rate: float
) -> nnx.State:
    """BatchTopK's inference threshold (a BatchThreshold []): the first step's batch
    threshold, then each step moves it `rate` of the way to the batch's (an exponential
    average, as SAELens's topk_threshold_lr). Unchanged without one."""
    theta, other = nnx.split_state(variables, BatchThreshold, ...)
    theta = jax.tree.map(lambda t: jnp.where(step == 0, batch, t + rate * (batch - t)), theta)
    return nnx.merge_state(theta, other)


def first_thresholds(
    graphdef: nnx.GraphDef, params: nnx.State, others: nnx.State, x: jax.Array, step: jax.Array
) -> nnx.State:
    """JumpReLU: at step 0, every log-threshold becomes log of the batch's BatchTopK
    threshold of K (the model run in mode 'batch'), so training starts at a mean L0 near K
    whatever the data's scale; later steps, and the other kinds, pass params through."""
    names = {n for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
             for n in leaf_names(path)}  # fmt: skip
    if "log_threshold" not in names:
        return params

    def calibrate(p):
        out = nnx.merge(graphdef, p, others)(jax.lax.stop_gradient(x), mode="batch")
        start = jnp.log(jnp.maximum(out.batch_threshold, 1e-6))

        def leaf(path, a):
            return jnp.full_like(a, start) if "log_threshold" in leaf_names(path) else a

        return jax.tree_util.tree_map_with_path(leaf, p)

    return jax.lax.cond(step == 0, calibrate, lambda p: p, params)


def state_sharding(tree: TrainState, mesh: jax.sharding.Mesh) -> Any:
    """Shardings for a TrainState (concrete or abstract): expert leaves (update.EXPERT_LEAVES)
    split their leading axis over 'expert' (replicated over 'data'), the Adam moments of w_enc,
    b_enc, w_dec over 'data' too where the mesh allows (ZeRO-1: update.state_specs); every
    other leaf is replicated."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), state_specs(tree, mesh))


def init_state(model: SwitchSAE, tx: optax.GradientTransformation) -> TrainState:
    """The step-0 state of a model built under the current mesh, created already sharded."""
    _, params = nnx.split(model)
    create = functools.partial(new_state, tx=tx)
    if jax.sharding.get_abstract_mesh().empty:
        return create(params)
    shardings = state_sharding(jax.eval_shape(create, params), jax.sharding.get_mesh())
    return jax.jit(create, out_shardings=shardings)(params)


def setup_training(model: SwitchSAE, tcfg: TrainConfig):
    """(graphdef, initial TrainState, TrainStep) for a model built under the current mesh;
    the step keeps the state in the layout it was created in."""
    tx = make_optimizer(model.cfg, tcfg)
    graphdef, state = nnx.graphdef(model), init_state(model, tx)
    step = TrainStep(graphdef, tx, tcfg, sharding_of(state), has_auxk=model.cfg.k_aux > 0)
    return graphdef, state, step


def sharding_of(tree: Any) -> Any:
    """The shardings of a pytree of arrays (same structure)."""
    return jax.tree.map(lambda a: a.sharding, tree)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    tcfg: TrainConfig,
    state_sharding: Any = None,
    *,
    auxk: bool,
    aux_bucket: int | None = None,
):
    """Returns step(state, x [T, d]) -> (state, metrics); jitted, the state buffers donated.

    `auxk`: whether this step computes the AuxK loss (with the state's current dead mask);
    `aux_bucket`: the dead latents per expert it runs AuxK on (`compact_dead`; None: all).
    `state_sharding` (a pytree of shardings, see `sharding_of`) pins the new state to the
    layout of the old one, so the second step does not recompile for a different layout.
    """
    out_shardings = None
    if state_sharding is not None:
        mesh = jax.tree.leaves(state_sharding)[0].mesh
        out_shardings = (state_sharding, NamedSharding(mesh, PartitionSpec()))
    step = step_body(graphdef, tx, tcfg, auxk=auxk, aux_bucket=aux_bucket)
    return jax.jit(step, donate_argnums=0, out_shardings=out_shardings)


def step_body(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    tcfg: TrainConfig,
    *,
    auxk: bool,
    aux_bucket: int | None = None,
):
    """The training step as a pure function step(state, x) -> (state, metrics), not jitted
    (make_train_step jits it; launch.bench_many vmaps it over stacked SAEs)."""

    def loss_fn(params, shards, others, x, dead_ids):
        model = nnx.merge(graphdef, params, others)
        out = model(x, dead_ids, grad_shards=shards)
        loss, metrics = loss_and_metrics(
            x, out, lb_alpha=tcfg.lb_alpha, aux_weight=tcfg.aux_weight,
            z_weight=tcfg.router_z_weight, kind=kind_loss(model.cfg, tcfg),
        )  # fmt: skip
        return loss, (metrics, out.fired, out.expert_counts)

    def step(state: TrainState, x: jax.Array):
        dead_ids = None
        if auxk:
            mask = state.since_fired >= tcfg.dead_after_tokens
            size, lat = aux_bucket or mask.shape[1], mask.shape[1]
            # Past `size` dead latents per expert, the ids taken start `size` further each step.
            dead_ids = compact_dead(mask, size, start=(state.step % -(-lat // size)) * size)
        params, others = nnx.split_state(state.params, nnx.Param, ...)
        params = first_thresholds(graphdef, params, others, x, state.step)
        # ZeRO-1: the expert weights' gradient comes reduce-scattered, as that of `shards`.
        shards = grad_shards(params, jax.sharding.get_abstract_mesh())
        (grads, row_grads), (metrics, fired, counts) = jax.grad(
            loss_fn, argnums=(0, 1), has_aux=True
        )(params, shards, others, x, dead_ids)
        grads = with_row_grads(grads, row_grads)
        params, opt_state, grad_norm = apply_update(
            tx, grads, state.opt_state, params, clip=tcfg.grad_clip
        )
        num_latents = state.params["b_enc"][...].size  # N x L
        others = update_router_bias(others, counts, router_bias_step(tcfg, num_latents))
        others = update_batch_threshold(others, metrics["batch_threshold"], state.step,
                                        tcfg.threshold_rate)  # fmt: skip
        params = nnx.merge_state(params, others)
        tokens = x.shape[0]
        since = jnp.where(
            fired > 0, 0, jnp.minimum(state.since_fired + tokens, tcfg.dead_after_tokens)
        ).astype(jnp.int32)
        was_dead = state.since_fired >= tcfg.dead_after_tokens
        metrics["revived"] = jnp.sum(was_dead & (fired > 0), dtype=jnp.int32)
        per_expert = jnp.sum(since >= tcfg.dead_after_tokens, axis=1, dtype=jnp.int32)
        dead_count = jnp.sum(per_expert)
        metrics["dead_fraction"] = dead_count / since.size
        metrics["dead_latents"] = dead_count
        metrics["dead_max_expert"] = jnp.max(per_expert)
        metrics["grad_norm"] = grad_norm
        recent = jnp.append(state.recent_dead[1:], metrics["dead_max_expert"])
        return TrainState(state.step + 1, params, opt_state, since, recent), metrics

    return step


class TrainStep:
    """step(state, x) -> (state, metrics): the plain compiled step or an AuxK one.

    Step t runs AuxK, on the bucket that holds the most dead latents of one expert (capped at
    `TrainConfig.aux_max_share`, see kernels.auxk.max_bucket), when the state of step
    t - DEAD_COUNT_LAG + 1 had a dead latent; that count came out of step t - DEAD_COUNT_LAG,
    whose copy to the host started when it was dispatched, so reading it does not stall the
    device queue. The first call reads the counts from the state (at the start or after a
    restore). Without AuxK (`has_auxk=False`: SAEConfig.k_aux = 0) every step is the plain one.

    `compile(state, x)` compiles every step the run can use before the first step; a bucket
    it did not compile (or every one, without `compile`) compiles the first time it is used.
    Use one TrainStep per run.
    """

    def __init__(self, graphdef, tx, tcfg: TrainConfig, state_sharding: Any = None, *,
                 has_auxk: bool = True):  # fmt: skip
        self._make = functools.partial(make_train_step, graphdef, tx, tcfg, state_sharding)
        self._tcfg, self._aux = tcfg, has_auxk
        self.plain = self._make(auxk=False)
        self._steps: dict[int | None, Any] = {0: self.plain}
        self._compiled: dict[int, Any] = {}  # bucket -> executable compiled ahead of time
        self._counts: collections.deque | None = None

    @property
    def auxk(self):
        """The AuxK step on every latent (the largest bucket)."""
        return self.for_bucket(None)

    def for_bucket(self, bucket: int | None):
        """The jitted step for a bucket of dead ids per expert (0: no AuxK; None: all latents)."""
        if bucket not in self._steps:
            self._steps[bucket] = self._make(auxk=True, aux_bucket=bucket)
        return self._steps[bucket]

    def buckets(self, state: TrainState) -> tuple[int, ...]:
        """The buckets this run can use, 0 first: with AuxK on, every bucket up to
        `max_bucket` once a latent can be dead at a step of the run (already in `state`'s
        counts, or `dead_after_tokens` within the tokens of its first STEPS - DEAD_COUNT_LAG
        steps, whose state the last step reads); otherwise only 0."""
        tcfg, latents = self._tcfg, state.since_fired.shape[1]
        seen = max(self._seed(state)) > 0
        reached = (tcfg.steps - DEAD_COUNT_LAG) * tcfg.batch_size >= tcfg.dead_after_tokens
        if not self._aux or not (seen or reached):
            return (0,)
        top = max_bucket(latents, tcfg.aux_max_share)
        return (0, *(b for b in dead_buckets(latents) if b <= top))

    def compile(self, state: TrainState, x: jax.Array) -> int:
        """Compile ahead of time the step of every bucket in `buckets(state)`, for arguments
        of the shapes, dtypes and shardings of `state` (the run's first state: its counts are
        read) and `x` [T, d] (an array or a jax.ShapeDtypeStruct); the calls then run these
        executables (which refuse arguments of another layout). Returns how many it
        compiled."""
        todo = self.pending(state)
        for b in todo:
            self._compiled[b] = self.for_bucket(b).lower(state, x).compile()
        return len(todo)

    def pending(self, state: TrainState) -> list[int]:
        """The buckets of `buckets(state)` not compiled yet."""
        return [b for b in self.buckets(state) if b not in self._compiled]

    def share_compiled(self, other: TrainStep) -> None:
        """Use `other`'s step functions and compiled executables from now on: `other` steps
        an SAE of the same SAEConfig, step settings and state layout (train_many's SAEs of
        one config on several layers), so each step compiles once for both. The dead-latent
        counts stay this TrainStep's own."""
        self._make, self._steps, self._compiled = other._make, other._steps, other._compiled
        self.plain = other.plain

    def bucket(self, state: TrainState) -> int:
        """The next call's AuxK bucket, 0 for none (seeds the counts from `state` once)."""
        counts = self._seed(state)
        if not self._aux:
            return 0
        count = int(counts[0])  # on the host already: copied since its step was dispatched
        return bucket_for(count, state.since_fired.shape[1], self._tcfg.aux_max_share)

    def uses_auxk(self, state: TrainState) -> bool:
        """Whether the next call runs an AuxK step."""
        return self.bucket(state) > 0

    def __call__(self, state: TrainState, x: jax.Array) -> tuple[TrainState, dict]:
        bucket = self.bucket(state)
        step = self._compiled.get(bucket) or self.for_bucket(bucket)
        state, metrics = step(state, x)
        count = metrics["dead_max_expert"]
        count.copy_to_host_async()  # read DEAD_COUNT_LAG calls later, without waiting then
        self._counts.popleft()
        self._counts.append(count)
        return state, metrics

    def _seed(self, state: TrainState) -> collections.deque:
        """The lagged counts, read from `state` at the first use (a start or a restore)."""
        if self._counts is None:
            self._counts = collections.deque(jax.device_get(state.recent_dead).tolist())
        return self._counts
