"""The Switch SAE (Mudide et al. 2024) as a Flax NNX module.

    p(x)  = softmax(W_router^T (x - b_router))       router, float32
    i*    = argmax_i p_i(x)                           top-1 routing
    z     = TopK_k(ReLU(W_enc[i*] (x - b_dec) + b_enc[i*]))
    x_hat = p_{i*}(x) * W_dec[i*]^T z + b_dec

With `num_experts = 1` there is no router and the module is a plain TopK SAE (Gao et al. 2024).
Only the routed expert's encoder runs on a token. The module routes the tokens, hands them to
the dispatch path that `dispatch.paths.choose` picks for the config and the mesh (capacity
buffers or dropless blocks, on one device or across an 'expert' mesh axis), and combines the
gated reconstructions. Under a mesh it runs inside `jax.shard_map`, one device's share each.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from sae_jax import precision
from sae_jax.config import ConfigError, SAEConfig
from sae_jax.dispatch import global_topk, paths
from sae_jax.dispatch.routed import Routed
from sae_jax.kernels import routing
from sae_jax.kernels.activations import Kind
from sae_jax.kernels.auxk import compact_dead
from sae_jax.kernels.expert import (
    ExpertOut,
    ExpertParams,
    ExpertRows,
    ExpertSettings,
    centre,
    expert_out,
)
from sae_jax.kernels.records import routed_kernel
from sae_jax.mesh import AXES, zero_rows_spec
from sae_jax.varying import reduce_scattered, vary_all

EXPERT_AXES = ("expert", None, None)


class SwitchParams(NamedTuple):
    """The module's weights as arrays (leaves [N, ...]; [N_local, ...] inside shard_map)."""

    experts: ExpertParams
    router: tuple[jax.Array, jax.Array] | None  # (w_router [d, N], b_router [d]); None: N = 1
    b_dec: jax.Array  # [d]
    shared: ExpertParams | None = None  # the shared dictionary ([S, d], [S], [S, d]); None: none
    router_bias: jax.Array | None = None  # [N] selection-only routing bias (RouterBias); None: off
    enc_scale: jax.Array | None = None  # [N, d] scaled_encoder's feature scaling; None: off
    threshold: jax.Array | None = None  # [N, L] the 'jump' rule's thresholds; None: not used


class SwitchOut(NamedTuple):
    """Forward results. Per-token arrays first, then sums over tokens (psum-able)."""

    x_hat: jax.Array  # [T, d]
    expert: jax.Array  # [T] int32 routed expert ([T, e] with experts_per_token e > 1)
    gate: jax.Array  # [T] float32 router probability of the routed expert (1 for N = 1; [T, e])
    kept: jax.Array  # [T] bool, False where the token overflowed its expert's capacity
    expert_counts: jax.Array  # [N] tokens routed to each expert (before dropping)
    prob_sums: jax.Array  # [N] summed router probabilities
    fired: jax.Array  # [N, L] tokens on which each latent fired
    l0_sum: jax.Array  # [] active latents summed over kept tokens
    aux_err: jax.Array  # [] AuxK squared error sum
    aux_norm: jax.Array  # [] AuxK residual norm sum
    rows: jax.Array  # [] token rows the experts computed (capacity slots or padded blocks)
    z_sum: jax.Array | float = 0.0  # [] sum of logsumexp(router logits)^2 (0 for N = 1)
    kind_sums: jax.Array | None = None  # [S] the activation kind's sums (ExpertOut.kind_sums)
    batch_threshold: jax.Array | float = 0.0  # [] BatchTopK's threshold of this batch (or 0)


def unit_rows(w: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Normalise the last axis to unit L2 norm."""
    return w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), eps)


class RouterBias(nnx.Variable):
    """Loss-free balancing's per-expert routing bias [N] float32 (DeepSeek-V3): model state
    that is not an nnx.Param, so neither the gradient nor the optimiser sees it; the train step
    moves it from each step's expert loads (training.step.update_router_bias)."""


class BatchThreshold(nnx.Variable):
    """BatchTopK's inference threshold [] float32: an exponential average of the training
    batches' thresholds, moved by the train step (training.step.update_batch_threshold);
    not an nnx.Param."""


MODES = ("train", "infer", "batch")  # SwitchSAE.__call__'s selection modes


class SwitchSAE(nnx.Module):
    """Parameters: b_dec [d], b_router [d], w_router [d, N], and per expert w_enc [N, L, d]
    (encoder rows), b_enc [N, L], w_dec [N, L, d] (unit-norm rows). Expert tensors are
    annotated with the 'expert' mesh axis; create the module under `jax.set_mesh`.
    With cfg.router_bias (and N > 1) it also holds router_bias, a RouterBias [N] (zeros at
    init, replicated), added to the router logits only to choose each token's expert.
    """

    def __init__(self, cfg: SAEConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        mesh = jax.sharding.get_abstract_mesh()
        if not mesh.empty:
            check_mesh(cfg, dict(mesh.shape))
        # 'auto' becomes float32 or bfloat16 for the backend the model is built on.
        cfg = dataclasses.replace(cfg, compute_dtype=precision.resolve(cfg.compute_dtype))
        self.cfg = cfg
        n, lat, d = cfg.num_experts, cfg.latents_per_expert, cfg.d
        w_dec = unit_rows(jax.random.normal(rngs.params(), (n, lat, d), jnp.float32))
        # Tied init: the encoder starts as the decoder's transpose.
        self.w_dec = nnx.Param(w_dec, out_sharding=EXPERT_AXES)
        self.w_enc = nnx.Param(jnp.copy(w_dec), out_sharding=EXPERT_AXES)
        self.b_enc = nnx.Param(jnp.zeros((n, lat), jnp.float32), out_sharding=("expert", None))
        self.b_dec = nnx.Param(jnp.zeros((d,), jnp.float32))
        if n > 1:
            w_router = jax.random.normal(rngs.params(), (d, n), jnp.float32) / jnp.sqrt(d)
            self.w_router = nnx.Param(w_router)
            self.b_router = nnx.Param(jnp.zeros((d,), jnp.float32))
        if cfg.feature_scaling:  # s in mean + (1 + s) * (rows - mean), per expert
            scale = jnp.zeros((n, d), jnp.float32)
            self.enc_scale = nnx.Param(scale, out_sharding=("expert", None))
        if cfg.shared_latents:  # replicated: every device runs it on its own tokens
            s = cfg.shared_latents
            shared_dec = unit_rows(jax.random.normal(rngs.params(), (s, d), jnp.float32))
            self.shared_w_dec = nnx.Param(shared_dec)
            self.shared_w_enc = nnx.Param(jnp.copy(shared_dec))
            self.shared_b_enc = nnx.Param(jnp.zeros((s,), jnp.float32))
        if cfg.router_bias and n > 1:
            self.router_bias = RouterBias(jnp.zeros((n,), jnp.float32))
        if cfg.kind.learned_threshold:  # set from the data at the first step (training.step)
            log_threshold = jnp.zeros((n, lat), jnp.float32)
            self.log_threshold = nnx.Param(log_threshold, out_sharding=("expert", None))
        if cfg.kind.batch:
            self.batch_threshold = BatchThreshold(jnp.zeros((), jnp.float32))

    def __call__(
        self,
        x: jax.Array,
        dead: jax.Array | None = None,
        capacity_factor: float | None = None,
        grad_shards: ExpertParams | None = None,
        mode: str = "train",
    ) -> SwitchOut:
        """x: [T, d] (sharded over every device); dead: AuxK's dead latents (None: off), as
        [N, L] bool masks or as [N, B] int32 ids padded with L (`kernels.auxk.compact_dead`).
        mode: 'train' selects latents by the activation's training rule, 'infer' by its
        inference rule (BatchTopK and Matryoshka: their threshold), 'batch' by a BatchTopK of
        K over the batch whatever the kind (to set JumpReLU's first thresholds).

        Under a ('data', 'expert') mesh the forward runs in `jax.shard_map`: each device routes
        its own tokens and the dispatch path moves them to the devices that hold their experts.
        Without a mesh it runs as one local computation.
        grad_shards (ZeRO-1, a 'data' axis over 1): arrays shaped like w_enc, b_enc, w_dec, in
        the layout of `mesh.zero_rows_spec`, whose gradient is theirs reduce-scattered
        over 'data' (`varying.reduce_scattered`; training.update.grad_shards); the weights
        then get none.
        """
        cfg = self.cfg
        cf = cfg.capacity_factor if capacity_factor is None else capacity_factor
        if dead is not None and dead.dtype == jnp.bool_:
            dead = compact_dead(dead, dead.shape[-1])
        experts = ExpertParams(self.w_enc[...], self.b_enc[...], self.w_dec[...])
        enc_scale = self.enc_scale[...] if cfg.feature_scaling else None
        router = (self.w_router[...], self.b_router[...]) if cfg.num_experts > 1 else None
        shared = None
        if cfg.shared_latents:  # decoder rows used at unit norm (the update renormalises experts')
            shared = ExpertParams(self.shared_w_enc[...], self.shared_b_enc[...],
                                  unit_rows(self.shared_w_dec[...]))  # fmt: skip
        bias = self.router_bias[...] if hasattr(self, "router_bias") else None
        threshold = self._threshold(mode)
        params = SwitchParams(experts, router, self.b_dec[...], shared, bias, enc_scale,
                              threshold)  # fmt: skip
        mesh = jax.sharding.get_abstract_mesh()
        if grad_shards is not None and (mesh.empty or mesh.shape["data"] == 1):
            raise ValueError("grad_shards needs a mesh with a 'data' axis of more than one device")
        if mesh.empty:
            return switch_apply(params, x, dead, cfg=cfg, capacity_factor=cf, mode=mode)
        check_mesh(cfg, dict(mesh.shape), x.shape[0])
        # A 'data' axis of size 1 stays out of the manual axes: its psum of the expert
        # gradients would still be an all-reduce with buffers of their size.
        axes = tuple(a for a in AXES if a == "expert" or mesh.shape[a] > 1)
        local = functools.partial(switch_apply, cfg=cfg, capacity_factor=cf, all_axes=axes,
                                  mode=mode)  # fmt: skip
        expert_spec, tok = P("expert"), P(axes)
        param_specs = SwitchParams(
            ExpertParams(expert_spec, expert_spec, expert_spec),
            None if router is None else (P(), P()),
            P(),
            None if shared is None else ExpertParams(P(), P(), P()),
            None if bias is None else P(),
            None if enc_scale is None else expert_spec,
            None if threshold is None else expert_spec,
        )
        shard_specs = None
        if grad_shards is not None:
            split = zero_rows_spec(mesh, cfg.num_experts, cfg.latents_per_expert)
            shard_specs = ExpertParams(split, split, split)
        in_specs = (param_specs, tok, None if dead is None else expert_spec, shard_specs)
        out_specs = SwitchOut(tok, tok, tok, tok, P(), P(), expert_spec, P(), P(), P(), P(), P(),
                              P(), P())  # fmt: skip
        return jax.shard_map(
            local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names=set(axes)
        )(params, x, dead, grad_shards)

    def _threshold(self, mode: str) -> jax.Array | None:
        """[N, L] the 'jump' rule's thresholds in this mode: JumpReLU's learned ones, or
        BatchTopK's inference threshold for every latent; None where the rule is TopK's."""
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: use one of {MODES}")
        if selection(self.cfg.kind, mode)[0] != "jump":
            return None
        if self.cfg.kind.learned_threshold:
            return jnp.exp(self.log_threshold[...])
        shape = self.b_enc.shape
        return jnp.broadcast_to(self.batch_threshold[...], shape).astype(jnp.float32)


def selection(kind: Kind, mode: str) -> tuple[str, bool]:
    """(the kernel's rule, whether a batch threshold selects) of an activation kind in a
    mode of SwitchSAE.__call__."""
    if mode == "batch":
        return "topk", True
    if mode == "infer":
        return kind.infer_rule, False
    return kind.train_rule, kind.batch


def check_mesh(cfg: SAEConfig, mesh_shape: dict[str, int], tokens: int | None = None) -> None:
    """One-line errors for a mesh that cannot hold this model or this batch of tokens."""
    e, devices = mesh_shape["expert"], mesh_shape["data"] * mesh_shape["expert"]
    if cfg.num_experts % e:
        raise ConfigError(
            f"NUM_EXPERTS={cfg.num_experts} is not divisible by the 'expert' mesh axis ({e})"
        )
    if tokens is not None and tokens % devices:
        raise ConfigError(f"batch of {tokens} tokens is not divisible by {devices} devices")


def switch_apply(
    params: SwitchParams,
    x: jax.Array,
    dead_ids: jax.Array | None,
    grad_shards: ExpertParams | None = None,
    *,
    cfg: SAEConfig,
    capacity_factor: float,
    all_axes: tuple[str, ...] | None = None,
    mode: str = "train",
) -> SwitchOut:
    """Route, run each token's expert on the path `dispatch.paths.choose` picks, combine.

    Written for one device's share: x [T_local, d], params.experts [N_local, ...], dead_ids
    [N_local, B] int32 dead latent ids (None: no AuxK); grad_shards: see SwitchSAE.__call__
    ([N_local / data, L, ...] or [N_local, L / data, ...] here). Tokens are centred
    (x - b_dec) in float32 and travel in cfg.compute_dtype, and the reconstructions come back
    in it. Inside shard_map
    (`all_axes`: the manual mesh axes, 'expert' among them), sums are psum'd over them.
    """
    x = x.astype(jnp.float32)
    expert, gate, counts, prob_sums, z_sum = _route(x, params.router, cfg, params.router_bias)
    dtype = precision.resolve(cfg.compute_dtype)  # of the buffers and the reconstructions
    routed = Routed(centre(x, params.b_dec, dtype), expert, gate, params.b_dec)
    expert_axis = "expert" if all_axes else None
    data_axes = tuple(a for a in all_axes or () if a != expert_axis)
    experts, enc_scale = params.experts, params.enc_scale
    if all_axes:
        # Expert weights are replicated along 'data'; mark them varying once, here, so their
        # gradient is summed over 'data' once (not, say, once per AuxK chunk), or under ZeRO-1
        # reduce-scattered over it.
        if grad_shards is None:
            experts = vary_all(experts, data_axes)
        else:
            experts = reduce_scattered(experts, grad_shards, data_axes)
        enc_scale = vary_all(enc_scale, data_axes)
    if enc_scale is not None:
        experts = experts._replace(w_enc=scaled_encoder(experts.w_enc, enc_scale))
    if params.threshold is not None:
        threshold = params.threshold if not all_axes else vary_all(params.threshold, data_axes)
        experts = experts._replace(threshold=threshold)
    rule, batch = selection(cfg.kind, mode)
    settings = expert_settings(cfg, dtype, capacity_factor, expert_axis, rule, batch, mode)
    expert_devices = jax.lax.axis_size(expert_axis) if expert_axis else 1
    path = paths.choose(cfg, expert_devices)
    if cfg.experts_per_token == 1 and params.shared is None and not batch:
        out = path(routed, experts, dead_ids, settings)
        x_hat = gate[:, None] * out.recon + params.b_dec
    else:  # out.recon is the gated sum over the token's experts
        choose = _choice(cfg, rule, batch, all_axes or ())
        out, x_hat = _apply_global(path, routed, params._replace(experts=experts), dead_ids, cfg,
                                   settings, choose)  # fmt: skip
    sums = (counts, prob_sums, out.l0_sum, out.aux_err, out.aux_norm, out.rows, z_sum,
            out.kind_sums)  # fmt: skip
    fired = out.fired
    if all_axes:
        sums = jax.lax.psum(sums, all_axes)
        fired = jax.lax.psum(fired, data_axes)
    counts, prob_sums, l0_sum, aux_err, aux_norm, rows, z_sum, kind_sums = sums
    threshold = jnp.zeros((), jnp.float32) if out.threshold is None else out.threshold
    return SwitchOut(x_hat, expert, gate, out.kept, counts, prob_sums, fired, l0_sum, aux_err,
                     aux_norm, rows, z_sum, kind_sums, threshold)  # fmt: skip


def _choice(cfg: SAEConfig, rule: str, batch: bool, axes: tuple[str, ...]):
    """global_topk.run's selection: a BatchTopK over the batch on every device, the global
    TopK of K among a token's e experts, or none (a per-row rule: JumpReLU's)."""
    if batch:  # on gated values for the batch kinds; JumpReLU's first thresholds: ungated
        return global_topk.batch_choice(cfg.routed_k, axes, gated=cfg.kind.batch)
    return global_topk.top_k_choice(cfg.routed_k) if rule == "topk" else None


def _apply_global(path, routed: Routed, params: SwitchParams, dead_ids, cfg, settings, choose):
    """Routed experts (e >= 1, dispatch/global_topk.py, selecting with `choose`) beside a
    shared dictionary, if any: the TokenOut (l0_sum with the shared latents) and x_hat [T, d].
    The shared dictionary is a TopK of SHARED_K in every activation kind."""
    if routed.expert.ndim == 1:
        routed = routed._replace(expert=routed.expert[:, None], gate=routed.gate[:, None])
    shared = None
    if params.shared is not None:
        own = dict(k=cfg.shared_k, k_aux=0, expert_axis=None, kernel=cfg.expert_kernel,
                   rule="topk", prefixes=())  # fmt: skip
        shared = shared_forward(params.shared, routed, dataclasses.replace(settings, **own))
    also = None if shared is None else shared.recon
    out = global_topk.run(path, routed, params.experts, dead_ids, settings, also, choose)
    x_hat = out.recon + params.b_dec
    if shared is not None:
        x_hat = x_hat + shared.recon
        out = out._replace(l0_sum=out.l0_sum + jnp.sum(shared.latents > 0))
    return out, x_hat


def shared_forward(p: ExpertParams, routed: Routed, s: ExpertSettings) -> ExpertOut:
    """The shared dictionary on every token: a TopK SAE of s.k latents, ungated, on this
    device's tokens (p replicated). Returns ExpertOut (recon [T, d] float32, latents [T, k])."""
    tokens = routed.x.shape[0]
    rows = ExpertRows(routed.x, jnp.ones(tokens, jnp.float32), jnp.ones(tokens, bool))
    return expert_out(p, rows, routed.b_dec, None, s)


def scaled_encoder(w_enc: jax.Array, scale: jax.Array) -> jax.Array:
    """Scale SAE's feature scaling (Xu et al. 2025) of encoder rows w_enc [N, L, d]: each
    expert's mean row m (the part its latents share) plus (1 + scale) [N, d] times every
    row's own deviation from it: m + (1 + s) * (w - m). scale = 0 leaves w_enc as it is."""
    mean = jnp.mean(w_enc, axis=1, keepdims=True)
    return mean + (1.0 + scale[:, None, :]) * (w_enc - mean)


def expert_settings(
    cfg: SAEConfig,
    dtype: str,
    capacity_factor: float,
    expert_axis: str | None,
    rule: str = "topk",
    batch: bool = False,
    mode: str = "train",
) -> ExpertSettings:
    """The dispatch paths' settings for this config, with the resolved compute dtype, for
    the kernel's selection rule (`selection`): a row's k is K - SHARED_K for a TopK, its
    candidates (SAEConfig.candidates_per_row) for a threshold or a batch selection."""
    per_row = cfg.routed_k if rule == "topk" and not batch else cfg.candidates_per_row
    prefixes = cfg.prefix_ends if cfg.kind.prefixes and mode == "train" else ()
    return ExpertSettings(
        k=per_row,
        rule=rule,
        bandwidth=cfg.jumprelu_bandwidth,
        gated_threshold=rule == "jump" and cfg.kind.batch,
        prefixes=prefixes,
        k_aux=cfg.k_aux_effective,
        kernel=routed_kernel(cfg.expert_kernel, cfg.experts_per_token),
        dtype=dtype,
        block_size=cfg.block_size,
        capacity_factor=capacity_factor,
        expert_axis=expert_axis,
    )


def _route(
    x: jax.Array,
    router: tuple[jax.Array, jax.Array] | None,
    cfg: SAEConfig,
    bias: jax.Array | None = None,
):
    """Routed expert [T] and gate [T] (with experts_per_token e > 1: [T, e], the e most
    probable), the per-expert token counts and summed probabilities [N], and the router
    z-loss summed over tokens []. Without a router (N = 1) every token goes to expert 0 with
    p = 1 (z = 0). bias [N]: added to the logits only to choose the experts
    (routing.route_top); the gates stay the unbiased probabilities."""
    e = cfg.experts_per_token
    if router is None:
        tokens = x.shape[0]
        sums = jnp.full((1,), tokens, jnp.float32)
        ones = jnp.ones((tokens,), jnp.float32)
        return jnp.zeros((tokens,), jnp.int32), ones, sums, sums, jnp.zeros((), jnp.float32)
    if bias is None and e == 1:
        r = routing.route(x, *router)
    else:
        top = routing.route_top(x, *router, e, bias=bias)
        r = top if e > 1 else top._replace(expert=top.expert[:, 0], gate=top.gate[:, 0])
    z_sum = routing.z_sum(r.logits)
    return (r.expert, r.gate, *routing.load_sums(r, cfg.num_experts), z_sum)
