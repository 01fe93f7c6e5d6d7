"""A learning rate per parameter group: experts by the routed dictionary's width, the router
its own, a shared dictionary by its own width."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import random_model
from flax import nnx

from sae_jax.config import ConfigError, SAEConfig, TrainConfig
from sae_jax.mesh import make_mesh
from sae_jax.training.learning_rates import group_lrs, lr_message, make_optimizer, schedule

SWITCH = SAEConfig(d=16, num_latents=4608, num_experts=8, k=32)


def trained_params(cfg: SAEConfig) -> dict:
    """A random model's nnx.Params as a plain dict {name: array}."""
    with jax.set_mesh(make_mesh((1, 1))):
        return nnx.to_pure_dict(nnx.split(random_model(cfg), nnx.Param, ...)[1])


def test_experts_take_the_width_of_the_whole_routed_dictionary():
    """A Switch of 8 experts of 576 latents gets the LR of the TopK SAE of the same 4608
    latents (B x k / M tokens per latent per step either way), not 2.8x it as the width of one
    expert gave; the router the experts' LR unless ROUTER_LR; a shared dictionary its own."""
    tcfg = TrainConfig(base_lr=2e-3)
    topk = group_lrs(SAEConfig(d=16, num_latents=4608, num_experts=1, k=32), tcfg)
    switch = group_lrs(SWITCH, tcfg)
    assert topk == {"experts": pytest.approx(2e-3 / math.sqrt(4608 / 2**14))}
    assert switch == {"experts": topk["experts"], "router": topk["experts"]}
    routed = group_lrs(SWITCH, TrainConfig(base_lr=2e-3, router_lr=1e-4))
    assert routed["router"] == 1e-4 and routed["experts"] == topk["experts"]
    shared = SAEConfig(d=16, num_latents=4608, num_experts=8, k=32, shared_latents=1024,
                       shared_k=4)  # fmt: skip
    assert group_lrs(shared, tcfg)["shared"] == pytest.approx(2e-3 / math.sqrt(1024 / 2**14))
    # A fixed LR is every group's (but ROUTER_LR still sets the router's).
    fixed = group_lrs(shared, TrainConfig(lr=3e-3))
    assert fixed == {"experts": 3e-3, "router": 3e-3, "shared": 3e-3}
    assert "router 0.0001 (ROUTER_LR)" in lr_message(SWITCH, TrainConfig(router_lr=1e-4))
    with pytest.raises(ConfigError, match="ROUTER_LR"):
        TrainConfig(router_lr=-1.0).validate()


def test_each_parameter_steps_by_its_group_lr():
    """Adam's first step moves every element by its group's LR (|m / sqrt(v)| = 1)."""
    cfg = SAEConfig(d=16, num_latents=64, num_experts=4, k=4, shared_latents=32, shared_k=1,
                    feature_scaling=True)  # fmt: skip
    tcfg = TrainConfig(steps=10, base_lr=1e-3, router_lr=5e-2)
    lrs = group_lrs(cfg, tcfg)
    assert len(set(lrs.values())) == 3
    params = trained_params(cfg)
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    tx = make_optimizer(cfg, tcfg)
    updates, _ = tx.update(grads, tx.init(params), params)
    group = {"w_router": "router", "b_router": "router", "shared_w_enc": "shared",
             "shared_w_dec": "shared", "shared_b_enc": "shared"}  # fmt: skip
    assert set(params) == {*group, "w_enc", "b_enc", "w_dec", "b_dec", "enc_scale"}
    for name, u in updates.items():
        lr = lrs[group.get(name, "experts")]
        np.testing.assert_allclose(np.abs(np.asarray(u)), lr, rtol=1e-4, err_msg=name)


def test_one_group_is_bitwise_optax_adam():
    """With every group at one LR, the same numbers as optax.adam on the schedule."""
    cfg = SAEConfig(d=16, num_latents=64, num_experts=4, k=4)
    tcfg = TrainConfig(steps=6, lr=3e-3, warmup_fraction=0.2, decay_fraction=0.4)
    params = trained_params(cfg)
    rng = np.random.default_rng(1)
    ours, ref = make_optimizer(cfg, tcfg), optax.adam(schedule(tcfg, 3e-3))
    s_ours, s_ref = ours.init(params), ref.init(params)
    for _ in range(tcfg.steps):
        g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
        u_ours, s_ours = ours.update(g, s_ours, params)
        u_ref, s_ref = ref.update(g, s_ref, params)
        for name in params:
            np.testing.assert_array_equal(np.asarray(u_ours[name]), np.asarray(u_ref[name]))
