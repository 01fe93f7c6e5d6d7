"""Analytic memory and FLOPs of one training step, per device.

Memory terms (float32 state; W = one expert tensor's local shard, N_local x L x d x 4 bytes):
  parameters       w_enc + w_dec (2W), b_enc, and the replicated b_dec, b_router, w_router
                   and shared dictionary ([S, d] x 2 + [S], `shared_params`)
  optimizer_state  Adam's two moments: 2 x parameters (+ its step count); under ZeRO-1 (a
                   'data' axis over 1, training/update.py) the expert weights' part is / data
  counters         since_fired [N_local, L] int32, the step and the recent dead counts
  batch            the device's share of the input batch [T_local, d]
  gradients        one gradient per parameter: = parameters; under ZeRO-1 plus the expert
                   weights' reduce-scattered gradient (/ data) beside the local one
  other            the rest of XLA's temporaries: the larger of the forward and backward
                   pass's (a shared dictionary's and feature scaling's among them: see
                   `other_temporaries`, `routing_temporaries`) and the optimizer update
                   loop's chunk buffers (`update_temporaries`), which run at different times
The new state is donated (aliased to the old), so outputs add nothing but the metrics.

Routing: a token routed to e = experts_per_token experts runs as e rows, so every row-sized
term (capacity slots, the routed rows, dropless's buffers, the experts' FLOPs) counts
e x T_local rows (`Shapes.local_rows`); a shared dictionary adds its replicated parameters
(with their Adam moments and gradients) and its activations and FLOPs on every token.

Dropless dispatch (sae_jax/dispatch/dropless.py) replaces the capacity buffers by its exchange and
block buffers (`dropless_activations`), which follow the worst-case receive buffer of
R = E x e x T_local rows, not the rows routed; across devices it also moves different bytes
(`ragged_exchanges`) and computes e x T_local + N_local x B rows per device, with AuxK part
of each block's forward twice (`flops_per_token`).

Activation kinds (SAEConfig.activation; the terms follow the flags of the KINDS table,
kernels/activations.py): a non-TopK kind keeps k' = SAEConfig.candidates_per_row candidates
per row instead of k (the gather kernel's encoder rows and decode, dropless's stacked
top-k); jumprelu adds its
log_threshold [N_local, L] parameter (Adam's moments and a gradient with it) and compiles
step 0's threshold calibration (a BatchTopK forward, `calibration_flops`, left out of the
step's total); batchtopk and matryoshka run the dispatch path twice (a candidates pass,
then the chosen one: `kind_exchanges`) and find the batch threshold with 31 scalar psums
(`threshold_psums`); matryoshka decodes each row's latents below its last prefix end
again, cut at the prefix ends (`prefix_temporaries`). Checked against the compiled step
with capacity dispatch only: dropless with the non-TopK kinds holds more [R, d] and
[blocks, B, k'] buffers than `dropless_activations` counts (at d = 256, L = 1024 on (1, 8):
estimate 0.82 x the compiled step for batchtopk, 0.64 x for jumprelu, 0.85 x for topk).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from sae_jax.config import SAEConfig, TrainConfig
from sae_jax.dispatch import blocks, exchange
from sae_jax.dispatch.capacity import capacity
from sae_jax.dispatch.dropless import auto_block_size
from sae_jax.kernels.activations import KINDS, Kind
from sae_jax.kernels.auxk import max_bucket
from sae_jax.kernels.expert import use_dense
from sae_jax.kernels.records import routed_kernel
from sae_jax.mesh import zero_rows_axis
from sae_jax.plan.hlo import Collective
from sae_jax.training.step import DEAD_COUNT_LAG
from sae_jax.training.update import chunk_rows, zero_split

F32 = 4
# Expert-sized temporaries the forward and backward pass holds besides the gradients (the
# optimizer update's are per chunk: UPDATE_CHUNK_BUFFERS below). The gather kernel runs one
# local expert at a time (lax.map) and holds GATHER_EXPERT_ROW_BUFFERS float32 [L, d] buffers
# of that expert, whatever N_local: its encoder and decoder row gradients (zeros the rows are
# scattered into), AuxK's, and their sum; w_enc cast to the compute dtype for the [S, L]
# pre-activations shares one. The dense kernel (vmapped over the local experts) holds
# DENSE_EXPERT_BUFFERS x W, and below float32 w_enc cast to the compute dtype. Counted in
# XLA:CPU's buffer assignment (the configs it was read on: docs/pod_scale.md). Adjust these
# when the step changes.
GATHER_EXPERT_ROW_BUFFERS = 4
DENSE_EXPERT_BUFFERS = 1
# The optimizer update (training/update.py `_update_rows`) runs a loop over chunks of latent
# rows of one expert (`update_chunk_bytes`: a whole expert's [L, d] float32 rows, or the most
# rows within update.UPDATE_CHUNK_BYTES), after the backward pass, holding the row leaves'
# gradients and, per trip, chunk-sized float32 buffers of w_enc and w_dec: one leaf's new Adam
# moments (computed before its parameter, written after it: update._after), its parameter
# chunk sliced out and its new value, and the other leaf's old moments, sliced out before the
# in-place write that reads them: UPDATE_CHUNK_BUFFERS. Under ZeRO-1 also one leaf's new rows
# all-gathered over 'data' ([data, rows, d], data chunks) before they are written. Without
# ZeRO-1, XLA:CPU hands w_enc's update to a YNNPACK fusion whose four scalar operands (Adam's
# step size, bias corrections, eps) are broadcast to the chunk's shape first:
# UPDATE_CPU_BROADCAST_BUFFERS more, an XLA:CPU artefact (a GPU or TPU loop fusion reads a
# scalar as a scalar), counted only for the 'cpu' backend (`Shapes.xla_cpu`). Counted in
# XLA:CPU's buffer assignment: at d = 1024, L = 4096 on (1, 8), where the loop is the step's
# peak (tests/test_plan_routing.py); under ZeRO-1 at d = 256, L = 2048 on (2, 4)
# (tests/test_plan_counts.py's config, whose peak stays the pass).
UPDATE_CHUNK_BUFFERS = 6
UPDATE_CPU_BROADCAST_BUFFERS = 4
# Elementwise FLOPs per parameter of the update: global-norm clipping (2), Adam's moments
# and step (~12), the decoder-gradient projection and row renormalisation (~6).
UPDATE_FLOPS_PER_PARAM = 20
# Dropless buffers of R x d (R = E x T_local received rows, or the block layout's rows), as
# XLA:CPU's buffer assignment holds them (see `dropless_activations`; the configs it was read
# on: docs/pod_scale.md). Around the exchanges the step holds one such buffer in the compute
# dtype (the received tokens, then their layout) and DROPLESS_EXCHANGE_F32_BUFFERS in float32
# (the reconstructions of the layout rows and their gradient, on both sides of
# `from_blocks`), plus, with the CPU emulation of ragged_all_to_all, its [E, T_local, d]
# chunk buffers on both sides of the all_to_all (XLA:CPU sends bfloat16 as float32):
# DROPLESS_EMULATION_BUFFERS. During the blocks' backward loop: the layout in the compute
# dtype and DROPLESS_LOOP_F32_BUFFERS float32 gradients of it, with one block's expert weight
# slices and their gradients (DROPLESS_BLOCK_EXPERT_ROWS float32 [L, d]) and its AuxK rows.
DROPLESS_EXCHANGE_F32_BUFFERS = 4
DROPLESS_EMULATION_BUFFERS = 2
DROPLESS_LOOP_F32_BUFFERS = 2
DROPLESS_BLOCK_EXPERT_ROWS = 4
# BatchTopK's threshold (kernels/activations.kth_largest): a bisection over the 31 bits of
# non-negative float32 patterns, one count of the [e x T_local, k'] candidates and one scalar
# int32 psum per bit.
THRESHOLD_BITS = 31
# Matryoshka's prefix decodes (kernels/expert.prefix_errors) are one dense product cut at the
# prefix ends: codes [slots, m] of the latents below the last end m times W_dec's first m
# rows, group by group, whatever the kernel. Through the backward XLA:CPU's buffer assignment
# holds the codes ([slots, m] float32), each prefix's residual ([slots, d] float32) and
# PREFIX_WDEC_BUFFERS float32 [N_local, m, d] buffers of those rows' gradient (read on d = 256
# at m = 512 dense and m = 1024 gather, 4 prefixes: 2.4 and 1.7 of them;
# tests/test_plan_kinds.py).
PREFIX_WDEC_BUFFERS = 2


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The sizes a step's cost depends on (global unless named local)."""

    d: int
    num_latents: int
    num_experts: int
    k: int
    k_aux: int
    batch: int
    data: int  # mesh axis sizes
    expert: int
    capacity_factor: float
    kernel: str = "auto"
    compute_dtype: str = "float32"
    dispatch: str = "capacity"
    block_size: int = 0  # dropless; 0: auto
    emulated_exchange: bool = False  # dropless on CPU: ragged_all_to_all is emulated
    aux_share: float = 1.0  # AuxK's largest bucket / L (kernels.auxk.max_bucket)
    experts_per_token: int = 1  # e: the experts each token runs
    shared_latents: int = 0  # S: the always-on shared dictionary, dense for every token
    shared_k: int = 0  # its share of k
    shared_kernel: str = "auto"  # the shared dictionary's kernel (EXPERT_KERNEL as set)
    feature_scaling: bool = False  # the experts' encoder runs as a scaled copy of w_enc
    xla_cpu: bool = False  # compiled by XLA:CPU: its fusions' own buffers count too
    activation: str = "topk"  # the experts' kind (kernels/activations.py KINDS)
    candidates: int = 0  # k': the candidates a row of a non-TopK kind keeps (0: k - shared_k)
    prefixes: int = 0  # matryoshka: the nested prefixes decoded besides the whole dictionary
    prefix_latents: int = 0  # matryoshka: m, the last prefix's end (its decodes' latents)

    @classmethod
    def of(
        cls, cfg: SAEConfig, tcfg: TrainConfig, mesh_shape: tuple[int, int], backend: str
    ) -> Shapes:
        """backend: where the step runs ('cpu' emulates ragged_all_to_all, and its fusions
        hold buffers of their own: UPDATE_CPU_BROADCAST_BUFFERS)."""
        return cls(
            cfg.d, cfg.num_latents, cfg.num_experts, cfg.k, cfg.k_aux_effective,
            tcfg.batch_size, mesh_shape[0], mesh_shape[1], cfg.capacity_factor,
            routed_kernel(cfg.expert_kernel, cfg.experts_per_token), cfg.compute_dtype,
            cfg.dispatch, cfg.block_size, backend == "cpu",
            max_bucket(cfg.latents_per_expert, tcfg.aux_max_share) / cfg.latents_per_expert,
            cfg.experts_per_token, cfg.shared_latents, cfg.shared_k, cfg.expert_kernel,
            cfg.feature_scaling, backend == "cpu", cfg.activation, cfg.candidates_per_row,
            len(cfg.prefix_ends) if cfg.kind.prefixes else 0,
            cfg.prefix_ends[-1] if cfg.kind.prefixes else 0,
        )  # fmt: skip

    @property
    def devices(self) -> int:
        return self.data * self.expert

    @property
    def kind(self) -> Kind:
        return KINDS[self.activation]

    @property
    def per_row(self) -> int:
        """The latents a routed row's kernel keeps: k - shared_k for TopK, k' for the other
        kinds (their candidates, SAEConfig.candidates_per_row)."""
        if self.activation == "topk" or not self.candidates:
            return self.k - self.shared_k
        return self.candidates

    @property
    def local_experts(self) -> int:
        return self.num_experts // self.expert

    @property
    def latents(self) -> int:  # L, per expert
        return self.num_latents // self.num_experts

    @property
    def local_tokens(self) -> int:
        return self.batch // self.devices

    @property
    def local_rows(self) -> int:
        """Rows a device routes: e x T_local, one per (token, expert) with e experts per
        token (dispatch/global_topk.py tiles the tokens e times); T_local for e = 1."""
        return self.experts_per_token * self.local_tokens

    @property
    def slots(self) -> int:
        """Row slots a device's experts run on: N_local x E x C = N x C,
        C = ceil(cf x e x T_local / N) within [1, e x T_local] (one buffer row per (source
        device, expert)); T_local for N = 1, whose one buffer holds every token."""
        if self.num_experts == 1:
            return self.local_rows
        return self.num_experts * capacity(self.local_rows, self.num_experts, self.capacity_factor)

    @property
    def row_outputs(self) -> int:
        """Float32 [rows, d] outputs each row brings back from its expert: the reconstruction,
        and with the global TopK (e > 1 or a shared dictionary, dispatch/global_topk.py) and
        AuxK also AuxK's gated reconstruction (`ExpertSettings.aux_out`), each with its own
        return trip and gradient. The batch kinds run the global path too (their selection
        is over the batch, dispatch/global_topk.batch_choice)."""
        routed_globally = self.experts_per_token > 1 or self.shared_latents > 0 or self.kind.batch
        return 2 if routed_globally and self.k_aux > 0 else 1

    @property
    def dropless(self) -> bool:
        return self.dispatch == "dropless"

    @property
    def exchanged(self) -> bool:
        """Dropless with its tokens sent to the experts' devices (a ragged all-to-all)."""
        return self.dropless and self.expert > 1

    @property
    def block(self) -> int:
        """B, the dropless block size (sae_jax/dispatch/dropless.py `auto_block_size` when 0)."""
        return self.block_size or auto_block_size(self.local_rows, self.local_experts)

    @property
    def received_rows(self) -> int:
        """R, the dropless receive buffer: E x e x T_local rows (e x T_local on one device)."""
        return exchange.max_received_rows(self.expert, self.local_rows)

    @property
    def layout_rows(self) -> int:
        """Rows of the dropless block layout: room for any routing of R rows."""
        return blocks.max_blocks(self.received_rows, self.local_experts, self.block) * self.block

    @property
    def computed_rows(self) -> int:
        """Rows a device's experts compute per step: its slots (capacity) or, dropless, the
        e x T_local rows it receives under balanced routing plus at most a block of padding
        per local expert: e x T_local + N_local x B (the used blocks, not the layout)."""
        if self.dropless:
            return min(self.local_rows + self.local_experts * self.block, self.layout_rows)
        return self.slots

    @property
    def dense(self) -> bool:
        return use_dense(self.kernel, self.latents)

    @property
    def expert_tensor_bytes(self) -> int:
        """W: one [N_local, L, d] float32 shard."""
        return self.local_experts * self.latents * self.d * F32

    @property
    def zero(self) -> bool:
        """ZeRO-1: the expert weights' Adam moments split over 'data' (training/update.py)."""
        return zero_split(self.data, self.local_experts, self.latents)


def memory(s: Shapes) -> dict[str, int]:
    """Bytes per device of each term (see the module docstring) and their total."""
    router = _router_params(s)
    rows = 2 * s.expert_tensor_bytes + s.local_experts * s.latents * F32  # w_enc, w_dec, b_enc
    params = rows + s.d * F32 + router * F32 + shared_params(s) * F32 + threshold_params(s)
    split = rows // s.data if s.zero else 0  # a device's share of them under ZeRO-1
    gradients = params + split
    # The update loop holds only the row leaves' gradients (the reduce-scattered share under
    # ZeRO-1): the other leaves are updated whole before it (update._update_experts), and the
    # local row gradients are spent on the reduce-scatter.
    update = (split or rows) + update_temporaries(s) - gradients
    batch_theta = F32 if s.kind.batch else 0  # the batch kinds' BatchThreshold []
    terms = {
        "parameters": params,
        "optimizer_state": 2 * (params - rows + (split or rows)) + F32,
        "counters": s.local_experts * s.latents * F32 + (1 + DEAD_COUNT_LAG) * F32 + batch_theta,
        "batch": s.local_tokens * s.d * F32,
        "gradients": gradients,
        "other": max(other_temporaries(s), update),
    }
    terms["total"] = sum(terms.values())
    return terms


def threshold_params(s: Shapes) -> int:
    """Bytes of jumprelu's log_threshold [N_local, L] float32, sharded over 'expert' like
    b_enc but not split by ZeRO-1 (an expert leaf, not a row leaf: training/update.py); its
    Adam moments and gradient follow `memory`'s parameters. 0 for the other kinds."""
    return s.local_experts * s.latents * F32 if s.kind.learned_threshold else 0


def _router_params(s: Shapes) -> int:
    return s.d * s.num_experts + s.d if s.num_experts > 1 else 0


def shared_params(s: Shapes) -> int:
    """The shared dictionary's parameters, replicated on every device: w_enc and w_dec
    [S, d], b_enc [S] (0 without one). Adam's moments and the gradient follow `memory`'s
    parameters."""
    return (2 * s.d + 1) * s.shared_latents


def routing_temporaries(s: Shapes) -> dict[str, int]:
    """Bytes the routing options add to the forward and backward pass (`other_temporaries`):
    shared_activations  the shared dictionary's [T_local, S] float32 pre-activations, every
                        token's (kernels/expert.py on the device's own tokens), and with the
                        dense kernel its codes and their gradient, [T_local, S] each
    scaled_encoder      feature scaling: the scaled copy of w_enc the experts run on
                        (model/switch.py `scaled_encoder`, [N_local, L, d] float32) and its
                        gradient before it reaches w_enc's: 2 W, whichever kernel
    Both analytic, from the model's structure (no calibrated constant); tests/test_plan_routing.py
    checks them against XLA's compiled memory analysis."""
    shared = s.local_tokens * s.shared_latents * F32
    if s.shared_latents and use_dense(s.shared_kernel, s.shared_latents):
        shared *= 3
    scaled = 2 * s.expert_tensor_bytes if s.feature_scaling else 0
    return {"shared_activations": shared, "scaled_encoder": scaled}


def update_chunk_bytes(s: Shapes) -> int:
    """Bytes of one chunk of the optimizer update loop: update.chunk_rows of a device's
    [rows, d] float32 share of one expert's w_enc (L rows, or L / data under ZeRO-1 split by
    latent rows)."""
    latents = s.latents
    if s.zero and zero_rows_axis(s.data, s.local_experts, s.latents) == 1:
        latents //= s.data
    return chunk_rows(latents, s.d * F32) * s.d * F32


def update_temporaries(s: Shapes) -> int:
    """Bytes the optimizer update loop holds besides the state and the row gradients it
    reads: UPDATE_CHUNK_BUFFERS chunks (`update_chunk_bytes`), and under ZeRO-1 one leaf's
    all-gathered new rows (data chunks), else on XLA:CPU UPDATE_CPU_BROADCAST_BUFFERS more."""
    buffers = UPDATE_CHUNK_BUFFERS
    if s.zero:
        buffers += s.data
    elif s.xla_cpu:
        buffers += UPDATE_CPU_BROADCAST_BUFFERS
    return buffers * update_chunk_bytes(s)


def other_temporaries(s: Shapes) -> int:
    """Temporaries besides the gradients: the larger of the expert-sized buffers the step
    holds (GATHER_EXPERT_ROW_BUFFERS x [L, d] for the gather kernel; DENSE_EXPERT_BUFFERS x W,
    and w_enc in the compute dtype below float32, for the dense one) and the activations of
    the forward and backward pass, which XLA places in the same memory at another time; plus
    what the routing options hold throughout the pass (`routing_temporaries`)."""
    if s.dense:
        held = DENSE_EXPERT_BUFFERS * s.expert_tensor_bytes
        if s.compute_dtype != "float32":
            held += s.expert_tensor_bytes * jnp.dtype(s.compute_dtype).itemsize // F32
    else:
        held = GATHER_EXPERT_ROW_BUFFERS * s.latents * s.d * F32
    passes = dropless_activations(s) if s.dropless else activations(s)
    return max(held, passes) + sum(routing_temporaries(s).values()) + kind_temporaries(s)


def kind_temporaries(s: Shapes) -> int:
    """Bytes an activation kind adds to the forward and backward pass: the batch kinds'
    candidates ([rows, k'] float32 values and int32 ids on the tokens' side and [slots, k']
    on the experts', `candidate_bytes`) and Matryoshka's prefix decodes
    (`prefix_temporaries`). 0 for topk and jumprelu (a row's k' ids and values replace
    TopK's k in buffers the estimate sizes by d or L, not by k)."""
    return candidate_bytes(s) + prefix_temporaries(s)


def candidate_bytes(s: Shapes) -> int:
    """The batch kinds' candidates pass returns each row's k' values and ids to its token's
    device (dispatch/global_topk.run) and sends the chosen ones back: [e x T_local, k'] and
    [computed rows, k'], 8 bytes an entry (float32 + int32). 0 for the others."""
    if not s.kind.batch:
        return 0
    return (s.local_rows + s.computed_rows) * s.per_row * (F32 + 4)


def prefix_temporaries(s: Shapes) -> int:
    """Matryoshka's prefix decodes held through the backward (see PREFIX_WDEC_BUFFERS): the
    codes [slots, m] float32, each prefix's residual [slots, d] float32, and the gradient of
    W_dec's first m rows, [N_local, m, d] float32, PREFIX_WDEC_BUFFERS times. 0 without
    prefixes."""
    if not s.prefixes:
        return 0
    rows, m = s.computed_rows, s.prefix_latents
    wdec = PREFIX_WDEC_BUFFERS * s.local_experts * m * s.d * F32
    return rows * m * F32 + s.prefixes * rows * s.d * F32 + wdec


def activations(s: Shapes) -> int:
    """Largest live activations, per device: the capacity buffers [S, d] on both sides of
    the all_to_alls (S = `slots`) and the routed rows [e x T_local, d] they are scattered
    from and gathered back to, the pre-activations [S, L], the dense kernel's codes and
    their gradient ([S, L] each; the gather kernel's rows are [S, d] buffers, one of the k
    at a time), plus AuxK's at its largest bucket (`aux_share` of the latents)."""
    slots, tokens = s.slots, s.local_rows
    buffers = 4 * (slots + tokens) * s.d * F32
    pre = slots * s.latents * F32
    kernel = 2 * pre if s.dense else 0
    # AuxK at its largest bucket B: the [S, B] pre-activations of the dead columns, their
    # top-k selection mask and their gradient.
    aux = 3 * pre * s.aux_share
    return buffers + pre + kernel + aux


def dropless_activations(s: Shapes) -> int:
    """Largest live dropless buffers, per device: the larger of the exchange phase and the
    blocks' backward loop (see DROPLESS_EXCHANGE_F32_BUFFERS), each dominated by [R, d]
    buffers with R = E x e x T_local, the worst case whatever the routing; the emulation's
    chunk buffers count on CPU only (on GPU/TPU ragged_all_to_all writes into the receive
    buffer). The exchange phase's float32 buffers are per row output (`row_outputs`: with
    the global TopK and AuxK, AuxK's reconstruction travels back beside the rows' own).
    Plus the blocks' stacked top-k (latents and ids [blocks, B, k], the backward's
    residuals; the fired counts go straight into [N_local, L]) and the rows' side
    [e x T_local, d]."""
    rows, blocks = max(s.received_rows, s.layout_rows), s.layout_rows // s.block
    itemsize = jnp.dtype(s.compute_dtype).itemsize
    f32_buffers = DROPLESS_EXCHANGE_F32_BUFFERS * s.row_outputs
    exchange = (f32_buffers * F32 + itemsize) * rows * s.d
    if s.emulated_exchange and s.exchanged:
        chunk_rows = s.expert * min(s.local_rows, s.received_rows)
        exchange += DROPLESS_EMULATION_BUFFERS * s.row_outputs * chunk_rows * s.d * F32
    weights = DROPLESS_BLOCK_EXPERT_ROWS * s.latents * s.d * F32
    # one block's [B, L] pre-activations and codes, and AuxK's [B, dead] columns (twice)
    aux = (2 + 2 * s.aux_share) * s.block * s.latents * F32
    loop = (DROPLESS_LOOP_F32_BUFFERS * F32 + itemsize) * rows * s.d + weights + aux
    stacked = blocks * 2 * s.block * (s.k if s.activation == "topk" else s.per_row) * F32
    tokens = 4 * s.local_rows * s.d * F32
    return max(exchange, loop) + stacked + tokens


def ragged_exchanges(s: Shapes) -> list[Collective]:
    """What `jax.lax.ragged_all_to_all` would move per step and device on GPU/TPU, where it
    sends exactly the routed rows (an analytic estimate: balanced routing, every device sends
    and receives e x T_local rows, 1/E of them its own). Dropless across an 'expert' axis
    only (else []). The trips: rows out ([e x T_local, d] in the compute dtype, with their
    expert id and gate: 8 bytes a row), reconstructions back, and the backward's
    reconstruction gradients out again. The [E] send sizes' all_gather is in the compiled
    HLO already."""
    if not s.exchanged:
        return []
    row = s.d * jnp.dtype(s.compute_dtype).itemsize
    dt = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(s.compute_dtype, "?")
    shape = f"{dt}[{s.local_rows},{s.d}] (estimate)"
    trips = [("tokens out (+ expert id, gate)", row + 8), ("reconstructions back", row),
             ("backward: their gradients", row)]  # fmt: skip
    return [
        Collective("ragged-all-to-all", name, shape, s.local_rows * size, s.expert)
        for name, size in trips
    ]


def expert_flops(latents: int, d: int, k: int, dense: bool) -> tuple[float, float]:
    """(encoder, decoder) matmul FLOPs per row, forward and backward, of an expert of
    `latents` latents that picks `k` active latents. Dense kernel: pre-activations with their
    weight gradient (4 L d) and the codes [., L] @ W_dec with both gradients (6 L d); gather
    kernel: gradient-free pre-activations (2 L d) and the k gathered encoder and decoder rows
    with grad (6 k d each). A global TopK's two passes (dispatch/global_topk.py) cost the
    same: the candidates' pass is the forward's pre-activation matmul, and the chosen pass
    reuses its values (its own matmul is dead code) but for the weight gradient."""
    ld, kd = latents * d, k * d
    if dense:
        return 4.0 * ld, 6.0 * ld
    return 2.0 * ld + 6.0 * kd, 6.0 * kd


def flops_per_token(s: Shapes, auxk: bool) -> dict[str, float]:
    """Matmul FLOPs per input token of the forward and backward pass (2 per multiply-add),
    plus the elementwise update of the local expert shards (replicated over 'data', or
    split over it under ZeRO-1). A token runs as e = experts_per_token rows, one per routed
    expert (L latents each), each row with the k - shared_k slots the global TopK fills
    (`expert_flops`; with e > 1 most slots of a row hold zeros, but the kernel runs them all);
    a shared dictionary of S latents runs densely on every token with its shared_k
    (`shared`). Expert work is per computed row, so it is scaled by rows / T_local: slots
    (e, the capacity factor and rounding), or dropless e x T_local + N_local x B. Dropless
    runs each block again in the backward (its custom VJP keeps only the block's outputs):
    the top-k and latents are reused, so only what the gradient needs beyond them runs
    again, with AuxK its decode (for the frozen residual) and AuxK's forward: `recompute`
    (0 without AuxK). The router's backward reaches w_router and b_router."""
    routed_k = s.per_row
    pad, aux_on = s.computed_rows / s.local_tokens, auxk and s.k_aux > 0
    enc, dec = expert_flops(s.latents, s.d, routed_k, s.dense)
    aux_ld = s.latents * s.d * s.aux_share  # AuxK's columns: its largest dead bucket, per row
    decode = 2.0 * s.latents * s.d if s.dense else 2.0 * routed_k * s.d
    again = decode + 4 * aux_ld if aux_on else 0.0  # the decode + AuxK's forward
    shared = 0.0
    if s.shared_latents:
        dense = use_dense(s.shared_kernel, s.shared_latents)
        shared = sum(expert_flops(s.shared_latents, s.d, s.shared_k, dense))
    params = (s.num_latents + s.shared_latents) * s.d
    terms = {
        "router": 6.0 * s.d * s.num_experts if s.num_experts > 1 else 0.0,
        "encoder": pad * enc,
        "decoder": pad * dec,
        "shared": shared,
        "auxk": pad * 10 * aux_ld if aux_on else 0.0,
        "recompute": pad * again if s.dropless else 0.0,
        "update": UPDATE_FLOPS_PER_PARAM * 2 * params * (1 if s.zero else s.data) / s.batch,
        **kind_flops(s),
    }
    terms["total"] = sum(terms.values())
    if s.kind.learned_threshold:  # compiled into every step, run at step 0 only
        terms["step0_calibration"] = calibration_flops(s)
    return terms


def kind_flops(s: Shapes) -> dict[str, float]:
    """The activation kind's own FLOPs per token, beside the expert matmuls at k' per row
    (`flops_per_token`): the batch threshold's THRESHOLD_BITS counts over every row's k'
    candidates (a compare and an add each) and Matryoshka's prefix decodes: one dense
    product of the codes below the last prefix end m, [., m] @ W_dec[:m], with both
    gradients (6 m d) on every computed row, whatever the kernel. Only the terms a kind has
    (none for topk and jumprelu)."""
    terms = {}
    if s.kind.batch:
        terms["threshold"] = 2.0 * THRESHOLD_BITS * s.per_row * s.experts_per_token
    if s.prefixes:  # one dense decode of the m latents below the last prefix end
        terms["prefixes"] = s.computed_rows / s.local_tokens * 6.0 * s.prefix_latents * s.d
    return terms


def calibration_flops(s: Shapes) -> float:
    """JumpReLU's step 0 (training/step.first_thresholds): the model's forward in mode
    'batch' (a BatchTopK of K over the batch, no gradient) sets the first thresholds. It is
    a branch of a lax.cond in every compiled step, which XLA's cost analysis counts; it runs
    once. Per token: the router, the candidates pass's pre-activations (2 L d a computed
    row) and the threshold's counts; only the threshold is used, so XLA drops the chosen
    pass (its decode) as dead code."""
    pad = s.computed_rows / s.local_tokens
    router = 2.0 * s.d * s.num_experts if s.num_experts > 1 else 0.0
    threshold = 2.0 * THRESHOLD_BITS * s.per_row * s.experts_per_token
    return router + pad * 2.0 * s.latents * s.d + threshold


def threshold_psums(s: Shapes) -> dict | None:
    """The batch threshold's collectives per step and device (kernels/activations.kth_largest):
    THRESHOLD_BITS scalar int32 psums over every device, one per bit of the bisection, each
    after a count over the device's [e x T_local, k'] candidates: bytes tiny, a latency term.
    None for the kinds without a batch threshold (jumprelu runs them at step 0 only)."""
    if not s.kind.batch:
        return None
    return {"collectives": THRESHOLD_BITS, "op": "all-reduce", "shape": "s32[]",
            "bytes": THRESHOLD_BITS * 4, "group_size": s.devices,
            "counted_rows": s.local_rows, "candidates_per_row": s.per_row}  # fmt: skip


def kind_exchanges(s: Shapes) -> list[Collective]:
    """The all-to-alls a batch kind adds to capacity dispatch across 'expert' devices, per
    step and device: the candidates pass returns each slot's k' values (float32) and ids
    (int32) to the tokens' devices, and the chosen pass sends the kept ones back to the
    experts, [slots, k'] each way. The token rows themselves cross once: XLA computes the
    two passes' identical all-to-all of the tokens once (read in the compiled HLO,
    tests/test_plan_kinds.py). [] for the other kinds, dropless, or one 'expert' device."""
    if not s.kind.batch or s.dropless or s.expert == 1:
        return []
    shape = f"f32[{s.slots},{s.per_row}], s32[{s.slots},{s.per_row}] (estimate)"
    size = s.slots * s.per_row * (F32 + 4)
    trips = ("candidates back (values, ids)", "chosen out (ids, values)")
    return [Collective("all-to-all", name, shape, size, s.expert) for name in trips]


def training_flops_per_token(cfg: SAEConfig, tcfg: TrainConfig, auxk: bool = False) -> float:
    """Analytic training FLOPs per token of a run on one device (`flops_per_token`'s total;
    by default the step without AuxK, whose cost depends on how many latents are dead)."""
    return flops_per_token(Shapes.of(cfg, tcfg, (1, 1), "cpu"), auxk)["total"]
