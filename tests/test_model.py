import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import jaxpr_shapes, random_model
from flax import nnx
from reference import auxk_sums, switch_mse, switch_sae, topk_sae_token

from sae_jax.config import ConfigError, SAEConfig, TrainConfig
from sae_jax.dispatch import capacity
from sae_jax.kernels import auxk
from sae_jax.kernels.routing import load_balance_loss
from sae_jax.model.losses import loss_and_metrics


@nnx.jit
def forward(model, x):
    """The module's forward, compiled once (op-by-op dispatch through shard_map is slow)."""
    return model(x)


def params_np(model) -> dict:
    return {k: np.asarray(v) for k, v in nnx.to_pure_dict(nnx.state(model)).items()}


@pytest.mark.parametrize("kernel", ["dense", "gather"])
def test_switch_matches_per_token_reference(mesh1, kernel):
    cfg = SAEConfig(
        d=16, num_latents=64, num_experts=4, k=5, k_aux=0, capacity_factor=4.0,
        expert_kernel=kernel,
    )  # fmt: skip
    model = random_model(cfg)
    x = np.random.default_rng(1).normal(size=(48, 16)).astype(np.float32)
    out = forward(model, jnp.asarray(x))
    ref_hat, ref_expert, ref_gate = switch_sae(x, params_np(model), cfg.k)
    assert bool(out.kept.all())
    assert len(set(ref_expert.tolist())) > 1, "the test must exercise several experts"
    np.testing.assert_array_equal(np.asarray(out.expert), ref_expert)
    np.testing.assert_allclose(np.asarray(out.gate), ref_gate, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out.x_hat), ref_hat, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel", ["dense", "gather"])
def test_gradients_match_per_token_reference(mesh1, kernel):
    # Tokens far from the origin and b_dec near their mean, as the geometric-median init puts
    # it: the centred encoder must still give b_dec (and every weight) the reference gradient.
    cfg = SAEConfig(
        d=16, num_latents=64, num_experts=4, k=5, k_aux=0, capacity_factor=4.0,
        expert_kernel=kernel,
    )  # fmt: skip
    model = random_model(cfg, seed=2)
    x = (5 + np.random.default_rng(3).normal(size=(32, 16))).astype(np.float32)
    model.b_dec[...] = jnp.asarray(x.mean(0) + 0.3)
    graphdef, state = nnx.split(model)

    def mse(state):
        out = nnx.merge(graphdef, state)(jnp.asarray(x))
        return loss_and_metrics(jnp.asarray(x), out, lb_alpha=0.0, aux_weight=0.0)[0]

    const = {name: np.asarray(v) for name, v in nnx.to_pure_dict(state).items()}
    grads = nnx.to_pure_dict(jax.jit(jax.grad(mse))(state))
    ref_grads = jax.jit(jax.grad(lambda p: switch_mse(x, p, const, cfg.k)))(const)
    assert set(grads) == set(ref_grads) == set(const)
    for name, ref_grad in ref_grads.items():
        assert np.abs(ref_grad).max() > 1e-4, name
        np.testing.assert_allclose(grads[name], ref_grad, rtol=1e-3, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("kernel", ["dense", "gather"])
def test_single_expert_is_a_topk_sae(mesh1, kernel):
    cfg = SAEConfig(d=12, num_latents=40, num_experts=1, k=6, k_aux=0, expert_kernel=kernel)
    model = random_model(cfg, seed=3)
    assert not hasattr(model, "w_router")
    x = np.random.default_rng(2).normal(size=(20, 12)).astype(np.float32)
    out = forward(model, jnp.asarray(x))
    p = params_np(model)
    for t in range(len(x)):
        ref, z = topk_sae_token(x[t], p["w_enc"][0], p["b_enc"][0], p["w_dec"][0], p["b_dec"], 6)
        np.testing.assert_allclose(np.asarray(out.x_hat[t]), ref, rtol=1e-4, atol=1e-5)
    assert bool(out.kept.all()) and np.allclose(np.asarray(out.gate), 1.0)


def test_capacity_drops_exactly_the_overflow(mesh1):
    cfg = SAEConfig(d=8, num_latents=32, num_experts=4, k=2, k_aux=0, capacity_factor=1.0)
    model = random_model(cfg, seed=5)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(64, 8)), jnp.float32)
    out = forward(model, x)
    cap = capacity.capacity(64, 4, 1.0)
    counts = np.bincount(np.asarray(out.expert), minlength=4)
    expected_drops = np.maximum(counts - cap, 0).sum()
    assert expected_drops > 0, "the router must overflow some expert for this test"
    assert int((~out.kept).sum()) == expected_drops
    # The first `cap` tokens of each expert are kept, in order; dropped ones give b_dec.
    expert = np.asarray(out.expert)
    for i in range(4):
        kept_i = np.asarray(out.kept)[expert == i]
        assert kept_i[: min(cap, len(kept_i))].all() and not kept_i[cap:].any()
    dropped = ~np.asarray(out.kept)
    np.testing.assert_allclose(
        np.asarray(out.x_hat)[dropped], np.broadcast_to(model.b_dec[...], (dropped.sum(), 8))
    )
    _, metrics = loss_and_metrics(x, out, lb_alpha=3.0, aux_weight=0.0)
    assert float(metrics["drop_fraction"]) == pytest.approx(expected_drops / 64)


def test_assign_slots_counts_earlier_tokens():
    expert = jnp.array([2, 0, 2, 2, 1, 0])
    np.testing.assert_array_equal(capacity.assign_slots(expert, 3), [0, 0, 1, 2, 0, 1])
    assert capacity.capacity(10, 4, 1.25) == 4


def test_load_balance_loss_is_one_for_uniform_router():
    tokens, n = 100, 8
    probs_sum = jnp.full((n,), tokens / n)
    for counts in (jnp.full((n,), tokens / n), jnp.zeros(n).at[0].set(tokens)):
        assert float(load_balance_loss(counts, probs_sum, tokens)) == pytest.approx(1.0)
    # A router that sends everything to expert 0 with certainty costs N.
    assert float(
        load_balance_loss(jnp.zeros(n).at[0].set(tokens), jnp.zeros(n).at[0].set(tokens), tokens)
    ) == pytest.approx(n)


def test_router_gets_gradient(mesh1):
    cfg = SAEConfig(d=16, num_latents=64, num_experts=4, k=4, k_aux=0, capacity_factor=4.0)
    model = random_model(cfg)
    graphdef, state = nnx.split(model)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(32, 16)), jnp.float32)

    def loss(state, lb_alpha):
        out = nnx.merge(graphdef, state)(x)
        return loss_and_metrics(x, out, lb_alpha=lb_alpha, aux_weight=0.0)[0]

    for lb_alpha in (0.0, 3.0):  # the gate scaling alone gives the router a gradient
        grads = nnx.to_pure_dict(jax.jit(jax.grad(loss), static_argnums=1)(state, lb_alpha))
        assert float(jnp.abs(grads["w_router"]).max()) > 1e-6
        assert float(jnp.abs(grads["b_router"]).max()) > 1e-6


@pytest.mark.parametrize("num_experts", [1, 8])
@pytest.mark.parametrize("kernel", ["dense", "gather"])
def test_no_tokens_by_latents_array_with_experts(mesh1, num_experts, kernel):
    tokens, m = 512, 2048
    cfg = SAEConfig(
        d=32, num_latents=m, num_experts=num_experts, k=8, k_aux=16, expert_kernel=kernel
    )
    graphdef, state = nnx.split(random_model(cfg))
    x = jnp.zeros((tokens, 32))
    dead = jnp.ones((num_experts, m // num_experts), bool)

    def loss(state):
        out = nnx.merge(graphdef, state)(x, dead)
        return loss_and_metrics(x, out, lb_alpha=3.0, aux_weight=1 / 32)[0]

    shapes = jaxpr_shapes(jax.make_jaxpr(jax.grad(loss))(state).jaxpr)
    big = [s for s in shapes if np.prod(s) >= tokens * m]
    if num_experts == 1:
        assert big, "the dense TopK SAE does build [tokens, M] pre-activations"
    else:
        assert any(m // 8 in s for s in shapes)  # per-expert [C, L] arrays exist
        assert not big, f"a [tokens, M]-sized array: {big}"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_latents=100, num_experts=8), "not divisible by NUM_EXPERTS"),
        (dict(num_latents=64, num_experts=4, k=17), "exceeds the latents per expert"),
        (dict(k=0), "K=0"),
        (dict(capacity_factor=0.0), "CAPACITY_FACTOR"),
    ],
)
def test_bad_model_config_is_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message) as e:
        SAEConfig(d=8, **kwargs).validate()
    assert "\n" not in str(e.value)


def _dead_masks() -> dict[str, np.ndarray]:
    """[4, 16] dead masks whose compacted sizes fall in each bucket of (4, 8, 16)."""
    rng = np.random.default_rng(6)
    one = np.zeros((4, 16), bool)
    one[2, 5] = True
    some = np.zeros((4, 16), bool)
    for e, count in enumerate((5, 6, 0, 8)):  # expert 2 has none: its tokens count for nothing
        some[e, rng.choice(16, count, replace=False)] = True
    return {"one": one, "some": some, "half": rng.random((4, 16)) < 0.5,
            "all": np.ones((4, 16), bool)}  # fmt: skip


def test_auxk_buckets_are_capped_and_the_dead_ids_take_turns():
    assert [auxk.bucket_for(n, 4608) for n in (0, 1, 17, 300, 4000)] == [0, 16, 64, 1024, 4096]
    # At most 1/32 of 4608 latents (144) -> the 64 bucket; never below the smallest bucket.
    assert [auxk.bucket_for(n, 4608, 1 / 32) for n in (1, 17, 300, 4000)] == [16, 64, 64, 64]
    assert auxk.max_bucket(576, 1 / 32) == 16 and auxk.max_bucket(64, 1.0) == 64
    with pytest.raises(ConfigError, match=r"^TrainConfig.aux_max_share=0 must lie in \(0, 1\]$"):
        TrainConfig(aux_max_share=0).validate()
    rng = np.random.default_rng(3)
    dead = rng.random((2, 100)) < 0.4
    dead[1] = False
    size = 16
    for start in (0, 37, 99):
        ids = np.asarray(auxk.compact_dead(jnp.asarray(dead), size, start))
        cyclic = [(start + i) % 100 for i in range(100) if dead[0][(start + i) % 100]]
        assert ids[0].tolist() == cyclic[:size] and ids[1].tolist() == [100] * size
    # Starts moving by `size` each step (as train_step does) reach every dead latent.
    seen = set()
    for step in range(-(-100 // size)):
        seen |= set(np.asarray(auxk.compact_dead(jnp.asarray(dead), size, step * size))[0])
    assert seen - {100} == set(np.flatnonzero(dead[0]))


@pytest.mark.parametrize(
    "case, kernel, bucket",
    [("one", "gather", 4), ("some", "dense", 8), ("half", "gather", 16), ("all", "dense", 16)],
)
def test_auxk_value_and_gradient_match_reference(mesh1, monkeypatch, case, kernel, bucket):
    # Buckets of 4, 8 and 16 dead ids per expert (k_aux = 6: 4 takes every dead latent, 8 and
    # 16 a top-k_aux among them).
    monkeypatch.setattr(auxk, "AUX_MIN_BUCKET", 4)
    monkeypatch.setattr(auxk, "AUX_BUCKET_GROWTH", 2)
    cfg = SAEConfig(
        d=16, num_latents=64, num_experts=4, k=4, k_aux=6, capacity_factor=4.0,
        expert_kernel=kernel,
    )  # fmt: skip
    graphdef, state = nnx.split(random_model(cfg, seed=5))
    x = np.random.default_rng(4).normal(size=(24, 16)).astype(np.float32)
    dead = _dead_masks()[case]
    assert auxk.bucket_for(int(dead.sum(axis=1).max()), 16) == bucket
    dead_ids = auxk.compact_dead(jnp.asarray(dead), bucket)

    @jax.jit
    def model_aux(state):
        out = nnx.merge(graphdef, state)(jnp.asarray(x), dead_ids)
        return out.aux_err, out.aux_norm

    const = {name: np.asarray(v) for name, v in nnx.to_pure_dict(state).items()}

    def ref_aux(params):
        return auxk_sums(x, params, const, dead, cfg.k, cfg.k_aux)

    (err, norm), (ref_err, ref_norm) = model_aux(state), ref_aux(const)
    assert abs(ref_err - ref_norm) > 1e-2, "the dead latents must reconstruct something"
    np.testing.assert_allclose([err, norm], [ref_err, ref_norm], rtol=1e-4)
    grads = nnx.to_pure_dict(jax.jit(jax.grad(lambda s: model_aux(s)[0]))(state))
    ref_grads = jax.jit(jax.grad(lambda p: ref_aux(p)[0]))(nnx.to_pure_dict(state))
    assert float(jnp.abs(grads["w_dec"]).max()) > 1e-3, "AuxK must train the decoder"
    for name in grads:  # the router and b_dec get none: the residual is a constant
        np.testing.assert_allclose(grads[name], ref_grads.get(name, 0), rtol=1e-4, atol=1e-5)


def test_gather_kernel_backward_keeps_no_expert_stack():
    """The gather kernel loops over experts (lax.map): what its backward needs of each expert's
    weights must be the loop's input, not a value computed in the loop (a copy of W_enc for
    b_dec's gradient term, W_dec rounded to bfloat16), which JAX stacks into an
    [N, L, d] buffer per step. The gradient's temporaries stay under one such tensor (the
    gradients themselves are outputs); with the stacks they were 2.8 of them."""
    from sae_jax.kernels.expert import ExpertParams, ExpertRows, ExpertSettings, run_experts

    n, lat, d, c = 8, 512, 64, 16
    rng = np.random.default_rng(0)
    p = ExpertParams(*(jnp.asarray(rng.normal(size=s), jnp.float32) for s in
                       ((n, lat, d), (n, lat), (n, lat, d))))  # fmt: skip
    valid = jnp.ones((n, c), bool)
    bufs = ExpertRows(jnp.asarray(rng.normal(size=(n, c, d)), jnp.bfloat16), valid * 0.5, valid)
    s = ExpertSettings(k=4, k_aux=8, kernel="gather", dtype="bfloat16")
    dead = auxk.compact_dead(jnp.asarray(rng.random((n, lat)) < 0.3), 64)

    def loss(p, b_dec):
        out = run_experts(p, bufs, b_dec, dead, s)
        return jnp.sum(out.recon) + out.aux_err

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    temp = grad.lower(p, jnp.zeros(d)).compile().memory_analysis().temp_size_in_bytes
    assert temp < n * lat * d * 4, temp / (n * lat * d * 4)
