"""The choice of dispatch path: one table from the configuration to the path that runs.

Every path has the signature of dispatch/routed.py (`DispatchPath`):

    capacity                  [N, C, d] buffers; across devices an all_to_all of them
    dropless, one device      tokens sorted into blocks of one expert each (dropless.run)
    dropless, ragged_dot      one device, `jax.lax.ragged_dot` grouped matmuls (TPU)
    dropless, across devices  a ragged all-to-all of the routed rows, then blocks

Across devices the ragged_dot path is not used: its [R, L] pre-activations would cover the
receive buffer's worst case (R = E x T_local rows), where the blocks run only what arrived.
"""

from __future__ import annotations

import jax

from sae_jax.config import SAEConfig
from sae_jax.dispatch import capacity, dropless, ragged_dot
from sae_jax.dispatch.routed import DispatchPath
from sae_jax.kernels.records import use_dense

# (SAEConfig.dispatch, grouped matmul, experts split over devices) -> path.
PATHS: dict[tuple[str, str, bool], DispatchPath] = {
    ("capacity", "blocks", False): capacity.run,
    ("capacity", "ragged_dot", False): capacity.run,
    ("capacity", "blocks", True): capacity.run,
    ("capacity", "ragged_dot", True): capacity.run,
    ("dropless", "blocks", False): dropless.run,
    ("dropless", "ragged_dot", False): ragged_dot.run,
    ("dropless", "blocks", True): dropless.run_exchanged,
    ("dropless", "ragged_dot", True): dropless.run_exchanged,
}


def choose(cfg: SAEConfig, expert_devices: int) -> DispatchPath:
    """The path for `cfg` with experts split over `expert_devices` devices (1: all local).
    A global TopK over several experts (experts_per_token > 1) runs in two stages
    (dispatch/global_topk.py) that the ragged_dot path does not have, nor the other activation
    kinds' rules (kernels/activations.py): they use blocks."""
    plain = cfg.experts_per_token == 1 and cfg.activation == "topk"
    matmul = grouped_matmul(cfg) if plain else "blocks"
    return PATHS[(cfg.dispatch, matmul, expert_devices > 1)]


def grouped_matmul(cfg: SAEConfig, backend: str | None = None) -> str:
    """'ragged_dot' or 'blocks' for dropless experts that are all on one device:
    SAEConfig.grouped_matmul, whose 'auto' is ragged_dot only on TPU with the dense kernel.
    XLA:CPU runs ragged_dot as a dense product over all N groups, and XLA:GPU, with the
    versions we pin, may too (N times the FLOPs, [N, T, .] temporaries): on both the block
    path runs until `python -m launch.devcheck` measures ragged_dot faster on the device.
    backend: 'cpu', 'gpu' or 'tpu' (default: jax.default_backend())."""
    if cfg.grouped_matmul != "auto":
        return cfg.grouped_matmul
    dense = use_dense(cfg.expert_kernel, cfg.latents_per_expert)
    return "ragged_dot" if dense and (backend or jax.default_backend()) == "tpu" else "blocks"
