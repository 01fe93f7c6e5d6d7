"""The sharded model equals the single-device model on 8 simulated CPU devices."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_model
from flax import nnx

from sae_jax.config import ConfigError, SAEConfig
from sae_jax.mesh import make_mesh, token_sharding
from sae_jax.model.losses import loss_and_metrics

CFG = SAEConfig(d=16, num_latents=256, num_experts=8, k=4, k_aux=8, capacity_factor=8.0)


def _forward_and_grads(mesh, x, dead, kernel="auto", dtype="auto"):
    cfg = dataclasses.replace(CFG, expert_kernel=kernel, compute_dtype=dtype)
    with jax.set_mesh(mesh):
        graphdef, state = nnx.split(random_model(cfg, seed=7))
        xs = jax.device_put(x, token_sharding(mesh))

        def loss(state):
            out = nnx.merge(graphdef, state)(xs, dead)
            value, metrics = loss_and_metrics(xs, out, lb_alpha=3.0, aux_weight=1 / 32)
            return value, (out, metrics)

        (value, (out, metrics)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
        return jax.device_get((value, out, metrics, nnx.to_pure_dict(grads)))


@pytest.mark.parametrize(
    "shape, kernel", [((1, 8), "dense"), ((2, 4), "dense"), ((4, 2), "dense"), ((8, 1), "dense"),
                      ((2, 4), "gather")],
)  # fmt: skip
def test_sharded_equals_single_device(shape, kernel):
    assert len(jax.devices()) == 8
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(128, 16)), jnp.float32)
    dead = jnp.asarray(rng.random((8, 32)) < 0.5)
    ref = _forward_and_grads(make_mesh((1, 1)), x, dead, "gather")
    got = _forward_and_grads(make_mesh(shape), x, dead, kernel)
    (ref_loss, ref_out, ref_m, ref_g), (loss, out, m, g) = ref, got
    assert bool(out.kept.all()) and bool(ref_out.kept.all())
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(out.x_hat, ref_out.x_hat, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out.expert, ref_out.expert)
    np.testing.assert_allclose(out.fired, ref_out.fired)
    for name in ("mse", "fvu", "l0", "lb_loss", "aux_loss", "expert_load"):
        np.testing.assert_allclose(m[name], ref_m[name], rtol=1e-5, err_msg=name)
    assert ref_m["aux_loss"] > 0
    for name, ref_grad in ref_g.items():
        assert np.abs(ref_grad).max() > 0, name
        np.testing.assert_allclose(g[name], ref_grad, rtol=2e-4, atol=1e-6, err_msg=name)


def test_bf16_sharded_equals_bf16_single_device():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(128, 16)), jnp.float32)
    dead = jnp.asarray(rng.random((8, 32)) < 0.5)
    ref = _forward_and_grads(make_mesh((1, 1)), x, dead, "dense", "bfloat16")
    for shape in ((1, 8), (2, 4)):
        _assert_close_in_bf16(ref, _forward_and_grads(make_mesh(shape), x, dead, "dense",
                                                      "bfloat16"))  # fmt: skip


def _assert_close_in_bf16(ref, got):
    (ref_loss, ref_out, ref_m, ref_g), (loss, out, m, g) = ref, got
    assert bool(out.kept.all()) and bool(ref_out.kept.all())
    np.testing.assert_array_equal(out.expert, ref_out.expert)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-3)
    np.testing.assert_allclose(out.x_hat, ref_out.x_hat, rtol=1e-2, atol=1e-2)
    for name in ("mse", "aux_loss", "l0"):
        np.testing.assert_allclose(m[name], ref_m[name], rtol=1e-3, err_msg=name)
    for name, ref_grad in ref_g.items():
        scale = np.abs(ref_grad).max()
        np.testing.assert_allclose(g[name], ref_grad, atol=1e-2 * scale, err_msg=name)


def test_mesh_errors_are_one_line():
    cfg = SAEConfig(d=8, num_latents=48, num_experts=3, k=2)
    with jax.set_mesh(make_mesh((2, 4))):
        with pytest.raises(ConfigError, match="NUM_EXPERTS=3 is not divisible by the 'expert'"):
            random_model(cfg)
    cfg = SAEConfig(d=8, num_latents=64, num_experts=4, k=2)
    with jax.set_mesh(make_mesh((2, 4))):
        model = random_model(cfg)
        with pytest.raises(ConfigError, match="batch of 60 tokens is not divisible by 8 devices"):
            model(jnp.zeros((60, 8)))
    with pytest.raises(ConfigError, match="needs 16 devices; have 8"):
        make_mesh((4, 4))
    with pytest.raises(ConfigError, match="not divisible by 3"):
        make_mesh((3, -1))
    assert make_mesh((2, -1)).shape == {"data": 2, "expert": 4}


def test_expert_state_is_created_sharded():
    from sae_jax.config import TrainConfig
    from sae_jax.data import SyntheticData
    from sae_jax.training.loop import build_model
    from sae_jax.training.step import init_state, make_optimizer

    cfg = SAEConfig(d=16, num_latents=256, num_experts=8, k=4)
    tcfg = TrainConfig(geometric_median_tokens=256)
    with jax.set_mesh(make_mesh((2, 4))):
        model = build_model(cfg, tcfg, SyntheticData(dim=16, num_features=64, num_groups=4))
        state = init_state(model, make_optimizer(cfg, tcfg))
    params = state.params
    for name in ("w_enc", "w_dec", "b_enc"):
        array = params[name][...]
        assert array.sharding.shard_shape(array.shape)[0] == 2, name  # 8 experts / 4
    assert params["w_router"][...].sharding.is_fully_replicated
    adam_mu = state.opt_state[0].mu["w_dec"][...]
    assert adam_mu.sharding.shard_shape(adam_mu.shape)[0] == 1  # and over 'data' (ZeRO-1)
    assert state.since_fired.sharding.shard_shape(state.since_fired.shape) == (2, 32)
    b_dec = np.asarray(params["b_dec"][...])
    np.testing.assert_array_equal(b_dec, np.asarray(params["b_router"][...]))
    assert np.abs(b_dec).max() > 0  # geometric median of the sample, not zeros


ZERO_CFG = SAEConfig(d=16, num_latents=256, num_experts=8, k=4, k_aux=8, capacity_factor=8.0,
                     expert_kernel="gather")  # fmt: skip


def _train_steps(mesh, batches, cfg=ZERO_CFG):
    """AuxK training steps (on every dead latent) of a random model on `mesh`: (final state,
    per-step metrics, the step's optimized HLO). Latents are dead after a token without
    firing, so the first step has none and the others run AuxK."""
    from sae_jax.config import TrainConfig
    from sae_jax.training.step import setup_training

    tcfg = TrainConfig(steps=10, batch_size=128, lr=1e-3, grad_clip=0.05, dead_after_tokens=1)
    with jax.set_mesh(mesh):
        _, state, step = setup_training(random_model(cfg, seed=3), tcfg)
        xs = [jax.device_put(x, token_sharding(mesh)) for x in batches]
        compiled = step.auxk.lower(state, xs[0]).compile()
        metrics = []
        for x in xs:
            state, m = compiled(state, x)
            metrics.append(jax.device_get(m))
    return state, metrics, compiled.as_text()


def test_zero1_training_steps_equal_single_device_with_moments_split_over_data():
    """ZeRO-1 on a 2x4 mesh: the expert Adam moments are split over 'data' (of the 2 experts
    of an 'expert' index, each device holds 1: half of what the replicated layout held), their
    gradient arrives by a reduce-scatter (no all-reduce of an expert gradient) and the updated
    rows are all-gathered; three steps (two with dead latents for AuxK, the global-norm clip
    active) equal one device's: parameters, both moments, loss and gradient norm."""
    from sae_jax.plan import hlo as hlo_text

    rng = np.random.default_rng(5)
    batches = [jnp.asarray(rng.normal(size=(128, 16)), jnp.float32) for _ in range(3)]
    ref, ref_m, _ = _train_steps(make_mesh((1, 1)), batches)
    got, got_m, hlo = _train_steps(make_mesh((2, 4)), batches)
    n, lat, d = 8, 32, 16
    for name in ("w_enc", "w_dec"):
        param = got.params[name][...]
        assert param.sharding.shard_shape(param.shape) == (n // 4, lat, d), name
        for moment in (got.opt_state[0].mu[name][...], got.opt_state[0].nu[name][...]):
            assert moment.sharding.shard_shape(moment.shape) == (n // 8, lat, d), name
            shard = moment.addressable_shards[0].data
            assert shard.nbytes * 2 == param.addressable_shards[0].data.nbytes
    b_enc_mu = got.opt_state[0].mu["b_enc"][...]
    assert b_enc_mu.sharding.shard_shape(b_enc_mu.shape) == (n // 8, lat)
    found = hlo_text.collectives(hlo, 8)
    grad_shard = f"f32[{n // 8},{lat},{d}]"
    assert any(c.op == "reduce-scatter" and grad_shard in c.shape for c in found), found
    assert any(c.op == "all-gather" for c in found), found
    expert_sized = f"[{n // 4},{lat},{d}]"
    assert not [c for c in found if c.op == "all-reduce" and expert_sized in c.shape]
    assert min(m["aux_loss"] for m in ref_m[1:]) > 0 and min(m["grad_norm"] for m in ref_m) > 0.05
    for r, g in zip(ref_m, got_m, strict=True):
        for name in ("loss", "grad_norm", "aux_loss"):
            np.testing.assert_allclose(g[name], r[name], rtol=1e-5, err_msg=name)
    _assert_same_state(got, ref)


def _assert_same_state(got, ref):
    """Parameters and both Adam moments equal within float tolerance."""
    pairs = [(nnx.to_pure_dict(got.params), nnx.to_pure_dict(ref.params))]
    pairs += [(nnx.to_pure_dict(getattr(got.opt_state[0], m)),
               nnx.to_pure_dict(getattr(ref.opt_state[0], m))) for m in ("mu", "nu")]  # fmt: skip
    for got_tree, ref_tree in pairs:
        for name, want in ref_tree.items():
            np.testing.assert_allclose(np.asarray(got_tree[name]), np.asarray(want), rtol=1e-4,
                                       atol=1e-6, err_msg=name)  # fmt: skip


def test_zero1_splits_a_data_parallel_topk_by_latent_rows():
    """A data-parallel TopK (N = 1) on an (8, 1) mesh: 'data' cannot split the one expert, so
    ZeRO-1 splits its latent rows: each device holds the Adam moments of 64 / 8 latents of
    w_enc, b_enc, w_dec (an eighth), their gradient arrives reduce-scattered along the
    latents (no all-reduce of an expert gradient), and three steps (AuxK in two) equal one
    device's: parameters, both moments, loss and gradient norm."""
    from sae_jax.plan import hlo as hlo_text

    cfg = SAEConfig(d=16, num_latents=64, num_experts=1, k=4, k_aux=8)
    rng = np.random.default_rng(6)
    batches = [jnp.asarray(rng.normal(size=(128, 16)), jnp.float32) for _ in range(3)]
    ref, ref_m, _ = _train_steps(make_mesh((1, 1)), batches, cfg)
    got, got_m, hlo = _train_steps(make_mesh((8, 1)), batches, cfg)
    for name, shard in (("w_enc", (1, 8, 16)), ("w_dec", (1, 8, 16)), ("b_enc", (1, 8))):
        param = got.params[name][...]
        assert param.sharding.is_fully_replicated, name
        for moment in (got.opt_state[0].mu[name][...], got.opt_state[0].nu[name][...]):
            assert moment.sharding.shard_shape(moment.shape) == shard, name
    found = hlo_text.collectives(hlo, 8)
    assert any(c.op == "reduce-scatter" and "f32[1,8,16]" in c.shape for c in found), found
    assert not [c for c in found if c.op == "all-reduce" and "[1,64,16]" in c.shape], found
    for r, g in zip(ref_m, got_m, strict=True):
        for name in ("loss", "grad_norm", "aux_loss"):
            np.testing.assert_allclose(g[name], r[name], rtol=1e-5, err_msg=name)
    _assert_same_state(got, ref)


def test_zero1_start_up_line():
    """The line `train` prints: on, and how; off, and why."""
    from sae_jax.training.update import zero_message

    on = "ZeRO-1: Adam state of the expert rows split over 'data'"
    assert zero_message(make_mesh((2, 4)), 8, 32) == f"{on} (2 devices, by whole experts)"
    assert zero_message(make_mesh((8, 1)), 1, 64) == (
        f"{on} (8 devices, by latent rows of every expert)"
    )
    assert zero_message(make_mesh((1, 8)), 8, 32) == "ZeRO-1: off ('data' axis of 1 device)"
    assert zero_message(make_mesh((3, 2)), 4, 10) == (
        "ZeRO-1: off ('data' axis of 3 devices divides neither the 2 experts of an 'expert' "
        "index nor their 10 latents)"
    )
