"""Duplicate features: latents whose decoder rows point the same way (cosine > 0.9).

`count_duplicates` counts, for a decoder [N, L, d], the latents that have such a partner in
ANOTHER expert (cross-expert duplicates: features learnt twice because the router sends
similar tokens to different experts) and, apart, those with one in their OWN expert. It
streams over blocks of rows: memory O(block x M) for M = N x L latents, never [M, M].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

DUPLICATE_COSINE = 0.9
BLOCK_ROWS = 2048


@functools.partial(jax.jit, static_argnames="latents")
def _block_flags(
    rows: jax.Array, ids: jax.Array, unit: jax.Array, threshold: jax.Array, latents: int
) -> tuple[jax.Array, jax.Array]:
    """([B] cross, [B] within) flags of a block of unit rows [B, d] with global ids [B]
    against every unit row [M, d] (latent i belongs to expert i // latents)."""
    sims = rows @ unit.T  # [B, M]
    close = sims > threshold
    other = jnp.arange(unit.shape[0])[None, :]
    same_expert = (ids[:, None] // latents) == (other // latents)
    cross = jnp.any(close & ~same_expert, axis=1)
    within = jnp.any(close & same_expert & (ids[:, None] != other), axis=1)
    return cross, within


def unit_rows(w_dec: np.ndarray) -> np.ndarray:
    """[N, L, d] -> [N x L, d] float32 rows of norm 1 (zero rows stay zero)."""
    flat = np.asarray(w_dec, np.float32).reshape(-1, np.shape(w_dec)[-1])
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)


def duplicate_flags(
    w_dec: np.ndarray, threshold: float = DUPLICATE_COSINE, block: int = BLOCK_ROWS
) -> tuple[np.ndarray, np.ndarray]:
    """([M] cross, [M] within) bool flags of the decoder rows [N, L, d]: whether each latent
    has a partner with cosine > threshold in another expert / in its own expert. `block` rows
    at a time (the last block padded with zero rows, so that one compilation serves all)."""
    n, latents, _ = np.shape(w_dec)
    unit = jnp.asarray(unit_rows(w_dec))
    m = n * latents
    block = min(block, m)
    cross, within = np.zeros(m, bool), np.zeros(m, bool)
    limit = jnp.float32(threshold)
    for start in range(0, m, block):
        stop = min(start + block, m)
        ids = jnp.arange(start, start + block)
        rows = jnp.pad(unit[start:stop], ((0, block - (stop - start)), (0, 0)))
        c, w = _block_flags(rows, ids, unit, limit, latents)
        cross[start:stop] = np.asarray(c)[: stop - start]
        within[start:stop] = np.asarray(w)[: stop - start]
    return cross, within


def count_duplicates(
    w_dec: np.ndarray, threshold: float = DUPLICATE_COSINE, block: int = BLOCK_ROWS
) -> dict[str, float]:
    """Duplicate latents of the decoder rows [N, L, d]: `cross_expert` (with a partner of
    cosine > threshold in another expert; 0 for N = 1) and `within_expert` (in its own
    expert), as counts and as fractions of the `latents` M = N x L."""
    cross, within = duplicate_flags(w_dec, threshold, block)
    m = max(len(cross), 1)
    return {
        "latents": len(cross),
        "cross_expert": int(cross.sum()),
        "cross_expert_fraction": float(cross.sum() / m),
        "within_expert": int(within.sum()),
        "within_expert_fraction": float(within.sum() / m),
        "threshold": threshold,
    }
