"""Grouped (sorted, block-padded) expert computation and the inference encode built on it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import jaxpr_shapes
from reference import switch_sae, topk_sae_token

from sae_jax.dispatch import blocks, capacity
from sae_jax.pretrained import PretrainedSAE

N, D, LAT, K = 8, 16, 6, 2


def routed_sae(seed: int = 0) -> PretrainedSAE:
    """N experts whose router sends 10 * e_i + noise to expert i (d >= N basis directions)."""
    rng = np.random.default_rng(seed)
    tensors = {
        "w_enc": rng.normal(size=(N, LAT, D)).astype(np.float32),
        "b_enc": (rng.normal(size=(N, LAT)) * 0.1).astype(np.float32),
        "w_dec": rng.normal(size=(N, LAT, D)).astype(np.float32),
        "b_dec": (rng.normal(size=D) * 0.1).astype(np.float32),
        "w_router": np.eye(D, N, dtype=np.float32),
        "b_router": np.zeros(D, np.float32),
    }
    meta = {"d": D, "num_latents": N * LAT, "num_experts": N, "k": K}
    return PretrainedSAE(tensors, meta)


def tokens_for(experts: np.ndarray, seed: int = 1) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(len(experts), D)).astype(np.float32)
    x[np.arange(len(experts)), experts] += 10.0
    return x


def routings() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    skewed = np.where(rng.random(200) < 0.9, 3, rng.integers(0, N, 200))
    return {
        "balanced": np.arange(200) % N,
        "one_expert_90pct": skewed,
        "empty_experts": rng.choice([0, 5, 6], 200),
        "one_token": np.array([4]),
    }


@pytest.mark.parametrize("name", list(routings()))
@pytest.mark.parametrize("block_size", [None, 1, 64])
def test_encode_equals_per_token_reference(name, block_size):
    experts = routings()[name]
    if name == "one_expert_90pct":
        assert np.mean(experts == 3) > 0.85
    sae = routed_sae()
    x = tokens_for(experts)
    codes = sae.encode(x, block_size=block_size)
    np.testing.assert_array_equal(codes.expert, experts)
    p = {k: np.asarray(v) for k, v in sae.params.items()}
    x_hat, ref_expert, ref_gate = switch_sae(x, p, K)
    np.testing.assert_array_equal(ref_expert, experts)
    np.testing.assert_allclose(codes.gate, ref_gate, rtol=1e-6)
    for t in range(len(x)):
        e = experts[t]
        _, z = topk_sae_token(x[t] - p["b_dec"], p["w_enc"][e], p["b_enc"][e], p["w_dec"][e],
                              np.zeros(D), K)  # fmt: skip
        dense = np.zeros(N * LAT, np.float32)
        dense[np.asarray(codes.indices[t])] = codes.values[t]
        np.testing.assert_allclose(dense[e * LAT : (e + 1) * LAT], z, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sae(x), x_hat, rtol=1e-5, atol=1e-5)


def test_plan_blocks_layout():
    expert = jnp.array([2, 0, 2, 2, 0, 2, 2], jnp.int32)  # counts 2, 0, 5
    plan = blocks.plan_blocks(expert, num_experts=3, block_size=2)
    assert plan.valid.shape == (blocks.max_blocks(7, 3, 2), 2) == (7, 2)
    # expert 0 -> block 0; expert 1 has none; expert 2 -> blocks 1..3 (5 tokens, 1 padding row)
    np.testing.assert_array_equal(plan.block_expert[:4], [0, 2, 2, 2])
    np.testing.assert_array_equal(plan.block_used, [True] * 4 + [False] * 3)
    np.testing.assert_array_equal(plan.row, [2, 0, 3, 4, 1, 5, 6])  # stable within a group
    assert int(plan.valid.sum()) == 7 and not plan.valid[3, 1]


def test_grouped_apply_values_and_gradients():
    """A generic per-block function (a per-expert linear map) and its gradients with
    respect to the weights and the tokens equal the per-token computation."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(N, D, 3)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(50, D)), jnp.float32)
    expert = jnp.asarray(rng.choice([1, 2, 7], 50), jnp.int32)

    def block_fn(w_e, xb, valid):
        return jnp.tanh(xb @ w_e) * valid[:, None]

    def grouped_loss(w, x):
        y = blocks.grouped_apply(block_fn, w, x, expert, num_experts=N, block_size=4)
        return jnp.sum(y**2), y

    def per_token_loss(w, x):
        y = jnp.tanh(jnp.einsum("td,tdo->to", x, w[expert]))
        return jnp.sum(y**2), y

    (_, y), grads = jax.value_and_grad(grouped_loss, argnums=(0, 1), has_aux=True)(w, x)
    (_, y_ref), grads_ref = jax.value_and_grad(per_token_loss, argnums=(0, 1), has_aux=True)(w, x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(grads[0][0]).max()) == 0.0  # expert 0 had no tokens


def _over_budget(shapes, tokens: int, rows: int, width: int) -> list:
    """Arrays larger than `rows` padded rows of `width`, or holding both a T and an N axis
    beyond a [T, N] router matrix."""
    return [s for s in shapes if np.prod(s) > rows * width or (tokens in s and N in s and
                                                                len(s) > 2)]  # fmt: skip


def test_encode_builds_no_experts_by_tokens_array():
    tokens, block = 200, 8
    sae = routed_sae()
    x = jnp.zeros((tokens, D), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda x: sae.encode(x, block_size=block))(x).jaxpr
    rows = blocks.max_blocks(tokens, N, block) * block  # <= T + N * B = 264, not N * T = 1600
    shapes = jaxpr_shapes(jaxpr)
    assert (block, LAT) in shapes  # the per-block pre-activations
    assert not _over_budget(shapes, tokens, rows, max(D, LAT)), _over_budget(
        shapes, tokens, rows, max(D, LAT)
    )
    # The check does catch dispatch with a capacity of every token ([N, T, d] buffers).
    expert = jnp.zeros(tokens, jnp.int32)

    def capacity_dispatch(x):
        return capacity.to_buffers(x, expert, capacity.assign_slots(expert, N), N, tokens)

    assert _over_budget(jaxpr_shapes(jax.make_jaxpr(capacity_dispatch)(x).jaxpr), tokens, rows, D)
