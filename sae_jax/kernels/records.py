"""The records every expert kernel and dispatch path passes: an expert's weights, a buffer of
its rows, how experts run, and what they return."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax

DENSE_MAX_LATENTS = 1024


class ExpertParams(NamedTuple):
    """One expert's weights ([L, d], [L]) or, with a leading axis, N experts' ([N, L, d])."""

    w_enc: jax.Array  # [L, d] encoder rows (the transpose of the paper's W_enc)
    b_enc: jax.Array  # [L]
    w_dec: jax.Array  # [L, d] unit-norm decoder rows
    # [L] each latent's threshold for the 'jump' rule (kernels/activations.py); None: TopK
    threshold: jax.Array | None = None


class ExpertRows(NamedTuple):
    """A buffer of rows an expert runs on ([C, ...]; [N, C, ...] for N experts' buffers)."""

    x: jax.Array  # [C, d] tokens, centred (x - b_dec) in the compute dtype (kernels.expert.centre)
    gate: jax.Array  # [C] float32 router probability of the expert (scales AuxK's output)
    valid: jax.Array  # [C] bool, False for rows that hold no token
    # (indices [C, k] int32, values [C, k] float32) chosen before (global TopK over a token's
    # experts, dispatch/global_topk.py): used instead of the expert's own top-k; None: top-k.
    chosen: tuple[jax.Array, jax.Array] | None = None


@dataclasses.dataclass(frozen=True)
class ExpertSettings:
    """How every expert runs, and how a dispatch path brings it its tokens (static).

    k, k_aux, kernel and dtype are the kernels'; block_size, capacity_factor and expert_axis
    are the dispatch paths' (sae_jax/dispatch/), each path reading the ones it needs.
    """

    k: int  # active latents per token
    k_aux: int = 0  # AuxK's latents per token (0: no AuxK)
    kernel: str = "auto"  # 'dense', 'gather' or 'auto' (dense up to DENSE_MAX_LATENTS)
    dtype: str = "float32"  # compute dtype of the matmuls and the dispatched buffers
    block_size: int = 0  # dropless: rows per block (0: dispatch.dropless.auto_block_size)
    capacity_factor: float = 1.0  # capacity dispatch: C = ceil(cf * T / N)
    expert_axis: str | None = None  # the mesh axis experts are split over (in jax.shard_map)
    # Stages of the global TopK (dispatch/global_topk.py): encode_only returns each row's
    # top-k candidates (no decode, no AuxK, no gradient); aux_out returns AuxK's gated
    # reconstruction per row (ExpertOut.aux_recon) for the caller to compare with the whole
    # token's residual, instead of summing AuxK's error against this row's own.
    encode_only: bool = False
    aux_out: bool = False
    # The activation (kernels/activations.py): 'topk' keeps each row's k largest; 'jump'
    # keeps, of its k largest pre - threshold, those over the threshold (k is then k_max).
    rule: str = "topk"
    bandwidth: float = 0.1  # 'jump': the straight-through kernel's width, x the threshold
    # 'jump' with a threshold on gated values (BatchTopK's, set on gate x pre): a row keeps
    # the latents whose gate x pre passes it, i.e. pre > threshold / gate.
    gated_threshold: bool = False
    # Matryoshka: the ends of the nested prefixes of each expert's latents, the whole
    # dictionary excluded; each prefix's squared error comes back in ExpertOut.kind_sums.
    prefixes: tuple[int, ...] = ()

    def dense(self, latents: int) -> bool:
        """Whether experts of `latents` latents use the dense kernel (else gather)."""
        return use_dense(self.kernel, latents)


class ExpertOut(NamedTuple):
    """One expert's results on one buffer ([C, ...]; [N, C, ...] for N buffers)."""

    recon: jax.Array  # [C, d] ungated decoder output W_dec^T z (no b_dec)
    latents: jax.Array  # [C, k] post-ReLU values of the chosen latents
    indices: jax.Array  # [C, k] int32 latent ids inside the expert
    fired: jax.Array  # [L] float32 count of valid rows on which each latent fired
    aux_err: jax.Array  # [] sum over valid rows of ||residual - aux recon||^2
    aux_norm: jax.Array  # [] sum over valid rows of ||residual||^2
    aux_recon: jax.Array | None = None  # [C, d] gated AuxK reconstruction (settings.aux_out)
    # The 'jump' rule: [C, k] the chosen latents' pre-activations (a backward's `chosen`).
    selected: jax.Array | None = None
    # [S] sums over valid rows the kind's loss needs (None: none): JumpReLU's L0 with its
    # straight-through gradient [1], Matryoshka's prefix squared errors [len(prefixes)].
    kind_sums: jax.Array | None = None


def routed_kernel(kernel: str, experts_per_token: int) -> str:
    """The kernel the routed experts use: with a global TopK over e > 1 experts, 'auto' is
    'gather' (the candidates' pass computes the values, so the dense kernel's one advantage,
    reading them off its own pre-activation matmul, is gone; measured faster in
    docs/routing.md), else the setting itself."""
    return "gather" if kernel == "auto" and experts_per_token > 1 else kernel


def use_dense(kernel: str, latents: int) -> bool:
    """kernel: one of config.EXPERT_KERNELS (validated by SAEConfig)."""
    return kernel == "dense" or (kernel == "auto" and latents <= DENSE_MAX_LATENTS)
