"""`python -m launch.devcheck` on CPU: the checks CPU can run pass, the rest say why not."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from launch import devcheck, device_checks, exchange_check, ragged_dot_lowering, training_checks
from sae_jax.config import SAEConfig, TrainConfig
from sae_jax.dispatch import exchange
from sae_jax.mesh import make_mesh


def test_devcheck_on_cpu(tmp_path):
    out = tmp_path / "devcheck.json"
    run = subprocess.run([sys.executable, "-m", "launch.devcheck", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    assert report["backend"] == "cpu"
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert len(status) >= 4 and list(status.values()).count("pass") >= 3, status
    assert "fail" not in status.values()
    assert status["ragged_all_to_all"] == "skip"  # XLA:CPU has no ragged_all_to_all
    assert all(c["reason"] for c in report["checks"] if c["status"] == "skip")
    check = {c["name"]: c for c in report["checks"]}
    ragged = check["ragged_dot_vs_blocks"]
    assert ragged["grad_rel_err"] < 3e-2 and ragged["blocks_step_ms"] > 0
    lowering = check[
        "ragged_dot_lowering"
    ]  # XLA:CPU lowers ragged_dot densely: a skip that says so
    assert lowering["status"] == "skip" and lowering["lowering"] == "dense"
    assert "dense" in lowering["reason"]
    assert "memory_stats" in check["peak_memory"]["reason"]
    assert status["top2_step"] == "pass" and check["top2_step"]["l0"][-1] == 32
    assert status["zero1"] == "pass" and check["zero1"]["moment_experts_per_device"] == 1
    for name in device_checks.NAMED_ON_CPU:
        assert status[name] == "skip" and "--checks" in check[name]["reason"]


def test_a_failing_check_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    def broken(sizes):
        raise RuntimeError("device lost\nsecond line")

    monkeypatch.setitem(device_checks.CHECKS, "broken", broken)
    assert devcheck.main(["--json", str(tmp_path / "r.json"), "--checks", "broken"]) == 1
    (check,) = json.loads((tmp_path / "r.json").read_text())["checks"]
    assert check["status"] == "fail" and check["reason"] == "RuntimeError: device lost"
    assert devcheck.main(["--checks", "nope"]) == 2
    assert "unknown check(s) ['nope']" in capsys.readouterr().err


def test_the_emulation_equals_the_numpy_model_in_values_and_gradients():
    """float32, bfloat16 and int32 payloads, random and all-to-one routings, on 4 devices."""
    mesh = make_mesh((1, 4))
    assert exchange_check.compare(mesh, exchange.ragged_all_to_all_emulated, 8, 4) == {}


def test_a_wrong_gradient_fails_the_exchange_comparison():
    def no_gradient(operand, output, *plan, axis_name):
        operand = jax.lax.stop_gradient(operand)
        return exchange.ragged_all_to_all_emulated(operand, output, *plan, axis_name=axis_name)

    failures = exchange_check.compare(make_mesh((1, 4)), no_gradient, 8, 4)
    assert failures == {f"{p}/{r}": "grad differ" for p in ("float32", "bfloat16")
                        for r in exchange_check.ROUTINGS}  # fmt: skip


def test_the_skewed_routing_fills_one_receive_buffer():
    e, t, d = 3, 4, 2
    x = exchange_check.small_integers((e, t, d), 0) + 10  # no zero row
    dest = exchange_check.destinations("skewed", e, t).reshape(e, t)
    got = exchange_check.model_trip(x, dest, np.ones((e, e * t, d)), np.zeros((e, t, d)))
    np.testing.assert_array_equal(got["received"][0], x.reshape(e * t, d))
    assert not got["received"][1:].any() and (got["grad"] == 1).all()


def test_ragged_all_to_all_needs_two_expert_devices_and_not_cpu():
    assert ">= 2 devices on the 'expert' axis" in device_checks.exchange_skip_reason("gpu", 1)
    assert "XLA:CPU" in device_checks.exchange_skip_reason("cpu", 8)
    assert device_checks.exchange_skip_reason("gpu", 8) is None


def test_the_lowering_detector_finds_cpu_ragged_dot_dense_and_a_plain_dot_ragged():
    found = ragged_dot_lowering.measure(64, 16, 32, 8)
    assert found["lowering"] == "dense" and found["forward"]["over_ragged"] > 6, found
    # One group's rows times its weights: what a ragged lowering of the same shapes computes.
    plain = jax.jit(lambda a, b: a @ b).lower(jnp.ones((64, 16)), jnp.ones((16, 32))).compile()
    flops, source = ragged_dot_lowering.compiled_flops(plain)
    assert source == "cost_analysis"
    assert ragged_dot_lowering.classify(flops, 2.0 * 64 * 16 * 32, 8) == "ragged"
    assert ragged_dot_lowering.classify(None, 1.0, 8) == "unknown"
    assert device_checks.lowering_verdict("dense", "gpu", "8.0x")["status"] == "fail"
    assert device_checks.lowering_verdict("unknown", "tpu", "")["status"] == "fail"
    assert device_checks.lowering_verdict("ragged", "tpu", "1.0x")["status"] == "pass"


def test_the_hlo_count_finds_the_dense_lowering_where_no_cost_analysis_is():
    ragged = 2.0 * 64 * 16 * 32
    plain = jax.jit(lambda a, b: a @ b).lower(jnp.ones((64, 16)), jnp.ones((16, 32))).compile()
    assert ragged_dot_lowering.hlo_dot_flops(plain.as_text()) == ragged
    dense = jax.jit(lambda lhs, rhs, sizes: jax.lax.ragged_dot(lhs, rhs, sizes)).lower(
        jnp.ones((64, 16)), jnp.ones((8, 16, 32)), jnp.full(8, 8, jnp.int32)
    ).compile()  # fmt: skip
    flops = ragged_dot_lowering.hlo_dot_flops(dense.as_text())
    assert flops == 8 * ragged and ragged_dot_lowering.classify(flops, ragged, 8) == "dense"


def test_memory_verdict_against_usable_memory_and_the_planner():
    gib = 2**30
    assert training_checks.memory_verdict(50 * gib, 59 * gib, 48 * gib)["status"] == "pass"
    over = training_checks.memory_verdict(60 * gib, 59 * gib, 58 * gib)
    assert over["status"] == "fail" and "exceeds the usable" in over["reason"]
    under = training_checks.memory_verdict(30 * gib, 59 * gib, 20 * gib)
    assert under["status"] == "fail" and "underestimate" in under["reason"]


def test_default_fvu_within_five_percent():
    assert training_checks.fvu_verdict(0.0185)["status"] == "pass"
    assert training_checks.fvu_verdict(0.0192)["status"] == "fail"


def test_zero1_skips_without_a_data_axis_of_two():
    one_expert = device_checks.Sizes(d=8, num_latents=64, num_experts=1, batch=16, steps=1)
    result = training_checks.zero1(one_expert)
    assert result["status"] == "skip" and ">= 2 devices on the 'data' axis" in result["reason"]


def test_a_check_skipped_on_cpu_runs_when_named():
    tiny = device_checks.Sizes(d=8, num_latents=64, num_experts=1, batch=32, steps=1)
    (named,) = device_checks.run_checks(["auxk_compile_ahead"], tiny)["checks"]
    assert named["status"] == "pass" and named["buckets"] == [0, 16] and named["compiled"] == 2


def test_the_peak_memory_run_queues_batches_and_evaluates_on_cpu():
    """The run the peak-memory check measures on a GPU/TPU (CPU has no peak to read)."""
    sizes = device_checks.Sizes(d=8, num_latents=64, num_experts=1, batch=32, steps=1)
    cfg = training_checks.check_cfg(sizes, k=4)
    tcfg = TrainConfig(steps=100, batch_size=32, mesh_shape=(1, 1))
    metrics = training_checks.run_like_the_loop(cfg, tcfg, make_mesh((1, 1)))
    assert metrics["n"] == 32 and np.isfinite(metrics["loss"])


def test_the_default_run_fvu_in_bfloat16_on_cpu():
    """default_fvu's run, cut short (the check runs the whole of default.gin)."""
    short = ("STEPS=2", "BATCH_SIZE=256", "MESH_SHAPE=(1, 1)", "TrainConfig.eval_tokens=256")
    fvu = training_checks.default_run_fvu(short)
    assert 0 < fvu < 2
    # default.gin's bindings (SAEConfig.k_aux = 32) do not reach the configs of the checks after it.
    assert SAEConfig(d=8, num_latents=64, num_experts=1, k=4).k_aux == 256


def test_the_ragged_dot_lowering_check_fails_a_dense_lowering_off_cpu(monkeypatch):
    """XLA:CPU's dense lowering, reported as if on a GPU: a fail, not a slower path."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    sizes = device_checks.Sizes(d=16, num_latents=256, num_experts=8, batch=64, steps=1)
    result = device_checks.ragged_dot_lowering(sizes)
    assert result["status"] == "fail" and "lowers ragged_dot densely" in result["reason"]


def test_the_ragged_all_to_all_check_where_the_op_runs(monkeypatch):
    """The check's own code on 8 devices, the emulation standing in for the real op."""
    monkeypatch.setattr(device_checks, "exchange_skip_reason", lambda backend, devices: None)
    monkeypatch.setattr(device_checks, "EXCHANGE_ROWS", 4)
    monkeypatch.setattr(jax.lax, "ragged_all_to_all", exchange.ragged_all_to_all_emulated)
    sizes = device_checks.Sizes(d=2, num_latents=64, num_experts=4, batch=32, steps=1)
    result = device_checks.ragged_all_to_all(sizes)
    assert result["status"] == "pass" and result["devices"] == 8, result
    assert result["real_failures"] == result["emulation_failures"] == {}
