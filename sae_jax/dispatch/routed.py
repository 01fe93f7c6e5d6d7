"""What every dispatch path takes and returns.

A path is `run(routed, params, dead_ids, settings) -> TokenOut`:

    routed    Routed: the tokens as the router sent them (centred, with expert and gate)
    params    ExpertParams with [N_local, ...] leaves: the experts on this device
    dead_ids  [N_local, B] int32 AuxK dead latent ids padded with L (kernels.auxk.compact_dead),
              or None (no AuxK)
    settings  ExpertSettings: k, k_aux, kernel, dtype, and the path's own block size,
              capacity factor or 'expert' mesh axis

Inside `jax.shard_map` everything is one device's share: T_local tokens, its N_local experts.
`E` is always the number of devices on the 'expert' mesh axis (N = E x N_local).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax

from sae_jax.kernels.records import ExpertParams, ExpertSettings


class Routed(NamedTuple):
    """Tokens as routed, on the device that routed them."""

    x: jax.Array  # [T, d] tokens centred (x - b_dec) in the compute dtype (kernels.expert.centre)
    expert: jax.Array  # [T] int32 routed expert (a global id in [0, N))
    gate: jax.Array  # [T] float32 router probability of the routed expert
    b_dec: jax.Array  # [d] the centre, passed along for its encoder gradient
    # (indices, values) [T, k] chosen by a global TopK (dispatch/global_topk.py), sent with the
    # rows to their experts, which then decode these instead of their own top-k; None: top-k.
    chosen: tuple[jax.Array, jax.Array] | None = None


class TokenOut(NamedTuple):
    """The experts' results brought back to the tokens, whatever the path."""

    recon: jax.Array  # [T, d] float32 ungated decoder output (zeros for dropped tokens)
    kept: jax.Array  # [T] bool, False where the token was dropped
    fired: jax.Array  # [N_local, L] float32 tokens on which each local latent fired
    l0_sum: jax.Array  # [] active latents summed over kept tokens
    aux_err: jax.Array  # [] AuxK squared error sum
    aux_norm: jax.Array  # [] AuxK residual norm sum
    rows: jax.Array  # [] float32 token rows the experts computed, padding included
    # Brought back only in the stages of a global TopK (ExpertSettings.encode_only, aux_out):
    latents: jax.Array | None = None  # [T, k] float32 each row's top-k candidate values
    indices: jax.Array | None = None  # [T, k] int32 their latent ids in the row's expert
    aux_recon: jax.Array | None = None  # [T, d] float32 gated AuxK reconstruction
    kind_sums: jax.Array | None = None  # [S] the activation kind's sums (ExpertOut.kind_sums)
    threshold: jax.Array | None = None  # [] BatchTopK's threshold of this batch (global_topk)


DispatchPath = Callable[[Routed, ExpertParams, "jax.Array | None", ExpertSettings], TokenOut]
