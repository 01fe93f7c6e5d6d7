"""AuxK (Gao et al. 2024) on an expert's dead latents: reconstruct the residual x - x_hat
with the top-k_aux latents that have not fired for a while, so they get a gradient again.

AuxK runs on each expert's dead latents only: their ids, compacted on device to one of a few
static sizes B (`dead_buckets`, chosen on the host from lagged counts, see training/step.py),
give [C, B] pre-activations, a top-k_aux among them and a [C, B] x [B, d] decode, so its cost
follows the number of dead latents; a step with none compiles no AuxK. B is capped at a
share of the expert's latents (`max_bucket`, TrainConfig.aux_max_share): with more dead
latents than that, each step takes B of them, starting at a latent id that moves by B every
step, so all of them take turns and AuxK never costs more than a fixed share of the step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sae_jax import precision
from sae_jax.kernels.records import ExpertParams, ExpertRows, ExpertSettings

# The static sizes a compacted dead set is padded to: AUX_MIN_BUCKET x powers of AUX_BUCKET_GROWTH.
AUX_MIN_BUCKET, AUX_BUCKET_GROWTH = 16, 4


def dead_buckets(latents: int) -> tuple[int, ...]:
    """The static sizes a compacted dead set is padded to: AUX_MIN_BUCKET times powers of
    AUX_BUCKET_GROWTH below `latents`, then `latents` itself (a handful of compiled steps)."""
    sizes, size = [], AUX_MIN_BUCKET
    while size < latents:
        sizes.append(size)
        size *= AUX_BUCKET_GROWTH
    return (*sizes, latents)


def max_bucket(latents: int, max_share: float = 1.0) -> int:
    """The largest bucket AuxK may use: the largest of `dead_buckets(latents)` within
    max_share * latents (at least the smallest bucket)."""
    fits = [b for b in dead_buckets(latents) if b <= max_share * latents]
    return max(fits, default=dead_buckets(latents)[0])


def bucket_for(dead_count: int, latents: int, max_share: float = 1.0) -> int:
    """The smallest of `dead_buckets(latents)` that holds `dead_count` dead latents, capped at
    `max_bucket(latents, max_share)`; 0 for none."""
    if dead_count <= 0:
        return 0
    fits = next(b for b in dead_buckets(latents) if b >= dead_count)
    return min(fits, max_bucket(latents, max_share))


def compact_dead(dead: jax.Array, size: int, start: jax.Array | int = 0) -> jax.Array:
    """Dead masks [N, L] bool -> [N, size] int32: each expert's first `size` dead latent ids
    counting cyclically from latent `start` (the same for every expert), padded with L."""
    lat = dead.shape[-1]
    rolled = jnp.roll(dead, -start, axis=-1)
    ids = jax.vmap(lambda m: jnp.nonzero(m, size=size, fill_value=lat)[0])(rolled)
    return jnp.where(ids < lat, (ids + start) % lat, lat).astype(jnp.int32)


def auxk_sums(
    p: ExpertParams, buf: ExpertRows, dead_ids: jax.Array, recon: jax.Array, s: ExpertSettings
) -> tuple[jax.Array, jax.Array]:
    """`_auxk_sums` under the name scope 'auxk', so that profiles (launch/step_profile.py)
    can tell its ops, forward and backward, from the expert's own."""
    with jax.named_scope("auxk"):
        return _auxk_sums(p, buf, dead_ids, recon, s)


def _auxk_sums(
    p: ExpertParams, buf: ExpertRows, dead_ids: jax.Array, recon: jax.Array, s: ExpertSettings
) -> tuple[jax.Array, jax.Array]:
    """AuxK on one expert: reconstruct the frozen residual x - x_hat with its top-k_aux dead
    latents. Returns the sums over valid tokens of ||residual - aux||^2 and ||residual||^2,
    both 0 when this expert has no dead latent (tokens of experts without dead latents do not
    dilute the normalised loss).

    buf: the expert's buffer ([C, d] centred tokens, [C] gate, [C] valid; the aux output is
    gated like the main one); dead_ids: [B] int32 dead latent ids padded with L (see
    `compact_dead`); recon: [C, d] the ungated main reconstruction. Only the expert weights
    get a gradient: the residual, gate and b_dec are constants.
    """
    xc, gate, valid = buf.x, buf.gate, buf.valid
    g = jax.lax.stop_gradient(gate[:, None])
    residual = jax.lax.stop_gradient(xc.astype(jnp.float32) - g * recon)
    aux_recon, has_dead = auxk_recon(p, buf, dead_ids, s)
    validf = valid.astype(jnp.float32)[:, None] * has_dead
    return jnp.sum(validf * (residual - aux_recon) ** 2), jnp.sum(validf * residual**2)


def auxk_recon(
    p: ExpertParams, buf: ExpertRows, dead_ids: jax.Array, s: ExpertSettings
) -> tuple[jax.Array, jax.Array]:
    """The gated AuxK reconstruction [C, d] float32 of one expert's rows by its top-k_aux dead
    latents, and whether the expert has any dead latent ([] bool).

    Only the B dead columns are computed: their [C, B] pre-activations, top-k_aux over them
    (none needed when B <= k_aux) and the decode through their B rows, so the cost is
    proportional to the bucket B, not to L. The tokens and the gate are constants.
    """
    k_aux, dtype = s.k_aux, s.dtype
    lat = p.w_enc.shape[0]
    ok = dead_ids < lat
    has_dead = jnp.any(ok)
    ids = jnp.where(ok, dead_ids, 0)
    xc, g = (jax.lax.stop_gradient(v) for v in (buf.x, buf.gate[:, None]))
    if ids.shape[0] < lat:  # the B dead rows, gathered
        w_enc, b_enc, w_dec = p.w_enc[ids], p.b_enc[ids], p.w_dec[ids]
    else:  # every latent: the weights as they are (a gather would copy them), dead ones masked
        w_enc, b_enc, w_dec = p.w_enc, p.b_enc, p.w_dec
        ok = jnp.zeros(lat, jnp.int32).at[ids].max(ok.astype(jnp.int32)) > 0
    pre = precision.einsum("cd,bd->cb", xc, w_enc, dtype) + b_enc  # [C, B]
    acts = jax.nn.relu(pre) * ok
    if k_aux < ids.shape[0]:  # keep each token's k_aux largest; the rest decode as zeros
        _, top = jax.lax.top_k(jax.lax.stop_gradient(acts), k_aux)
        rows = jnp.arange(acts.shape[0])[:, None]
        acts = acts * jnp.zeros_like(acts).at[rows, top].set(1.0)
    return g * precision.einsum("cb,bd->cd", acts, w_dec, dtype), has_dead
