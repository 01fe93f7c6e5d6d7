"""Dropless dispatch: every token runs its routed expert, on 1 device and on meshes of 8."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import jaxpr_shapes, random_model
from flax import nnx
from reference import auxk_sums, switch_mse, switch_sae

from launch import eval as eval_cli
from sae_jax.config import ConfigError, SAEConfig, TrainConfig
from sae_jax.dispatch import dropless
from sae_jax.dispatch.dropless import auto_block_size
from sae_jax.dispatch.routed import Routed
from sae_jax.kernels.expert import ExpertParams, ExpertSettings
from sae_jax.mesh import make_mesh, token_sharding
from sae_jax.model.losses import loss_and_metrics
from sae_jax.training.loop import train

N, D, T = 8, 16, 64
CFG = SAEConfig(d=D, num_latents=128, num_experts=N, k=4, k_aux=6, dispatch="dropless")
MESHES = [(1, 1), (1, 8), (2, 4), (8, 1)]


def routing_of(name: str) -> np.ndarray:
    """The expert each of T tokens is sent to (the router below follows the +10 direction)."""
    rng = np.random.default_rng(3)
    return {
        "balanced": np.arange(T) % N,
        "one_expert_90pct": np.where(np.arange(T) % 10 == 9, np.arange(T) % N, 2),
        "empty_experts": rng.choice([1, 3], T),
    }[name]


def routed_model(cfg: SAEConfig):
    model = random_model(cfg, seed=4)
    model.w_router[...] = jnp.eye(D, N)
    model.b_router[...] = jnp.zeros(D)
    return model


def tokens_for(experts: np.ndarray) -> np.ndarray:
    x = np.random.default_rng(5).normal(size=(len(experts), D)).astype(np.float32)
    x[np.arange(len(experts)), experts] += 10.0
    return x


@functools.cache
def _loss_and_grads(cfg: SAEConfig, mesh_shape, lb: float):
    """One compiled (loss, grads) per config and mesh: the routings differ only in data."""
    mesh = make_mesh(mesh_shape)
    with jax.set_mesh(mesh):
        graphdef, state = nnx.split(routed_model(cfg))

    def loss(state, xs, dead):
        out = nnx.merge(graphdef, state)(xs, dead)
        value, metrics = loss_and_metrics(xs, out, lb_alpha=lb, aux_weight=1 / 32)
        return value, (out, metrics)

    return mesh, state, jax.jit(jax.value_and_grad(loss, has_aux=True))


def forward_and_grads(cfg: SAEConfig, x: np.ndarray, dead: np.ndarray, mesh_shape, lb=3.0):
    """(loss, SwitchOut, metrics, grads) of the full loss (MSE + lb + AuxK) on a mesh of
    `mesh_shape`, and numpy copies of the parameters."""
    mesh, state, fn = _loss_and_grads(cfg, tuple(mesh_shape), lb)
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, token_sharding(mesh))
        (value, (out, m)), grads = fn(state, xs, jnp.asarray(dead))
        const = {k: np.asarray(v) for k, v in nnx.to_pure_dict(state).items()}
        return jax.device_get((value, out, m, nnx.to_pure_dict(grads))), const


@pytest.mark.parametrize("mesh_shape", MESHES)
@pytest.mark.parametrize("name", ["balanced", "one_expert_90pct", "empty_experts"])
def test_dropless_equals_per_token_reference(name, mesh_shape):
    experts = routing_of(name)
    x = tokens_for(experts)
    dead = np.random.default_rng(6).random((N, 16)) < 0.5
    (loss, out, m, grads), const = forward_and_grads(CFG, x, dead, mesh_shape)
    # Outputs: the per-token equations, nothing dropped.
    ref_hat, ref_expert, ref_gate = switch_sae(x, const, CFG.k)
    np.testing.assert_array_equal(out.expert, experts)
    np.testing.assert_array_equal(ref_expert, experts)
    assert out.kept.all() and m["drop_fraction"] == 0.0
    np.testing.assert_allclose(out.gate, ref_gate, rtol=1e-6)
    np.testing.assert_allclose(out.x_hat, ref_hat, rtol=1e-4, atol=1e-5)
    ref_err, ref_norm = auxk_sums(x, const, const, dead, CFG.k, CFG.k_aux)
    np.testing.assert_allclose([out.aux_err, out.aux_norm], [ref_err, ref_norm], rtol=1e-4)
    assert m["padding_overhead"] == pytest.approx(rows_computed(experts, mesh_shape) / T)
    # The loss and every gradient: the capacity dispatch with room for every token (itself
    # tested against the reference), and the reference's MSE gradients.
    roomy = dataclasses.replace(CFG, dispatch="capacity", capacity_factor=float(N))
    (ref_loss, ref_out, ref_m, ref_grads), _ = forward_and_grads(roomy, x, dead, mesh_shape)
    assert ref_out.kept.all()
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(out.fired, ref_out.fired)
    for key in ("mse", "fvu", "l0", "lb_loss", "aux_loss", "expert_load"):
        np.testing.assert_allclose(m[key], ref_m[key], rtol=1e-5, err_msg=key)
    assert ref_m["aux_loss"] > 0
    for key, ref_grad in ref_grads.items():
        np.testing.assert_allclose(grads[key], ref_grad, rtol=2e-4, atol=1e-6, err_msg=key)
    if mesh_shape != (1, 1):
        return  # the capacity path on these meshes equals one device (test_parallel.py)
    (_, _, _, mse_grads), _ = forward_and_grads(
        dataclasses.replace(CFG, k_aux=0), x, dead, mesh_shape, lb=0.0
    )
    mse_ref = jax.grad(lambda p: switch_mse(x, p, const, CFG.k))(const)
    for key, ref_grad in mse_ref.items():
        np.testing.assert_allclose(mse_grads[key], ref_grad, rtol=1e-3, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("name", ["balanced", "one_expert_90pct", "empty_experts"])
def test_ragged_dot_path_equals_block_path(name):
    """grouped_matmul='ragged_dot' (the GPU/TPU path; a dense masked product on CPU) against
    the block path CPU runs ('auto' here), which equals the per-token reference above."""
    x = tokens_for(routing_of(name))
    dead = np.random.default_rng(6).random((N, 16)) < 0.5
    ragged_cfg = dataclasses.replace(CFG, grouped_matmul="ragged_dot")
    (loss, out, m, grads), _ = forward_and_grads(ragged_cfg, x, dead, (1, 1))
    (ref_loss, ref_out, ref_m, ref_grads), _ = forward_and_grads(CFG, x, dead, (1, 1))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(out.x_hat, ref_out.x_hat, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose([out.aux_err, out.aux_norm], [ref_out.aux_err, ref_out.aux_norm],
                               rtol=1e-5)  # fmt: skip
    np.testing.assert_array_equal(out.fired, ref_out.fired)
    for key in ("mse", "l0", "lb_loss", "aux_loss", "expert_load", "drop_fraction"):
        np.testing.assert_allclose(m[key], ref_m[key], rtol=1e-5, err_msg=key)
    assert m["padding_overhead"] == 1.0  # no padding rows
    for key, ref_grad in ref_grads.items():
        np.testing.assert_allclose(grads[key], ref_grad, rtol=2e-4, atol=1e-6, err_msg=key)


def test_ragged_dot_only_where_asked_or_on_accelerators(mesh1):
    graphdef, state = nnx.split(random_model(dataclasses.replace(CFG, grouped_matmul="ragged_dot")))
    x = jnp.zeros((T, D))
    jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(x, None).x_hat)(state))
    assert "ragged_dot" in jaxpr and "while" not in jaxpr
    graphdef, state = nnx.split(random_model(CFG))  # 'auto' on CPU: blocks
    jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(x, None).x_hat)(state))
    assert "ragged_dot" not in jaxpr and "while" in jaxpr


def test_auto_grouped_matmul_is_ragged_dot_on_tpu_only():
    """XLA:GPU may lower ragged_dot to a dense product over all N experts: blocks on GPU."""
    from sae_jax.dispatch.paths import grouped_matmul

    assert [grouped_matmul(CFG, b) for b in ("cpu", "gpu", "tpu")] == ["blocks", "blocks",
                                                                       "ragged_dot"]  # fmt: skip
    gather = dataclasses.replace(CFG, expert_kernel="gather")
    assert grouped_matmul(gather, "tpu") == "blocks"
    assert grouped_matmul(dataclasses.replace(CFG, grouped_matmul="ragged_dot"), "gpu") == (
        "ragged_dot"
    )


def test_bf16_ragged_dot_path_gradients_match_blocks_in_float32():
    """In bfloat16 the ragged_dot path's weight gradients are accumulated and kept in
    float32, as the block path's (precision.einsum) are: close to each other, and not
    rounded to bfloat16."""
    x = tokens_for(routing_of("one_expert_90pct"))
    dead = np.random.default_rng(6).random((N, 16)) < 0.5
    bf16 = dataclasses.replace(CFG, compute_dtype="bfloat16")
    (_, _, _, grads), _ = forward_and_grads(
        dataclasses.replace(bf16, grouped_matmul="ragged_dot"), x, dead, (1, 1)
    )
    (_, _, _, ref_grads), _ = forward_and_grads(bf16, x, dead, (1, 1))
    for key in ("w_enc", "w_dec"):
        g = np.asarray(grads[key])
        assert g.dtype == np.float32
        nonzero = g[g != 0]  # rows of latents that fired
        exact = np.mean(nonzero.astype(jnp.bfloat16).astype(np.float32) == nonzero)
        assert nonzero.size > 100 and exact < 0.5, (key, exact)  # cast autodiff: 1.0
        scale = np.abs(ref_grads[key]).max()
        np.testing.assert_allclose(g, ref_grads[key], atol=2e-2 * scale, err_msg=key)


def rows_computed(experts: np.ndarray, mesh_shape) -> int:
    """Rows the dropless blocks hold: per row of the mesh (the devices that exchange tokens)
    and per expert, its tokens rounded up to blocks of B = auto_block_size(T_local, N_local)."""
    data, expert_devices = mesh_shape
    block = auto_block_size(T // (data * expert_devices), N // expert_devices)
    counts = [np.bincount(part, minlength=N) for part in np.split(experts, data)]
    return int(sum((-(-c // block) * block).sum() for c in counts))


def test_gather_kernel_and_explicit_block_size():
    cfg = dataclasses.replace(CFG, expert_kernel="gather", block_size=3)
    x = tokens_for(routing_of("one_expert_90pct"))
    dead = np.ones((N, 16), bool)
    (loss, out, m, grads), _ = forward_and_grads(cfg, x, dead, (1, 1))
    (ref_loss, ref_out, _, ref_grads), _ = forward_and_grads(
        dataclasses.replace(cfg, dispatch="capacity", capacity_factor=float(N)), x, dead, (1, 1)
    )
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(out.x_hat, ref_out.x_hat, rtol=1e-5, atol=1e-5)
    for key, ref_grad in ref_grads.items():
        np.testing.assert_allclose(grads[key], ref_grad, rtol=2e-4, atol=1e-6, err_msg=key)
    counts = np.bincount(routing_of("one_expert_90pct"), minlength=N)
    assert m["padding_overhead"] == pytest.approx((-(-counts // 3) * 3).sum() / T)


def test_dropless_builds_no_tokens_by_latents_or_experts_by_tokens_array(mesh1):
    tokens, m, n = 512, 2048, 8
    cfg = SAEConfig(d=32, num_latents=m, num_experts=n, k=8, k_aux=16, dispatch="dropless")
    graphdef, state = nnx.split(random_model(cfg))
    x, dead = jnp.zeros((tokens, 32)), jnp.ones((n, m // n), bool)

    def loss(state):
        out = nnx.merge(graphdef, state)(x, dead)
        return loss_and_metrics(x, out, lb_alpha=3.0, aux_weight=1 / 32)[0]

    shapes = jaxpr_shapes(jax.make_jaxpr(jax.grad(loss))(state).jaxpr)
    block = auto_block_size(tokens, n)
    assert (block, m // n) in shapes  # one block's pre-activations
    assert not [s for s in shapes if np.prod(s) >= tokens * m]
    assert not [s for s in shapes if tokens in s and n in s and len(s) > 2]


@pytest.mark.parametrize("kernel", ["dense", "gather"])
def test_backward_reuses_the_forward_top_k_and_values(kernel):
    """The compiled backward of the block loop runs no top-k and no encoder matmul (tokens x
    W_enc, [B, L]): only the dense kernel's d_codes = g W_dec^T is [B, L]. The forward has both."""
    n, lat, block = 4, 64, 8
    keys = jax.random.split(jax.random.key(0), 3)
    p = ExpertParams(jax.random.normal(keys[0], (n, lat, D)), jnp.zeros((n, lat)),
                     jax.random.normal(keys[1], (n, lat, D)))  # fmt: skip
    xc, expert = jax.random.normal(keys[2], (T, D)), jnp.arange(T) % n

    def recon(p, b_dec):
        settings = ExpertSettings(k=4, kernel=kernel, block_size=block)
        return dropless.run(Routed(xc, expert, jnp.ones(T), b_dec), p, None, settings).recon

    out, backward = jax.vjp(recon, p, jnp.zeros(D))
    forward_hlo = jax.jit(recon).lower(p, jnp.zeros(D)).compile().as_text()
    backward_hlo = jax.jit(backward).lower(out).compile().as_text()
    block_by_latents = re.compile(rf"= f32\[{block},{lat}\]\{{[0-9,]*\}} dot\(")
    assert len(block_by_latents.findall(forward_hlo)) == 1 and "TopK" in forward_hlo
    assert len(block_by_latents.findall(backward_hlo)) == (kernel == "dense")
    assert "TopK" not in backward_hlo and "sort(" not in backward_hlo


def test_backward_residuals_are_the_tokens_and_top_k():
    """What the block loop keeps for its backward (the leaves of jax.vjp's backward): the
    layout's tokens [blocks, B, d] and the top-k ids and values [blocks, B, k], not the
    reconstructions [blocks, B, d] nor per-block fired counts [blocks, L]."""
    n, lat, block, k = 4, 64, 8, 4
    keys = jax.random.split(jax.random.key(0), 3)
    p = ExpertParams(jax.random.normal(keys[0], (n, lat, D)), jnp.zeros((n, lat)),
                     jax.random.normal(keys[1], (n, lat, D)))  # fmt: skip
    xc, expert = jax.random.normal(keys[2], (T, D)), jnp.arange(T) % n
    settings = ExpertSettings(k=k, k_aux=2, block_size=block)

    def run(p, b_dec):
        out = dropless.run(Routed(xc, expert, jnp.ones(T), b_dec), p, jnp.zeros((n, 8), jnp.int32),
                           settings)  # fmt: skip
        return out.recon, out.fired, out.aux_err

    _, backward = jax.vjp(run, p, jnp.zeros(D))
    shapes = [leaf.shape for leaf in jax.tree.leaves(backward)]
    blocks = dropless.blocks.max_blocks(T, n, block)
    assert shapes.count((blocks, block, D)) == 1  # the tokens
    assert shapes.count((blocks, block, k)) == 2  # the top-k ids and values
    assert not [s for s in shapes if s[:1] == (blocks,) and lat in s]


def test_forward_keeps_no_per_block_fired_counts(mesh1):
    """The compiled loss gradient holds the expert gradients (2 W, w_enc's and w_dec's) and
    buffers the size of the rows, but no [blocks, L] stack of per-block fired counts (they go
    straight into [N, L]) and no block output but the top-k for the backward. Small blocks
    of wide experts make [blocks, L] (here 2 W) the largest thing the old step held: it
    compiled to 47.4 MiB of temporaries, now 34.1, under the bound of 40."""
    d, n, lat, tokens, block = 64, 4, 16384, 4096, 8
    cfg = SAEConfig(d=d, num_latents=n * lat, num_experts=n, k=8, k_aux=16,
                    dispatch="dropless", block_size=block)  # fmt: skip
    graphdef, state = nnx.split(random_model(cfg))

    def loss(state, x, dead):
        out = nnx.merge(graphdef, state)(x, dead)
        return loss_and_metrics(x, out, lb_alpha=3.0, aux_weight=1 / 32)[0]

    x = jax.ShapeDtypeStruct((tokens, d), jnp.float32)
    compiled = jax.jit(jax.grad(loss)).lower(state, x, jnp.ones((n, lat), bool)).compile()
    temps = compiled.memory_analysis().temp_size_in_bytes
    blocks = dropless.blocks.max_blocks(tokens, n, block)
    expert_bytes, row_bytes, fired_bytes = n * lat * d * 4, blocks * block * d * 4, blocks * lat * 4
    assert fired_bytes >= 2 * expert_bytes
    assert temps < 2 * expert_bytes + 8 * row_bytes, (temps, expert_bytes, row_bytes)


def test_auto_block_size():
    assert auto_block_size(4096, 16) == 64
    assert auto_block_size(4096, 256) == 8
    assert auto_block_size(4096, 1) == 256
    assert auto_block_size(100, 2) == 8  # 12.5 rounded down to a power of 2


def test_dropless_config_errors_are_one_line():
    with pytest.raises(ConfigError, match="DISPATCH='sorted'") as e:
        SAEConfig(d=8, dispatch="sorted").validate()
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="block_size=-1"):
        SAEConfig(d=8, block_size=-1).validate()


def test_dropless_training_drops_nothing_and_matches_capacity(tmp_path):
    """The default config (configs/default.gin) for 300 steps, both dispatches."""
    cfg = SAEConfig(num_latents=1024, num_experts=4, k=8, k_aux=32)
    tcfg = TrainConfig(steps=300, batch_size=2048, lr=3e-3, log_every=50, eval_tokens=8192,
                       dead_after_tokens=200_000)  # fmt: skip
    finals = {}
    for dispatch in ("capacity", "dropless"):
        run_cfg = dataclasses.replace(cfg, dispatch=dispatch)
        finals[dispatch] = train(run_cfg, tcfg, tmp_path / dispatch, progress=False)
    rows = [r for r in _read(tmp_path / "dropless" / "metrics.jsonl") if "fvu" in r]
    assert rows and all(r["drop_fraction"] == 0.0 for r in rows)
    # Rows computed per device: 256 tokens in blocks of 16, at most 256 + 4 * 16 rows.
    assert all(1.0 <= r["padding_overhead"] <= 1.25 for r in rows)
    capacity_rows = [r for r in _read(tmp_path / "capacity" / "metrics.jsonl") if "fvu" in r]
    assert capacity_rows[0]["padding_overhead"] == pytest.approx(1.25)
    dropless, capacity = finals["dropless"], finals["capacity"]
    assert dropless["eval/drop_fraction"] == 0.0
    assert dropless["eval/fvu"] <= capacity["eval/fvu"], (dropless, capacity)
    # launch.eval counts no hypothetical capacity drops for a dropless run.
    assert eval_cli._eval_capacity(tmp_path / "dropless") is None
    assert eval_cli._eval_capacity(tmp_path / "capacity") == 2.0


def _read(path):
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]
