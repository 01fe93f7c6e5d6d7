"""The activation kinds of the experts: which latents of a routed row are active.

    topk        the k largest pre-activations of each row (Gao et al. 2024), ReLU'd
    batchtopk   the k x T largest candidate activations of the whole batch of T tokens
                (Bussmann et al. 2024), across every device; at inference a JumpReLU with
                one threshold, the training batches' thresholds averaged
    matryoshka  batchtopk, with nested prefixes of each expert's latents that each
                reconstruct the input on their own, their losses summed (Bussmann et al. 2025)
    jumprelu    z = pre * H(pre - theta_l), a learned threshold per latent, straight-through
                gradients with a rectangle kernel of bandwidth eps, and an L0 penalty towards
                K (Rajamanoharan et al. 2024)

Every kind keeps a fixed number of candidates per row, [C, k'] ids and values, so the
dispatch paths and the kernels keep their static shapes: k' = k for TopK and k' = k_max (at
least k) for the others, whose rows are active on k latents on average but not exactly;
a row with more than k_max latents over its threshold keeps its k_max largest.
The batch threshold is a global quantity: `kth_largest` finds it exactly with a bisection
over the float bits, one count and one scalar psum per bit, so no device gathers the
[T, k'] candidates of the others. See docs/activations.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sae_jax.config import ACTIVATIONS, KINDS, Kind

__all__ = ["ACTIVATIONS", "KINDS", "Kind", "batch_keep", "jumprelu", "kth_largest", "step"]


def rectangle(u: jax.Array) -> jax.Array:
    """The JumpReLU paper's kernel K(u) = 1 on |u| < 1/2, else 0 (float32)."""
    return (jnp.abs(u) < 0.5).astype(jnp.float32)


@jax.custom_vjp
def jumprelu(pre: jax.Array, theta: jax.Array, bandwidth: jax.Array) -> jax.Array:
    """pre * H(pre - theta), elementwise. Gradients: H(pre - theta) for pre, and the
    straight-through -(theta / eps) K((pre - theta) / eps) for theta, with eps =
    bandwidth * theta (a bandwidth relative to each threshold; see docs/activations.md)."""
    return pre * (pre > theta)


def _jumprelu_fwd(pre, theta, bandwidth):
    return jumprelu(pre, theta, bandwidth), (pre, theta, bandwidth)


def _jumprelu_bwd(res, g):
    pre, theta, bandwidth = res
    eps = bandwidth * theta
    d_theta = -(theta / eps) * rectangle((pre - theta) / eps) * g
    return (pre > theta) * g, d_theta, jnp.zeros_like(bandwidth)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@jax.custom_vjp
def step(pre: jax.Array, theta: jax.Array, bandwidth: jax.Array) -> jax.Array:
    """H(pre - theta) as float32, the L0 of a JumpReLU. Gradient only for theta, the
    straight-through -(1 / eps) K((pre - theta) / eps), eps = bandwidth * theta."""
    return (pre > theta).astype(jnp.float32)


def _step_fwd(pre, theta, bandwidth):
    return step(pre, theta, bandwidth), (pre, theta, bandwidth)


def _step_bwd(res, g):
    pre, theta, bandwidth = res
    eps = bandwidth * theta
    d_theta = -(1.0 / eps) * rectangle((pre - theta) / eps) * g
    return jnp.zeros_like(pre), d_theta, jnp.zeros_like(bandwidth)


step.defvjp(_step_fwd, _step_bwd)


def kth_largest(values: jax.Array, count: jax.Array | int, axes: tuple[str, ...] = ()) -> jax.Array:
    """The count-th largest of the non-negative float32 `values` of every device on the mesh
    `axes` (inside jax.shard_map; () outside), exactly, without gathering them: a bisection
    over the 31 bits of their float32 patterns (monotone for non-negative floats), each bit
    one count of this device's values and one scalar psum. 0 when fewer than `count` values
    are positive. Returns [] float32, the same on every device."""
    bits = jax.lax.bitcast_convert_type(jnp.maximum(values, 0.0).astype(jnp.float32), jnp.int32)

    def try_bit(i, answer):
        candidate = answer | jnp.left_shift(jnp.int32(1), 30 - i)
        above = jnp.sum(bits >= candidate, dtype=jnp.int32)
        if axes:
            above = jax.lax.psum(above, axes)
        return jnp.where(above >= count, candidate, answer)

    answer = jax.lax.fori_loop(0, 31, try_bit, jnp.int32(0))
    return jax.lax.bitcast_convert_type(answer, jnp.float32)


def batch_keep(
    values: jax.Array, per_token: int, tokens: jax.Array | int, axes: tuple[str, ...] = ()
) -> tuple[jax.Array, jax.Array]:
    """BatchTopK: of the candidate activations `values` [R, k'] (>= 0; zero where none) of
    every device on `axes`, keep the per_token x tokens largest (ties at the threshold all
    kept). tokens: the tokens of the whole batch. Returns (values with the rest zeroed,
    the threshold [] float32, the smallest kept value)."""
    theta = kth_largest(jax.lax.stop_gradient(values), per_token * tokens, axes)
    keep = (values >= theta) & (values > 0)
    return jnp.where(keep, values, 0.0), theta
