"""Routing beyond top-1 (experts_per_token e > 1, one global TopK over the e experts'
latents) against a per-token numpy reference, on one device and on a 2x4 mesh."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_model
from flax import nnx
from reference import top_e_mse, top_e_sae

from sae_jax.config import SAEConfig
from sae_jax.dispatch import global_topk
from sae_jax.mesh import make_mesh, token_sharding
from sae_jax.model.losses import loss_and_metrics

CFG = SAEConfig(d=16, num_latents=256, num_experts=8, k=6, k_aux=4, capacity_factor=16.0,
                experts_per_token=2)  # fmt: skip
PATHS = [("capacity", "dense"), ("capacity", "gather"), ("dropless", "dense"),
         ("dropless", "gather")]  # fmt: skip


def _params(model) -> dict:
    return {k: np.asarray(v) for k, v in nnx.to_pure_dict(nnx.state(model)).items()}


def _run(cfg, mesh_shape, x, dead, seed=7, lb_alpha=0.0, aux_weight=0.0):
    """Forward, metrics and gradients of the loss on a mesh of mesh_shape."""
    mesh = make_mesh(mesh_shape)
    with jax.set_mesh(mesh):
        model = _randomise_extras(random_model(cfg, seed=seed), seed)
        params = _params(model)
        graphdef, state = nnx.split(model)
        xs = jax.device_put(jnp.asarray(x), token_sharding(mesh))

        def loss(state):
            out = nnx.merge(graphdef, state)(xs, dead)
            value, metrics = loss_and_metrics(xs, out, lb_alpha=lb_alpha, aux_weight=aux_weight)
            return value, (out, metrics)

        grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
        (value, (out, metrics)), grads = grad(state)
        return params, jax.device_get((value, out, metrics, nnx.to_pure_dict(grads)))


def _randomise_extras(model, seed):
    """Random values for the optional parameters (feature scaling, shared dictionary)."""
    rng = np.random.default_rng(seed + 100)
    for name in ("enc_scale", "shared_w_enc", "shared_b_enc", "shared_w_dec"):
        if hasattr(model, name):
            var = getattr(model, name)
            var[...] = jnp.asarray(rng.normal(size=var[...].shape) * 0.5, jnp.float32)
    return model


def _inputs(seed=0, tokens=64):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(tokens, CFG.d)).astype(np.float32)
    dead = rng.random((CFG.num_experts, CFG.latents_per_expert)) < 0.3
    return x, dead


def test_select_keeps_the_k_largest_gated_candidates():
    latents = jnp.asarray([[3.0, 1.0], [2.5, 2.0], [0.5, 0.1], [4.0, 0.0]])  # 2 tokens x e=2
    indices = jnp.arange(8, dtype=jnp.int32).reshape(4, 2)
    gate = jnp.asarray([[0.5, 0.5], [0.9, 0.1]])
    ids, values = global_topk.select(latents, indices, gate, 3)
    np.testing.assert_array_equal(ids, indices)
    # token 0: gated 1.5, .5, 1.25, 1.0 -> keep 3.0, 2.5, 2.0; token 1: .45, .09, .4, 0
    np.testing.assert_allclose(values, [[3.0, 0.0], [2.5, 2.0], [0.5, 0.1], [4.0, 0.0]])


@pytest.mark.parametrize(
    "dispatch, kernel, mesh_shape",
    [(*path, (1, 1)) for path in PATHS] + [("capacity", "dense", (2, 4)),
                                           ("dropless", "gather", (2, 4))],
)  # fmt: skip
def test_forward_auxk_and_metrics_match_the_reference(dispatch, kernel, mesh_shape):
    cfg = dataclasses.replace(CFG, dispatch=dispatch, expert_kernel=kernel)
    x, dead = _inputs()
    params, (_, out, metrics, _) = _run(cfg, mesh_shape, x, jnp.asarray(dead))
    ref_hat, ref_err, ref_norm = top_e_sae(x, params, cfg.k, 2, dead, cfg.k_aux)
    assert out.expert.shape == (64, 2) and bool(out.kept.all())
    np.testing.assert_allclose(out.x_hat, ref_hat, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.aux_err, ref_err, rtol=1e-4)
    np.testing.assert_allclose(out.aux_norm, ref_norm, rtol=1e-4)
    assert ref_err > 0
    np.testing.assert_allclose(metrics["l0"], np.sum(out.fired) / 64, rtol=1e-6)
    assert 0 < metrics["l0"] <= cfg.k
    # every token makes e assignments; f sums to 1 and a uniform router gives lb = 1
    np.testing.assert_allclose(np.sum(out.expert_counts), 64 * 2)


@pytest.mark.parametrize("dispatch, kernel", [("capacity", "dense"), ("dropless", "gather")])
def test_gradients_match_the_reference_on_one_device_and_a_mesh(dispatch, kernel):
    cfg = dataclasses.replace(CFG, dispatch=dispatch, expert_kernel=kernel, k_aux=0)
    x, _ = _inputs(seed=3)
    params, (_, _, _, grads) = _run(cfg, (1, 1), x, None)
    ref = jax.jit(jax.grad(lambda p: top_e_mse(x, p, params, cfg.k, 2)))(params)
    _, (_, _, _, sharded) = _run(cfg, (2, 4), x, None)
    for name, ref_grad in ref.items():
        assert np.abs(ref_grad).max() > 1e-5, name
        np.testing.assert_allclose(grads[name], ref_grad, rtol=1e-3, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(sharded[name], ref_grad, rtol=1e-3, atol=1e-6, err_msg=name)


def test_auxk_gradient_reaches_only_dead_latents_weights():
    cfg = dataclasses.replace(CFG, dispatch="dropless")
    x, dead = _inputs(seed=5)
    _, (_, _, metrics, grads) = _run(cfg, (1, 1), x, jnp.asarray(dead), aux_weight=1.0)
    _, (_, _, _, plain) = _run(cfg, (1, 1), x, None)
    assert metrics["aux_loss"] > 0
    diff = np.abs(grads["w_dec"] - plain["w_dec"]).sum(-1)  # [N, L]
    assert diff[dead].max() > 0 and diff[~dead].max() < 1e-6


def test_load_balance_counts_every_assignment():
    x, _ = _inputs(seed=4)
    _, (_, out, metrics, grads) = _run(CFG, (1, 1), x, None, lb_alpha=1.0)
    counts = np.bincount(np.asarray(out.expert).reshape(-1), minlength=8)
    np.testing.assert_array_equal(out.expert_counts, counts)
    f, p = counts / counts.sum(), np.asarray(out.prob_sums) / 64
    np.testing.assert_allclose(metrics["lb_loss"], 8 * np.sum(f * p), rtol=1e-5)
    assert np.abs(grads["w_router"]).max() > 0


def test_capacity_overflow_drops_rows_not_whole_tokens():
    cfg = dataclasses.replace(CFG, capacity_factor=0.5)
    x, _ = _inputs(seed=6)
    _, (_, out, metrics, _) = _run(cfg, (1, 1), x, None)
    assert 0 < metrics["drop_fraction"] < 1
    assert np.isfinite(out.x_hat).all()


def _priority_keep(experts: np.ndarray, num_experts: int, cap: int) -> np.ndarray:
    """[T, e] bool: rows that fit when every token's first choice takes its slot before any
    token's second choice (then in token order)."""
    keep, load = np.zeros(experts.shape, bool), np.zeros(num_experts, int)
    for j in range(experts.shape[1]):
        for t, i in enumerate(experts[:, j]):
            keep[t, j], load[i] = load[i] < cap, load[i] + 1
    return keep


@pytest.mark.parametrize("mesh_shape", [(1, 1), (1, 8)])
def test_capacity_keeps_first_choices_before_second_ones(mesh_shape):
    """Under overflow the rows fill the experts' buffers choice by choice, so a token loses
    its second expert before any token loses its first; x_hat matches the reference with
    exactly those rows dropped."""
    cfg = dataclasses.replace(CFG, capacity_factor=0.75)
    x, _ = _inputs(seed=6)
    params, (_, out, _, _) = _run(cfg, mesh_shape, x, None)
    devices = mesh_shape[0] * mesh_shape[1]  # capacity is per device's tokens on (1, 8)
    tokens = len(x) // devices
    cap = int(np.ceil(0.75 * tokens * 2 / 8))
    keep = np.concatenate([_priority_keep(np.asarray(out.expert)[s : s + tokens], 8, cap)
                           for s in range(0, len(x), tokens)])  # fmt: skip
    assert 0 < (~keep[:, 1]).sum() and (~keep[:, 0]).sum() < (~keep[:, 1]).sum()
    np.testing.assert_array_equal(out.kept, keep.all(axis=1))
    want, _, _ = top_e_sae(x, params, cfg.k, 2, keep=keep)
    np.testing.assert_allclose(out.x_hat, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_two_stages_with_one_expert_per_token_are_bitwise_the_switch(mesh1, dispatch):
    """global_topk.run with e = 1 (candidates, then the chosen ones decoded) gives the same
    bits as the path run once: the same values, chosen the same way."""
    from sae_jax.dispatch import paths
    from sae_jax.dispatch.routed import Routed
    from sae_jax.kernels.expert import centre
    from sae_jax.kernels.records import ExpertParams
    from sae_jax.model.switch import expert_settings

    cfg = dataclasses.replace(CFG, dispatch=dispatch, experts_per_token=1)
    model = random_model(cfg, seed=9)
    p = ExpertParams(model.w_enc[...], model.b_enc[...], model.w_dec[...])
    x, _ = _inputs(seed=8)
    probs = jax.nn.softmax((x - model.b_router[...]) @ model.w_router[...], axis=-1)
    expert = jnp.argmax(probs, axis=-1).astype(jnp.int32)
    gate = jnp.max(probs, axis=-1)
    routed = Routed(centre(jnp.asarray(x), model.b_dec[...]), expert, gate, model.b_dec[...])
    s = expert_settings(cfg, "float32", cfg.capacity_factor, None)
    path = paths.choose(cfg, 1)
    once = jax.jit(lambda r: path(r, p, None, s))(routed)
    top = routed._replace(expert=expert[:, None], gate=gate[:, None])
    twice = jax.jit(lambda r: global_topk.run(path, r, p, None, s))(top)
    np.testing.assert_array_equal(twice.recon, gate[:, None] * once.recon)
    np.testing.assert_array_equal(twice.fired, once.fired)


EXTRAS = dataclasses.replace(CFG, shared_latents=24, shared_k=2, feature_scaling=True)


# The gather kernel (a shared dictionary above 1024 latents takes it under 'auto') has its own
# backward: a replicated dictionary's gradient must be summed over the devices' tokens there.
@pytest.mark.parametrize(
    "dispatch, mesh_shape, e, kernel",
    [("capacity", (1, 1), 1, "auto"), ("capacity", (1, 1), 2, "auto"),
     ("dropless", (2, 4), 1, "auto"), ("dropless", (2, 4), 2, "auto"),
     ("capacity", (1, 1), 1, "gather"), ("capacity", (2, 4), 2, "gather")],
)  # fmt: skip
def test_shared_dictionary_and_feature_scaling_match_the_reference(dispatch, mesh_shape, e, kernel):
    cfg = dataclasses.replace(EXTRAS, dispatch=dispatch, experts_per_token=e, expert_kernel=kernel)
    x, dead = _inputs(seed=11)
    params, (_, out, metrics, grads) = _run(cfg, mesh_shape, x, jnp.asarray(dead))
    ref_hat, ref_err, ref_norm = top_e_sae(x, params, cfg.routed_k, e, dead, cfg.k_aux,
                                           cfg.shared_k)  # fmt: skip
    np.testing.assert_allclose(out.x_hat, ref_hat, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.aux_err, ref_err, rtol=1e-4)
    np.testing.assert_allclose(out.aux_norm, ref_norm, rtol=1e-4)
    assert cfg.routed_k < metrics["l0"] <= cfg.k
    ref = jax.jit(jax.grad(lambda p: top_e_mse(x, p, params, cfg.routed_k, e, cfg.shared_k)))
    _, (_, _, _, plain) = _run(cfg, mesh_shape, x, None)
    for name, ref_grad in ref(params).items():
        assert np.abs(ref_grad).max() > 1e-5, name
        np.testing.assert_allclose(plain[name], ref_grad, rtol=1e-3, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("e", [2])
def test_exported_sae_reconstructs_as_the_model(mesh1, tmp_path, e):
    """Export folds feature scaling into w_enc and keeps the shared dictionary; inference
    (PretrainedSAE) gives the training model's x_hat, the codes k latents with their gates."""
    from sae_jax.export import export_sae
    from sae_jax.pretrained import load_pretrained

    cfg = dataclasses.replace(EXTRAS, dispatch="dropless", experts_per_token=e)
    model = _randomise_extras(random_model(cfg, seed=12), 12)
    x, _ = _inputs(seed=13)
    out = model(jnp.asarray(x))
    export_sae(nnx.to_pure_dict(nnx.state(model)), cfg, tmp_path)
    sae = load_pretrained(tmp_path)
    codes = sae.encode(x)
    assert codes.values.shape == (64, cfg.k) and codes.latent_gate.shape == (64, cfg.k)
    assert int(np.sum(np.asarray(codes.indices) >= cfg.num_latents)) == 64 * cfg.shared_k
    np.testing.assert_array_equal(codes.expert, np.asarray(out.expert).reshape(64, -1)[:, 0])
    np.testing.assert_allclose(sae(x), out.x_hat, rtol=1e-4, atol=1e-5)


def test_auto_kernel_and_experts_per_token_settings():
    from sae_jax.model.switch import expert_settings

    s = expert_settings(dataclasses.replace(CFG, expert_kernel="auto"), "float32", 1.0, None)
    assert s.kernel == "gather" and s.k == CFG.k  # e > 1: the candidates' pass has the values
    one = dataclasses.replace(CFG, expert_kernel="auto", experts_per_token=1)
    assert expert_settings(one, "float32", 1.0, None).kernel == "auto"
    # a TopK SAE (N = 1) of a config with EXPERTS_PER_TOKEN = 2 has e = 1
    assert SAEConfig(num_experts=1, experts_per_token=2).experts_per_token == 1
    shared = SAEConfig(d=16, num_latents=64, num_experts=4, k=8, shared_latents=16, shared_k=3)
    assert shared.validate().routed_k == 5 and shared.dictionary_size == 80
