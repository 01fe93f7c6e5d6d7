"""COMPUTE_DTYPE: mixed-precision matmuls, the centred encoder, bf16 training, its config."""

import json

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_model
from flax import nnx

from launch import train as train_cli
from sae_jax import precision
from sae_jax.config import ConfigError, SAEConfig, TrainConfig
from sae_jax.data.shards import build_manifest, write_manifest
from sae_jax.kernels import expert
from sae_jax.kernels.expert import ExpertParams, ExpertRows, ExpertSettings
from sae_jax.mesh import make_mesh
from sae_jax.model.switch import SwitchSAE
from sae_jax.training.loop import train


def test_compute_dtype_config(mesh1, monkeypatch):
    for bad in ("float16", "bf16", ""):
        with pytest.raises(ConfigError, match=f"COMPUTE_DTYPE={bad!r}") as e:
            SAEConfig(d=8, compute_dtype=bad).validate()
        assert "\n" not in str(e.value)
    cfg = SAEConfig(d=8, num_latents=16, num_experts=2, k=2)
    assert cfg.compute_dtype == "auto"
    assert SwitchSAE(cfg, rngs=nnx.Rngs(0)).cfg.compute_dtype == "float32"  # on CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert precision.resolve("auto") == "bfloat16"
    assert precision.resolve("float32") == "float32"


SPECS = {
    "cd,ld->cl": ((6, 8), (5, 8)),  # dense encoder
    "cl,ld->cd": ((6, 5), (5, 8)),  # dense decoder
    "cd,ckd->ck": ((6, 8), (6, 3, 8)),  # gathered encoder rows
    "ck,ckd->cd": ((6, 3), (6, 3, 8)),  # gathered decoder rows
}


@pytest.mark.parametrize("spec", SPECS)
def test_bf16_einsum_matches_float32_with_bf16_backward_products(spec):
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in SPECS[spec])
    weights = jnp.asarray(rng.normal(size=jnp.einsum(spec, a, b).shape), jnp.float32)

    def loss(a, b, dtype):
        return jnp.sum(precision.einsum(spec, a, b, dtype) * weights)

    grad = jax.value_and_grad(loss, argnums=(0, 1))
    value, (ga, gb) = grad(a, b, "bfloat16")
    ref_value, (ref_ga, ref_gb) = grad(a, b, "float32")
    assert ga.dtype == gb.dtype == jnp.float32  # float32 weights get float32 gradients
    np.testing.assert_allclose(value, ref_value, rtol=2e-2, atol=0.1)
    np.testing.assert_allclose(ga, ref_ga, rtol=3e-2, atol=3e-2)
    np.testing.assert_allclose(gb, ref_gb, rtol=3e-2, atol=3e-2)
    dots = _dot_operand_dtypes(jax.make_jaxpr(grad, static_argnums=2)(a, b, "bfloat16").jaxpr)
    assert len(dots) == 3 and all(
        d == {jnp.dtype("bfloat16")} for d in dots
    )  # forward + 2 backward


def _bf16_representable(a) -> float:
    """The fraction of a's entries that bfloat16 holds exactly."""
    a = np.asarray(a, np.float32)
    return float(np.mean(a.astype(jnp.bfloat16).astype(np.float32) == a))


def test_bf16_ragged_dot_keeps_float32_weight_gradients():
    """precision.ragged_dot in bfloat16 against float32 on the same data; rhs is a float32
    weight, so its gradient is float32 and not rounded to bfloat16 (as autodiff of a cast
    ragged_dot would leave it)."""
    rng = np.random.default_rng(1)
    sizes = jnp.asarray([5, 0, 9, 2], jnp.int32)  # an empty group; 16 rows, 2 hold no group
    lhs = jnp.asarray(rng.normal(size=(18, 8)), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(4, 8, 6)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(18, 6)), jnp.float32)

    def loss(lhs, rhs, dtype):
        return jnp.sum(precision.ragged_dot(lhs, rhs, sizes, dtype) * weights)

    grad = jax.value_and_grad(loss, argnums=(0, 1))
    value, (g_lhs, g_rhs) = grad(lhs, rhs, "bfloat16")
    ref_value, (ref_lhs, ref_rhs) = grad(lhs, rhs, "float32")
    assert g_lhs.dtype == g_rhs.dtype == jnp.float32
    np.testing.assert_allclose(value, ref_value, rtol=2e-2, atol=0.2)
    np.testing.assert_allclose(g_lhs, ref_lhs, rtol=3e-2, atol=5e-2)
    np.testing.assert_allclose(g_rhs, ref_rhs, rtol=3e-2, atol=5e-2)
    np.testing.assert_array_equal(g_rhs[1], 0.0)  # the empty group
    assert _bf16_representable(np.asarray(g_rhs)[[0, 2, 3]]) < 0.5  # accumulated in float32, kept
    cast_autodiff = jax.grad(
        lambda r: jnp.sum(jax.lax.ragged_dot(lhs.astype("bfloat16"), r.astype("bfloat16"),
                                             sizes, preferred_element_type=jnp.float32) * weights)
    )(rhs)  # fmt: skip
    assert _bf16_representable(cast_autodiff) == 1.0  # what this guards against


def _dot_operand_dtypes(jaxpr) -> list[set]:
    return [
        {v.aval.dtype for v in e.invars} for e in _eqns(jaxpr) if e.primitive.name == "dot_general"
    ]


def _agreement(idx: np.ndarray, ref_idx: np.ndarray) -> float:
    shared = [len(set(a) & set(b)) / len(a) for a, b in zip(idx, ref_idx, strict=True)]
    return float(np.mean(shared))


def test_bf16_topk_agrees_with_float64_on_data_with_a_large_mean():
    """Tokens 50 +- 1 per dimension: the encoder sees x - b_dec, centred in float32 before
    the rounding to bfloat16. The uncentred product x W^T - W b_dec (the encoder before
    this change) agreed on 86% of the top-k latents here; centred, 99.6%."""
    tokens, d, latents, k = 2048, 64, 1024, 8
    rng = np.random.default_rng(0)
    x = (50 + rng.normal(size=(tokens, d))).astype(np.float32)
    w = rng.normal(size=(latents, d))
    w = (w / np.linalg.norm(w, axis=1, keepdims=True)).astype(np.float32)
    b_enc = (0.1 * rng.normal(size=latents)).astype(np.float32)
    b_dec = x[:512].mean(axis=0)  # near the mean, as the geometric-median init puts it
    ref = (x.astype(np.float64) - b_dec) @ w.T.astype(np.float64) + b_enc
    ref_idx = np.argsort(-ref, axis=1)[:, :k]

    p = ExpertParams(*(jnp.asarray(v)[None] for v in (w, b_enc, w)))
    xc = expert.centre(jnp.asarray(x), jnp.asarray(b_dec), "bfloat16")
    valid = jnp.ones((1, tokens), bool)
    bufs = ExpertRows(xc[None], valid.astype(jnp.float32), valid)
    settings = ExpertSettings(k=k, kernel="dense", dtype="bfloat16")
    out = expert.run_experts(p, bufs, jnp.asarray(b_dec), None, settings)
    assert _agreement(np.asarray(out.indices[0]), ref_idx) > 0.99

    bf16 = jnp.bfloat16  # the same data defeats the uncentred product: the test is sensitive
    uncentred = jnp.einsum("cd,ld->cl", x.astype(bf16), w.astype(bf16),
                           preferred_element_type=jnp.float32) - w @ b_dec + b_enc  # fmt: skip
    assert _agreement(np.asarray(jax.lax.top_k(uncentred, k)[1]), ref_idx) < 0.95


def test_bf16_training_reaches_the_float32_fvu(tmp_path):
    # The default config (configs/default.gin) for 200 of its 1500 steps, in both dtypes.
    fvu = {}
    for dtype in ("float32", "bfloat16"):
        cfg = SAEConfig(num_latents=1024, num_experts=4, k=8, k_aux=32, compute_dtype=dtype)
        tcfg = TrainConfig(steps=200, batch_size=2048, lr=3e-3, log_every=50, eval_tokens=8192,
                           dead_after_tokens=200_000, checkpoint_every=1000)  # fmt: skip
        fvu[dtype] = train(cfg, tcfg, tmp_path / dtype, progress=False)["eval/fvu"]
    assert fvu["float32"] < 0.5  # it has trained (from 1)
    assert abs(fvu["bfloat16"] - fvu["float32"]) < 0.05 * fvu["float32"], fvu


def test_trains_on_float16_shards_in_bfloat16(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for split, n in (("train", 1024), ("eval", 512)):
        (tmp_path / split).mkdir()
        np.save(tmp_path / split / "a.npy", (30 * rng.normal(size=(n, 16))).astype(np.float16))
        write_manifest(tmp_path / split, build_manifest(tmp_path / split))
    args = [
        f"--workdir={tmp_path / 'run'}", f"--gin.TRAIN_DATA='{tmp_path / 'train'}'",
        f"--gin.EVAL_DATA='{tmp_path / 'eval'}'", "--gin.COMPUTE_DTYPE='bfloat16'",
        "--gin.STEPS=3", "--gin.BATCH_SIZE=128", "--gin.NUM_LATENTS=64", "--gin.NUM_EXPERTS=4",
        "--gin.K=4", "--gin.TrainConfig.eval_tokens=256", "--no_progress",
    ]  # fmt: skip
    assert train_cli.main(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert np.isfinite([r["loss"] for r in rows if "loss" in r]).all()
    assert 0 < rows[-1]["eval/fvu"] < 1.5
    assert "float16" in capsys.readouterr().out  # the data line names the shards' dtype


def test_bf16_dispatch_payloads_and_expert_matmuls():
    cfg = SAEConfig(d=16, num_latents=256, num_experts=8, k=4, compute_dtype="bfloat16")
    with jax.set_mesh(make_mesh((1, 8))):
        graphdef, state = nnx.split(random_model(cfg))
        x = jnp.zeros((128, 16), jnp.float32)
        jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(x).x_hat)(state).jaxpr
    eqns = _eqns(jaxpr)
    moved = {(v.aval.dtype.name, v.aval.ndim) for e in eqns if e.primitive.name == "all_to_all"
             for v in e.invars}  # fmt: skip
    assert moved == {("bfloat16", 3), ("float32", 2), ("bool", 2)}  # tokens, recon; gate, kept
    dots = [
        {v.aval.dtype.name for v in e.invars} for e in eqns if e.primitive.name == "dot_general"
    ]
    # float32: the router logits and the zero-valued [L] term that carries b_dec's gradient
    assert sorted(map(sorted, dots)) == [["bfloat16"]] * 2 + [["float32"]] * 2


def _eqns(jaxpr) -> list:
    found = list(jaxpr.eqns)
    for eqn in jaxpr.eqns:
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _eqns(sub)
    return found
