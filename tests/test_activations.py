"""The activation kinds (kernels/activations.py) against plain numpy references: the
functions and their straight-through gradients, the global batch threshold across devices,
and whole models of each kind on one device and on a 2x4 mesh."""

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_model
from data_utils import TINY_TRAIN, assert_same_params, final_params
from flax import nnx
from jax.sharding import PartitionSpec as P
from reference import kind_loss, kind_sae

from launch import train as train_cli
from sae_jax.config import ConfigError, SAEConfig, TrainConfig
from sae_jax.kernels import activations
from sae_jax.mesh import make_mesh, token_sharding
from sae_jax.model.losses import kind_loss as model_kind_loss
from sae_jax.model.losses import loss_and_metrics
from sae_jax.training.step import setup_training

CFG = SAEConfig(d=16, num_latents=256, num_experts=4, k=4, k_aux=0, capacity_factor=8.0,
                eval_capacity_factor=8.0, k_max=12)  # fmt: skip
KINDS = ("batchtopk", "matryoshka", "jumprelu")


def test_jumprelu_and_its_straight_through_gradients_match_numpy():
    rng = np.random.default_rng(0)
    pre = rng.normal(size=(64,)).astype(np.float32)
    theta = rng.uniform(0.2, 1.0, size=64).astype(np.float32)
    pre[:8] = theta[:8] * (1 + rng.uniform(-0.04, 0.04, 8))  # some inside the kernel's window
    cot = rng.normal(size=64).astype(np.float32)
    bw = 0.1

    def f(p, t):
        return jnp.sum(cot * activations.jumprelu(p, t, jnp.float32(bw)))

    value = activations.jumprelu(pre, theta, jnp.float32(bw))
    d_pre, d_theta = jax.grad(f, argnums=(0, 1))(pre, theta)
    eps = bw * theta
    inside = np.abs((pre - theta) / eps) < 0.5
    np.testing.assert_allclose(value, np.where(pre > theta, pre, 0.0))
    np.testing.assert_allclose(d_pre, np.where(pre > theta, cot, 0.0))
    np.testing.assert_allclose(d_theta, -(theta / eps) * inside * cot, rtol=1e-6)
    assert inside.sum() >= 4

    d_theta_l0 = jax.grad(lambda t: jnp.sum(cot * activations.step(pre, t, jnp.float32(bw))))(theta)
    np.testing.assert_allclose(d_theta_l0, -(1.0 / eps) * inside * cot, rtol=1e-6)
    assert np.all(jax.grad(lambda p: jnp.sum(activations.step(p, theta, bw)))(pre) == 0)


@pytest.mark.parametrize("count", [1, 7, 100, 300, 1000])
def test_kth_largest_is_exact_with_ties_and_zeros(count):
    rng = np.random.default_rng(count)
    values = np.maximum(rng.normal(size=(50, 10)), 0).astype(np.float32)
    values[3, :4] = values[7, 0]  # ties
    got = float(activations.kth_largest(jnp.asarray(values), count))
    ranked = np.sort(values.ravel())[::-1]
    want = ranked[count - 1] if count <= ranked.size else 0.0
    assert got == want
    if count == 300:  # fewer positive values than asked for: 0, keep every positive one
        assert (values > 0).sum() < 300 and got == 0.0


def test_batch_threshold_across_a_mesh_equals_one_device():
    """Each of 8 devices holds its own rows; the threshold over all of them, from counts
    under psum, is the single-device one, and so are the kept values."""
    rng = np.random.default_rng(1)
    values = np.maximum(rng.normal(size=(256, 12)), 0).astype(np.float32)
    kept_ref, theta_ref = activations.batch_keep(jnp.asarray(values), 4, 256)
    mesh = make_mesh((2, 4))
    axes = ("data", "expert")

    def local(v):
        return activations.batch_keep(v, 4, 256, axes)

    fn = jax.shard_map(local, mesh=mesh, in_specs=P(axes), out_specs=(P(axes), P()))
    kept, theta = jax.jit(fn)(jax.device_put(values, token_sharding(mesh)))
    assert float(theta) == float(theta_ref) == np.sort(values.ravel())[::-1][4 * 256 - 1]
    np.testing.assert_array_equal(kept, kept_ref)
    assert (np.asarray(kept) > 0).sum() == 4 * 256


def _model(cfg, seed=7):
    model = random_model(cfg, seed=seed)
    rng = np.random.default_rng(seed + 1)
    if hasattr(model, "log_threshold"):
        shape = model.log_threshold[...].shape
        model.log_threshold[...] = jnp.asarray(rng.uniform(0.5, 1.0, shape), jnp.float32)
    if hasattr(model, "batch_threshold"):
        model.batch_threshold[...] = jnp.float32(2.0)
    return model


def _params(model) -> dict:
    return {k: np.asarray(v) for k, v in nnx.to_pure_dict(nnx.state(model)).items()}


def _run(cfg, mesh_shape, x, mode="train"):
    """Forward, metrics and the gradients of the training loss on a mesh."""
    mesh = make_mesh(mesh_shape)
    with jax.set_mesh(mesh):
        model = _model(cfg)
        params = _params(model)
        graphdef, state = nnx.split(model)
        xs = jax.device_put(jnp.asarray(x), token_sharding(mesh))
        kind = model_kind_loss(cfg, TrainConfig(l0_coeff=1.0))

        def loss(state):
            out = nnx.merge(graphdef, state)(xs, None, mode=mode)
            value, metrics = loss_and_metrics(xs, out, lb_alpha=0.0, aux_weight=0.0, kind=kind)
            return value, (out, metrics)

        (value, (out, metrics)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
        return params, jax.device_get((value, out, metrics, nnx.to_pure_dict(grads)))


def _x(seed=0, tokens=128):
    return np.random.default_rng(seed).normal(size=(tokens, CFG.d)).astype(np.float32)


PATHS = ((1, "capacity", "gather"), (4, "capacity", "dense"), (4, "dropless", "gather"))
CASES = [(kind, *path) for kind in KINDS for path in PATHS]


@pytest.mark.parametrize("kind, n, dispatch, kernel", CASES)
def test_forward_matches_the_numpy_reference(kind, n, dispatch, kernel):
    cfg = dataclasses.replace(CFG, activation=kind, num_experts=n, dispatch=dispatch,
                              expert_kernel=kernel).validate()  # fmt: skip
    x = _x()
    for mode in ("train", "infer"):
        params, (_, out, metrics, _) = _run(cfg, (1, 1), x, mode)
        ref_hat, ref_l0, ref_theta, ref_prefix = kind_sae(x, params, cfg, mode)
        np.testing.assert_allclose(out.x_hat, ref_hat, rtol=1e-4, atol=1e-5, err_msg=mode)
        np.testing.assert_allclose(metrics["l0"], ref_l0.mean(), rtol=1e-6, err_msg=mode)
        if ref_theta is not None:
            np.testing.assert_allclose(out.batch_threshold, ref_theta, rtol=1e-6)
            assert abs(metrics["l0"] - cfg.k) < 0.1  # K per token on average, ties aside
        if len(ref_prefix):
            np.testing.assert_allclose(out.kind_sums, ref_prefix, rtol=1e-4)
    assert 0 < ref_l0.mean() < cfg.candidates_per_row  # the inference threshold cuts


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_the_reference_on_one_device_and_a_2x4_mesh(kind):
    cfg = dataclasses.replace(CFG, activation=kind, num_experts=4).validate()
    x = _x(seed=3)
    params, (value, _, _, grads) = _run(cfg, (1, 1), x)
    const = {k: v for k, v in params.items()}
    ref_value, ref = jax.jit(jax.value_and_grad(lambda p: kind_loss(x, p, const, cfg)))(params)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    _, (sharded_value, _, _, sharded) = _run(cfg, (2, 4), x)
    np.testing.assert_allclose(sharded_value, ref_value, rtol=1e-5)
    for name, ref_grad in ref.items():
        if name in ("batch_threshold",):
            continue
        if name in ("w_router", "b_router"):  # the gate is a constant of the reference
            continue
        assert np.abs(ref_grad).max() > 1e-6, name
        np.testing.assert_allclose(grads[name], ref_grad, rtol=1e-3, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(sharded[name], ref_grad, rtol=1e-3, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_a_2x4_mesh_equals_one_device_in_every_mode(kind):
    cfg = dataclasses.replace(CFG, activation=kind, num_experts=8, dispatch="dropless")
    x = _x(seed=5)
    for mode in ("train", "infer"):
        _, (value, out, metrics, grads) = _run(cfg, (1, 1), x, mode)
        _, (value8, out8, metrics8, grads8) = _run(cfg, (2, 4), x, mode)
        np.testing.assert_allclose(value8, value, rtol=1e-5)
        np.testing.assert_allclose(out8.x_hat, out.x_hat, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out8.batch_threshold, out.batch_threshold)
        np.testing.assert_allclose(metrics8["l0"], metrics["l0"])
        for name, g in grads.items():
            np.testing.assert_allclose(grads8[name], g, rtol=2e-4, atol=1e-6, err_msg=name)


def test_topk_is_unchanged_by_the_modes():
    cfg = dataclasses.replace(CFG, num_experts=4)
    x = _x(seed=2)
    _, (value, out, _, grads) = _run(cfg, (1, 1), x, "train")
    _, (value2, out2, _, grads2) = _run(cfg, (1, 1), x, "infer")
    assert value == value2
    np.testing.assert_array_equal(out.x_hat, out2.x_hat)


def test_activation_settings_fail_in_one_line():
    bad = [
        (dict(activation="relu"), "ACTIVATION='relu'"),
        (dict(activation="batchtopk", k_max=2), "k_max=2"),
        (dict(activation="matryoshka", experts_per_token=2), "EXPERTS_PER_TOKEN=1"),
        (dict(activation="matryoshka", matryoshka_prefixes=(0.5, 0.25)), "matryoshka_prefixes"),
        (dict(activation="jumprelu", jumprelu_bandwidth=0.0), "jumprelu_bandwidth"),
    ]
    for fields, text in bad:
        with pytest.raises(ConfigError, match=text.replace("(", r"\(")) as err:
            dataclasses.replace(CFG, **fields).validate()
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="grad_clip=0.0 must be positive") as err:
        TrainConfig(grad_clip=0.0).validate()
    assert "\n" not in str(err.value)
    assert dataclasses.replace(CFG, activation="matryoshka").prefix_ends == (4, 8, 16, 32)
    assert dataclasses.replace(CFG, k_max=0).candidates_per_row == 16


def test_batch_threshold_is_the_first_batch_then_an_average(mesh1):
    cfg = dataclasses.replace(CFG, activation="batchtopk", num_experts=1).validate()
    model = _model(cfg)
    tcfg = TrainConfig(steps=10, batch_size=128, threshold_rate=0.25)
    _, state, step = setup_training(model, tcfg)
    x = jnp.asarray(_x(seed=4))
    thresholds, inference = [], []
    for _ in range(3):
        state, metrics = step(state, x)
        thresholds.append(float(metrics["batch_threshold"]))
        inference.append(float(state.params["batch_threshold"][...]))
    assert inference[0] == thresholds[0] > 0
    want = inference[0] + 0.25 * (thresholds[1] - inference[0])
    np.testing.assert_allclose(inference[1], want, rtol=1e-6)
    assert thresholds[1] != thresholds[0]


def test_jumprelu_thresholds_start_at_the_first_batchs_batch_threshold(mesh1):
    """Step 0 sets every threshold so that the mean L0 of the first batch is K, whatever the
    data's scale; the step then trains them."""
    cfg = dataclasses.replace(CFG, activation="jumprelu", num_experts=1, k_max=0).validate()
    model = _model(cfg)
    _, state, step = setup_training(model, TrainConfig(steps=10, batch_size=128, lr=1e-12,
                                                       threshold_lr=1e-12))  # fmt: skip
    x = jnp.asarray(_x(seed=6) * 50.0)
    state, metrics = step(state, x)
    theta = np.exp(np.asarray(state.params["log_threshold"][...]))
    assert metrics["l0"] == cfg.k and np.ptp(theta) == 0 and theta.min() > 10


@pytest.mark.parametrize("kind", ["batchtopk", "jumprelu"])
def test_resume_from_a_checkpoint_is_bitwise(tmp_path, kind):
    args = [*TINY_TRAIN, f"--gin.ACTIVATION='{kind}'", "--gin.STEPS=8",
            "--gin.CHECKPOINT_EVERY=4", "--gin.MESH_SHAPE=(1, 1)"]  # fmt: skip
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert train_cli.main([f"--workdir={whole}", *args]) == 0
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoints" / "8")
    shutil.rmtree(cut / "export")
    assert train_cli.main([f"--workdir={cut}", *args]) == 0
    assert_same_params(final_params(cut), final_params(whole))
    # the exports hold the thresholds too (BatchTopK's is not an nnx.Param)
    for name in ("sae.safetensors", "cfg.json"):
        assert (cut / "export" / name).read_bytes() == (whole / "export" / name).read_bytes()


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_is_close_to_float32(kind):
    """The kinds in bfloat16 (the matmuls and buffers; thresholds, selection and losses in
    float32): the loss and the L0 within bf16's rounding of float32's, on a 2x4 mesh."""
    cfg = dataclasses.replace(CFG, activation=kind, num_experts=8)
    x = _x(seed=8)
    _, (value, _, metrics, _) = _run(cfg, (1, 1), x)
    bf16 = dataclasses.replace(cfg, compute_dtype="bfloat16")
    _, (value16, _, metrics16, grads16) = _run(bf16, (2, 4), x)
    np.testing.assert_allclose(value16, value, rtol=2e-2)
    np.testing.assert_allclose(metrics16["l0"], metrics["l0"], rtol=5e-2)
    assert all(np.isfinite(g).all() for g in grads16.values())
