"""The router (top-1, or top-e for routing beyond top-1) and the load-balancing loss."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
    probs: jax.Array  # [tokens, N] float32
    expert: jax.Array  # [tokens] int32, argmax expert
    gate: jax.Array  # [tokens] float32, probability of the chosen expert
    logits: jax.Array | None = None  # [tokens, N] float32 router logits (for the z-loss)


def router_logits(x: jax.Array, w_router: jax.Array, b_router: jax.Array) -> jax.Array:
    """W_router^T (x - b_router) in float32: [tokens, N] for x [tokens, d], w_router [d, N]."""
    return (x.astype(jnp.float32) - b_router.astype(jnp.float32)) @ w_router.astype(jnp.float32)


def z_sum(logits: jax.Array) -> jax.Array:
    """The router z-loss (ST-MoE, Zoph et al. 2022) summed over tokens: sum_t
    logsumexp(logits_t)^2, [] float32 (summable across devices; divide by the tokens)."""
    return jnp.sum(jnp.square(jax.nn.logsumexp(logits, axis=-1)))


def route(x: jax.Array, w_router: jax.Array, b_router: jax.Array) -> Routing:
    """p(x) = softmax(W_router^T (x - b_router)), computed in float32.

    x: [tokens, d]; w_router: [d, N]; b_router: [d].
    """
    logits = router_logits(x, w_router, b_router)
    probs = jax.nn.softmax(logits, axis=-1)
    expert = jnp.argmax(probs, axis=-1).astype(jnp.int32)
    gate = jnp.take_along_axis(probs, expert[:, None], axis=-1)[:, 0]
    return Routing(probs, expert, gate, logits)


def route_top(
    x: jax.Array,
    w_router: jax.Array,
    b_router: jax.Array,
    experts_per_token: int,
    bias: jax.Array | None = None,
) -> Routing:
    """Each token's e most probable experts: expert [T, e] int32 and gate [T, e] float32 (their
    router probabilities, most probable first); probs [T, N] as in `route`.

    bias: [N] added to the logits only to choose the experts (loss-free balancing); the gates
    stay the unbiased probabilities. With e = 1 and no bias the choice is `route`'s argmax.
    """
    logits = router_logits(x, w_router, b_router)
    probs = jax.nn.softmax(logits, axis=-1)
    scores = probs if bias is None else logits + jax.lax.stop_gradient(bias)
    _, expert = jax.lax.top_k(jax.lax.stop_gradient(scores), experts_per_token)
    gate = jnp.take_along_axis(probs, expert, axis=-1)
    return Routing(probs, expert.astype(jnp.int32), gate, logits)


def load_sums(routing: Routing, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """Per-expert token counts (every one of a token's e choices counts) and summed
    probabilities, both [N] (summable across devices)."""
    counts = jnp.zeros(num_experts, jnp.float32).at[routing.expert.reshape(-1)].add(1.0)
    return counts, routing.probs.sum(axis=0)


def load_balance_loss(
    counts: jax.Array, prob_sums: jax.Array, tokens: int | jax.Array
) -> jax.Array:
    """N * sum_i f_i P_i: f_i share of the token-to-expert assignments that went to i (each
    token makes e of them), P_i mean probability of i.

    Equals 1 for a uniform router; only f is piecewise constant, so the gradient reaches the
    router through P.
    """
    num_experts = counts.shape[0]
    counts = jax.lax.stop_gradient(counts)
    f = counts / jnp.maximum(jnp.sum(counts), 1.0)
    p = prob_sums / tokens
    return num_experts * jnp.sum(f * p)
