import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import jaxpr_shapes, random_model

from sae_jax.config import ConfigError, SAEConfig, TrainConfig
from sae_jax.data import SyntheticData
from sae_jax.model.init import geometric_median
from sae_jax.training.loop import train
from sae_jax.training.step import DEAD_COUNT_LAG, make_optimizer, setup_training
from sae_jax.training.update import project


def _steps(cfg: SAEConfig, tcfg: TrainConfig, batches: list[jax.Array]):
    model = random_model(cfg)
    _, state, step = setup_training(model, tcfg)
    metrics = []
    for x in batches:
        state, m = step(state, x)
        metrics.append(jax.device_get(m))
    return state, metrics


def test_decoder_rows_stay_unit_norm_and_aux_runs(mesh1):
    cfg = SAEConfig(d=16, num_latents=128, num_experts=4, k=4, k_aux=8)
    tcfg = TrainConfig(steps=6, batch_size=64, lr=1e-2, dead_after_tokens=64)
    rng = np.random.default_rng(0)
    batches = [jnp.asarray(rng.normal(size=(64, 16)), jnp.float32) for _ in range(6)]
    state, metrics = _steps(cfg, tcfg, batches)
    norms = np.linalg.norm(np.asarray(state.params["w_dec"][...]), axis=-1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    assert int(state.step) == 6
    # After one batch most latents have not fired, so they are dead and AuxK is active.
    assert metrics[-1]["dead_fraction"] > 0
    assert metrics[-1]["aux_loss"] > 0
    assert all(np.isfinite(m["loss"]) for m in metrics)


def test_decoder_gradient_projection_is_orthogonal():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(2, 5, 7))
    w /= np.linalg.norm(w, axis=-1, keepdims=True)
    g = rng.normal(size=(2, 5, 7))
    g = project(jnp.asarray(g), jnp.asarray(w), jnp.asarray(np.sum(g * w, axis=-1)))
    np.testing.assert_allclose(np.sum(np.asarray(g) * w, axis=-1), 0.0, atol=1e-6)


def _step_sizes(tx: optax.GradientTransformation, steps: int) -> list[float]:
    """The update size of each step for a constant unit gradient: the schedule's LR."""
    params = {"w_enc": jnp.zeros(())}
    state = tx.init(params)
    sizes = []
    for _ in range(steps):
        updates, state = tx.update({"w_enc": jnp.ones(())}, state, params)
        sizes.append(float(-updates["w_enc"]))
    return sizes


def test_learning_rate_schedule_holds_then_decays():
    tcfg = TrainConfig(steps=100, lr=None, decay_fraction=0.2)
    lr = tcfg.learning_rate(2**16)
    assert lr == pytest.approx(1e-4)
    # The default scales with the width: a 4x narrower dictionary, 2x the LR.
    assert TrainConfig(base_lr=1e-3).learning_rate(2**12) == pytest.approx(2e-3)
    tx = make_optimizer(SAEConfig(d=8, num_latents=2**16, num_experts=1, k=4), tcfg)
    sizes = _step_sizes(tx, 100)
    assert sizes[0] == pytest.approx(lr, rel=1e-3)
    assert sizes[79] == pytest.approx(lr, rel=1e-3)
    assert sizes[90] == pytest.approx(lr * 0.5, rel=0.06)
    assert sizes[99] < lr * 0.06
    assert isinstance(tx, optax.GradientTransformation)


def test_learning_rate_warms_up_holds_then_decays():
    tcfg = TrainConfig(steps=100, lr=1e-3, warmup_fraction=0.1, decay_fraction=0.2)
    sizes = _step_sizes(
        make_optimizer(SAEConfig(d=8, num_latents=64, num_experts=1, k=4), tcfg), 100
    )
    assert sizes[0] == pytest.approx(0.0, abs=1e-9)  # linear from 0 over 10 steps
    assert sizes[5] == pytest.approx(5e-4, rel=1e-3)
    assert sizes[10] == pytest.approx(1e-3, rel=1e-3)
    assert sizes[79] == pytest.approx(1e-3, rel=1e-3)
    assert sizes[90] == pytest.approx(5e-4, rel=0.06)
    with pytest.raises(ConfigError, match="warmup_fraction"):
        TrainConfig(warmup_fraction=0.9, decay_fraction=0.2).validate()


def test_geometric_median_resists_outliers():
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(200, 3))
    pts[:10] += 1000.0  # outliers drag the mean, not the median
    med = np.asarray(geometric_median(jnp.asarray(pts)))

    def cost(y):
        return np.linalg.norm(pts - y, axis=-1).sum()

    assert np.linalg.norm(med) < 0.5
    assert cost(med) < cost(pts.mean(0))
    for delta in np.eye(3) * 1e-2:
        assert cost(med) <= cost(med + delta) + 1e-6


def test_synthetic_data_is_deterministic_and_normalised():
    data = SyntheticData(dim=32, num_features=128, num_groups=8, seed=3)
    a, b = data.batch("train", 7, 256), data.batch("train", 7, 256)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, data.batch("train", 8, 256))
    assert not np.array_equal(a, data.batch("eval", 7, 256))
    norms = np.sum(np.asarray(data.batch("train", 0, 8192)) ** 2, axis=-1)
    assert norms.mean() == pytest.approx(32, rel=0.05)
    np.testing.assert_allclose(np.linalg.norm(data.features, axis=-1), 1.0, rtol=1e-5)


def test_short_run_lowers_fvu_and_recovers_features(tmp_path):
    # The default synthetic problem (512 features in 64 dims), a shorter run than default.gin.
    cfg = SAEConfig(num_latents=1024, num_experts=4, k=8, k_aux=32)
    tcfg = TrainConfig(
        steps=400, batch_size=2048, lr=3e-3, log_every=50, eval_tokens=8192,
        dead_after_tokens=200_000,
    )  # fmt: skip
    final = train(cfg, tcfg, tmp_path, progress=False)
    rows = [r for r in _read(tmp_path / "metrics.jsonl") if "fvu" in r]
    assert rows[0]["fvu"] > 2 * rows[-1]["fvu"]
    assert final["eval/fvu"] < 0.12
    assert final["eval/feature_recovery"] > 0.6
    assert final["eval/drop_fraction"] < 0.05
    assert set(rows[-1]) >= {
        "step", "tokens", "loss", "mse", "fvu", "l0", "dead_fraction", "lb_loss",
        "drop_fraction", "expert_load", "tokens_per_sec",
    }  # fmt: skip
    assert len(rows[-1]["expert_load"]) == 4


def _read(path):
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]


def test_config_dataclasses_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().steps = 3


def test_auxk_step_is_chosen_on_the_host_from_lagged_dead_counts(mesh1):
    cfg = SAEConfig(d=24, num_latents=128, num_experts=4, k=4, k_aux=8)
    tcfg = TrainConfig(steps=7, batch_size=64, lr=1e-2, dead_after_tokens=64)
    rng = np.random.default_rng(0)
    batches = [jnp.asarray(rng.normal(size=(64, 24)), jnp.float32) for _ in range(7)]
    _, state, step = setup_training(random_model(cfg), tcfg)
    # Neither compiled step holds a conditional (XLA would sync its predicate to the host);
    # only the AuxK step holds the second top-k (k_aux) and its work.
    # 32 latents per expert: dead buckets of 16 and 32 ids.
    jaxprs = {name: jax.make_jaxpr(fn)(state, batches[0]) for name, fn in
              (("plain", step.plain), ("16", step.for_bucket(16)), ("32", step.auxk))}  # fmt: skip
    assert [str(j).count("cond[") for j in jaxprs.values()] == [0, 0, 0]
    assert [str(j).count("top_k[") for j in jaxprs.values()] == [1, 2, 2]
    # AuxK's [E, C, B] pre-activations of the dead columns: only in the AuxK steps.
    aux_shapes = [{s for s in jaxpr_shapes(j.jaxpr) if len(s) == 3 and s[-1] == 16}
                  for j in jaxprs.values()]  # fmt: skip
    assert not aux_shapes[0] and aux_shapes[1] >= {(4, 20, 16)}
    hlo = step.plain.lower(state, batches[0]).compile().as_text()
    assert "conditional" not in hlo
    used, aux = [], []
    for x in batches:
        used.append(step.bucket(state))
        state, m = step(state, x)
        aux.append(float(m["aux_loss"]))
    # Step 0 leaves latents dead (they did not fire on its 64 tokens); the step that runs
    # AuxK first is step DEAD_COUNT_LAG = 4, which reads step 0's count.
    lag = DEAD_COUNT_LAG
    assert used[:lag] == [0] * lag and set(used[lag:]) <= {16, 32} and step.uses_auxk(state)
    assert aux[:lag] == [0.0] * lag and min(aux[lag:]) > 0
    assert list(jax.device_get(state.recent_dead)) == [int(v) for v in step._counts]
