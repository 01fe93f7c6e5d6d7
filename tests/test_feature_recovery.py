"""Planted-feature recovery streamed over the experts: the numpy reference's result, no
[F, N x L] cosine matrix, and a sharded decoder read where it lies."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import jaxpr_shapes
from jax.sharding import NamedSharding, PartitionSpec

from sae_jax.evaluation.recovery import best_cosines, best_cosines_program, feature_recovery
from sae_jax.mesh import make_mesh

F, N, L, D = 48, 8, 128, 32


def planted():
    """Features [F, d] and unit decoder rows [N, L, d]: some features copied, with noise, into
    rows of several experts, so the best row is not always in the first expert."""
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(F, D)).astype(np.float32) * rng.uniform(0.5, 3, (F, 1))
    w = rng.normal(size=(N, L, D)).astype(np.float32)
    for i, f in enumerate(range(0, F, 2)):  # cosines from ~0.99 down to ~0.75
        noise = rng.normal(size=D) * rng.uniform(0.1, 0.9) * np.linalg.norm(feats[f]) / np.sqrt(D)
        w[i % N, i // N] = feats[f] + noise
    w /= np.linalg.norm(w, axis=-1, keepdims=True)
    return feats, w


def reference(feats, w, threshold=0.9):
    """The dense [F, N x L] cosine matrix, in float64."""
    f = feats.astype(np.float64) / np.linalg.norm(feats, axis=-1, keepdims=True)
    best = (f @ w.reshape(-1, D).astype(np.float64).T).max(axis=-1)
    return best, float(np.mean(best > threshold))


def dense_recovery(feats, w, threshold=0.9):
    """The function as it was: one [F, N x L] product in JAX."""
    f = feats / jnp.linalg.norm(feats, axis=-1, keepdims=True)
    return float(jnp.mean(jnp.max(f @ w.reshape(-1, D).T, axis=-1) > threshold))


def test_feature_recovery_equals_the_dense_reference():
    feats, w = planted()
    ref_best, ref = reference(feats, w)
    assert 0.1 < ref < 0.5  # some features recovered, not all
    assert np.abs(ref_best - 0.9).min() > 1e-3  # no feature on the threshold
    np.testing.assert_allclose(best_cosines(feats, w), ref_best, rtol=1e-5, atol=1e-6)
    assert feature_recovery(feats, w) == pytest.approx(ref, abs=1e-7)
    assert feature_recovery(jnp.asarray(feats), jnp.asarray(w)) == dense_recovery(feats, w)


def test_no_intermediate_larger_than_features_by_latents():
    feats, w = planted()
    shapes = jaxpr_shapes(jax.make_jaxpr(best_cosines)(feats, w).jaxpr)
    assert (F, L) in shapes  # one expert's cosines
    assert not [s for s in shapes if np.prod(s) > max(F * L, N * L * D)]


def test_chunks_of_features_bound_the_cosines():
    """With room for 10 x L cosines: chunks of 10 features (the last one padded), the same
    results, and no intermediate larger than a chunk's cosines, the features or one expert."""
    feats, w = planted()
    rows, budget = 10, 10 * L * 4
    np.testing.assert_allclose(best_cosines(feats, w, budget), reference(feats, w)[0],
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    shapes = jaxpr_shapes(jax.make_jaxpr(lambda f, w: best_cosines(f, w, budget))(feats, w).jaxpr)
    assert (rows, L) in shapes
    assert not [s for s in shapes if np.prod(s) > max(rows * L, (F + 2) * D, L * D)]


@pytest.mark.parametrize(
    "mesh_shape, spec",
    [((1, 8), ("expert", None, None)), ((2, 4), ("expert", None, None)),
     ((2, 4), ("expert", None, "data")), ((2, 4), (("data", "expert"), None, None))],
)  # fmt: skip
def test_sharded_decoder_is_not_gathered(mesh_shape, spec):
    """w_dec split over the mesh (as training holds it: experts over 'expert'; also d or the
    experts over both axes): the reference's result, and the compiled program moves only
    [F]-sized maxima (or, when d is split, [F, L] partial dots and [F, 1] norms), never
    decoder rows."""
    feats, w = planted()
    ref_best, ref = reference(feats, w)
    mesh = make_mesh(mesh_shape)
    w_sharded = jax.device_put(w, NamedSharding(mesh, PartitionSpec(*spec)))
    np.testing.assert_allclose(best_cosines(feats, w_sharded), ref_best, rtol=1e-5, atol=1e-6)
    assert feature_recovery(feats, w_sharded) == pytest.approx(ref, abs=1e-7)
    chunked = best_cosines(feats, w_sharded, 10 * L * 4)  # chunks of 10 features
    np.testing.assert_allclose(chunked, ref_best, rtol=1e-5, atol=1e-6)
    program = best_cosines_program(feats, w_sharded)
    hlo = program.lower(feats, w_sharded).compile().as_text()
    collectives = re.findall(r"= (\S+) (all-gather|all-reduce|all-to-all|collective-permute)", hlo)
    assert collectives and "all-gather" not in hlo and "all-to-all" not in hlo
    allowed = {f"f32[{F}]", f"f32[{F},1]", f"f32[{F},{L}]"}  # maxima, norms, partial dots
    assert {shape.split("{")[0] for shape, _ in collectives} <= allowed, collectives
