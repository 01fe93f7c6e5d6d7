"""The chunked, per-expert optimizer update equals the plain whole-tensor one."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import random_model
from flax import nnx

from sae_jax.config import SAEConfig, TrainConfig
from sae_jax.mesh import make_mesh
from sae_jax.model.switch import unit_rows
from sae_jax.training import update
from sae_jax.training.step import init_state, make_optimizer


def reference_update(grads, opt_state, params, clip):
    """Whole tensors: project the decoder gradient, clip by global norm, Adam, renormalise."""
    w = params["w_dec"]
    grads = dict(grads, w_dec=grads["w_dec"] - jnp.sum(grads["w_dec"] * w, -1, keepdims=True) * w)
    norm = optax.tree.norm(grads)
    grads = jax.tree.map(lambda g: jnp.where(norm < clip, g, g * clip / norm), grads)
    return grads, norm


@pytest.mark.parametrize("shape", [(2, 4)])
def test_chunked_update_equals_whole_tensor_update(monkeypatch, shape):
    """On a 2x4 mesh (ZeRO-1: each device updates 1 of the 2 experts of its 'expert' index, in
    4 chunks of rows) with feature scaling: enc_scale [N, d] is updated whole (its axis 1 is
    not the latents: chunked as rows, its update was wrong or failed). Each parameter group at
    its own LR (experts, router, shared dictionary: training/learning_rates.py)."""
    monkeypatch.setattr(update, "UPDATE_CHUNK_BYTES", 4 * 16 * 8)  # 8 rows of d=16: 4 chunks
    cfg = SAEConfig(d=16, num_latents=256, num_experts=8, k=4, feature_scaling=True,
                    shared_latents=24, shared_k=1)  # fmt: skip
    tcfg = TrainConfig(steps=10, base_lr=1e-3, router_lr=2e-2, grad_clip=0.5)
    assert update.chunk_rows(cfg.latents_per_expert, 16 * 4) == 8
    rng = np.random.default_rng(0)
    tx = make_optimizer(cfg, tcfg)

    def run(mesh):
        model = random_model(cfg)
        state = init_state(model, tx)
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), state.params)
        # A second step too, so the moments are not zero.
        fn = jax.jit(lambda g, s, p: update.apply_update(tx, g, s, p, clip=tcfg.grad_clip))
        params, opt, norm = fn(grads, state.opt_state, state.params)
        params, opt, norm = fn(grads, opt, params)
        return nnx.to_pure_dict(params), opt, norm, grads, state

    with jax.set_mesh(make_mesh(shape)):
        params, opt, norm, grads, state = run(shape)
    # The reference, on whole tensors and without the mesh.
    p = nnx.to_pure_dict(state.params)
    g = nnx.to_pure_dict(grads)
    s = tx.init(p)
    for _ in range(2):
        gc, ref_norm = reference_update(g, s, p, tcfg.grad_clip)
        u, s = tx.update(gc, s, p)
        p = optax.apply_updates(p, u)
        p = dict(p, w_dec=unit_rows(p["w_dec"]))
    for name in p:
        np.testing.assert_allclose(np.asarray(params[name]), np.asarray(p[name]), atol=2e-6)
    np.testing.assert_allclose(float(norm), float(ref_norm), rtol=1e-5)
    mu = nnx.to_pure_dict(opt[0].mu)
    for name in ("w_enc", "enc_scale"):
        np.testing.assert_allclose(np.asarray(mu[name]), np.asarray(s[0].mu[name]), atol=1e-7)


def test_update_loop_carries_only_the_expert_rows(monkeypatch):
    """The chunked loop carries and reads only the row leaves ([N, L, ...]): in the compiled
    update no while loop's tuple holds a shared-dictionary tensor ([24, 16]: parameter,
    gradient or moment, which it copied every trip when the small leaves were updated with
    each chunk), and the loop still runs (4 chunks of rows)."""
    monkeypatch.setattr(update, "UPDATE_CHUNK_BYTES", 4 * 16 * 8)  # 8 rows of d=16
    cfg = SAEConfig(d=16, num_latents=64, num_experts=2, k=4, shared_latents=24, shared_k=1)
    tx = make_optimizer(cfg, TrainConfig(steps=10))
    with jax.set_mesh(make_mesh((1, 1))):
        state = init_state(random_model(cfg), tx)
        fn = jax.jit(lambda g, s, p: update.apply_update(tx, g, s, p, clip=1.0))
        hlo = fn.lower(state.params, state.opt_state, state.params).compile().as_text()
    loops = [line for line in hlo.splitlines() if " while(" in line]
    assert loops and all("f32[2,32,16]" in line for line in loops), loops
    assert not [line for line in loops if "f32[24,16]" in line or "f32[24]" in line], loops
