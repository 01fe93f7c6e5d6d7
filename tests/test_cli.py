import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from test_logs import scalars

from launch import train as train_cli

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "--gin.STEPS=4", "--gin.BATCH_SIZE=256", "--gin.NUM_LATENTS=128", "--gin.K=4",
    "--gin.SYNTH_DIM=16", "--gin.SYNTH_FEATURES=64", "--gin.LOG_EVERY=2",
    "--gin.TrainConfig.eval_tokens=512", "--no_progress",
]  # fmt: skip


def test_cli_runs_with_overrides(tmp_path, capsys):
    """One tiny run: metrics.jsonl and the same rows in TensorBoard's events, what the console
    says, then the same command again (nothing to do) and another K (refused)."""
    args = [f"--workdir={tmp_path}", "--gin.NUM_EXPERTS=2", "--gin.EVAL_DATA=synthetic", *TINY]
    rc = train_cli.main(args)
    assert rc == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4]
    assert len(train_rows[-1]["expert_load"]) == 2
    final = rows[-1]
    assert final["step"] == 4 and "eval/fvu" in final and "eval/feature_recovery" in final
    assert (
        "STEPS = 4" in (tmp_path / "config.gin").read_text()
        or "steps = 4" in (tmp_path / "config.gin").read_text()
    )
    out = capsys.readouterr().out
    for said in ("compiling the training step", "final evaluation on 512 tokens",
                 "exporting the SAE to", "eval/fvu="):  # fmt: skip
        assert said in out, said
    events = scalars(tmp_path)  # read by TensorBoard's own reader
    for row in rows:
        for name, value in row.items():
            if isinstance(value, float):
                tag = name if "/" in name else f"train/{name}"
                assert (row["step"], pytest.approx(value)) in events[tag], (name, row["step"])

    assert train_cli.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("already trained to step 4 (STEPS=4): nothing to do") == 1
    assert "resuming" not in out and "compiling" not in out
    assert train_cli.main([*args, "--gin.K=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "was trained with other settings (K 4 -> 2)" in err and "\n" not in err


@pytest.mark.parametrize(
    "binding, message",
    [
        ("--gin.STEPZ=3", "unknown macro 'STEPZ'"),
        ("--gin.steps=3", "unknown macro 'steps' (did you mean STEPS?)"),
        ("--gin.Steps=3", "unknown macro 'Steps' (did you mean STEPS?)"),
        ("--gin.K=1000", "K=1000 exceeds the latents per expert"),
        ("--gin.NUM_LATENTS=102", "not divisible by NUM_EXPERTS"),
        ("--gin.TrainConfig.stepz=3", "stepz"),
        ("--gin.STEPS=-1", "STEPS=-1 must be a positive integer"),
        ("--gin.NOT_A_BINDING", "NAME=VALUE"),
        ("--gin.COMPUTE_DTYPE='fp8'", "COMPUTE_DTYPE='fp8': use"),
        ("--gin.LR='abc'", "LR='abc' must be a number or None"),
        ("--gin.TRAIN_DATA=data/nope", "data source 'data/nope' is neither 'synthetic' nor"),
    ],
)
def test_cli_rejects_bad_binding_in_one_line(tmp_path, capsys, binding, message):
    rc = train_cli.main([f"--workdir={tmp_path}", *TINY, binding])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert message in err
    assert err.startswith("error: ") and "\n" not in err and len(err) <= 200
    assert not (tmp_path / "metrics.jsonl").exists()


def test_missing_config_file(tmp_path, capsys):
    assert train_cli.main(["--gin_file=nope.gin", f"--workdir={tmp_path}"]) == 2
    assert "config file not found: nope.gin" in capsys.readouterr().err


def test_module_entry_point_help():
    out = subprocess.run(
        [sys.executable, "-m", "launch.train", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0 and "--gin_file" in out.stdout
    # the values a plain run uses (configs/default.gin), not base.gin's NUM_EXPERTS = 8
    assert "NUM_EXPERTS = 4" in out.stdout and "TRAIN_DATA = 'synthetic'" in out.stdout


@pytest.mark.parametrize("save", ["checkpoint", "preemption"])
def test_nan_gradient_with_a_finite_loss_is_never_checkpointed(tmp_path, capsys, monkeypatch,
                                                               save):  # fmt: skip
    """A step's loss is computed before its update: a NaN gradient leaves it finite while
    every parameter becomes NaN. The grad norm says so, and the run stops before saving, at
    a periodic checkpoint or at the save a preemption signal asks for."""
    from sae_jax.training.preemption import PreemptionGuard
    from sae_jax.training.step import TrainStep

    real, calls = TrainStep.__call__, []

    def nan_gradient_at_step_5(self, state, x):
        state, metrics = real(self, state, x)
        calls.append(1)
        if len(calls) == 5:  # what an overflowing gradient does to the update
            state = state.replace(params=jax.tree.map(lambda a: a * jnp.nan, state.params))
            metrics = dict(metrics, grad_norm=jnp.float32(jnp.nan))
        return state, metrics

    monkeypatch.setattr(TrainStep, "__call__", nan_gradient_at_step_5)
    every = 5 if save == "checkpoint" else 100
    if save == "preemption":  # as if SIGTERM arrived during step 5
        monkeypatch.setattr(PreemptionGuard, "stop_after", lambda self, step: step == 5)
    args = [f"--workdir={tmp_path}", *TINY, "--gin.STEPS=20", "--gin.LOG_EVERY=10",
            f"--gin.CHECKPOINT_EVERY={every}", "--gin.MESH_SHAPE=(1, 1)"]  # fmt: skip
    assert train_cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: grad_norm is nan at step 5:"), err
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()] == []


def test_nan_loss_stops_with_a_clear_message_and_no_checkpoint(tmp_path, capsys):
    args = [f"--workdir={tmp_path}", *TINY, "--gin.STEPS=20", "--gin.LR=1e30",
            "--gin.LOG_EVERY=5", "--gin.CHECKPOINT_EVERY=5", "--gin.MESH_SHAPE=(1, 1)"]  # fmt: skip
    assert train_cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: loss is nan at step 5:"), err
    steps = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps == [], "a NaN state must never be checkpointed"
