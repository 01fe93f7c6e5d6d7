"""Nothing lost, nothing silently wrong: EVAL_DATA follows TRAIN_DATA when unset, evaluation
data of another d is refused before any step, the final checkpoint is saved before the final
evaluation, and the console says what a batch job's log needs."""

import io
import json
import math
import shutil
from contextlib import redirect_stdout
from pathlib import Path

import pytest
from data_utils import write_dataset

from launch import train as train_cli
from sae_jax.config import ConfigError, TrainConfig
from sae_jax.run_data import apply_run_config
from sae_jax.training import loop
from sae_jax.training.checkpoint import Checkpointer

TINY = [
    "--gin.BATCH_SIZE=64", "--gin.NUM_LATENTS=32", "--gin.NUM_EXPERTS=2", "--gin.K=4",
    "--gin.STEPS=4", "--gin.LOG_EVERY=2", "--gin.LR=1e-2", "--gin.MESH_SHAPE=(1, 1)",
    "--gin.TrainConfig.eval_tokens=128", "--gin.TrainConfig.geometric_median_tokens=256",
    "--gin.SAEConfig.k_aux=8", "--gin.ActivationData.shuffle_buffer=256",
    "--gin.ActivationData.chunk_tokens=32", "--gin.SYNTH_DIM=16", "--gin.SYNTH_FEATURES=32",
    "--no_progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_dataset(root / "train", [500, 400], d=16)
    write_dataset(root / "d8", [300], d=8, seed=1)
    write_dataset(root / "other", [300], d=16, seed=2)
    return root


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory) -> tuple[Path, str]:
    """(workdir, console) of one tiny synthetic run whose stdout is no terminal: no progress
    bar, without --no_progress."""
    workdir = tmp_path_factory.mktemp("synthetic")
    out = io.StringIO()
    with redirect_stdout(out):
        assert train_cli.main([f"--workdir={workdir}", *TINY[:-1]]) == 0
    return workdir, out.getvalue()


def rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_unset_eval_data_follows_the_training_shards(tmp_path, shards, capsys):
    """The issue's lost run: shards, EVAL_DATA unset (it was 'synthetic', of another d)."""
    rc = train_cli.main([f"--workdir={tmp_path}", *TINY, f"--gin.TRAIN_DATA='{shards / 'train'}'"])
    assert rc == 0
    out = capsys.readouterr().out
    follows = [line for line in out.splitlines() if "EVAL_DATA is left at TRAIN_DATA" in line]
    assert len(follows) == 1 and "not held-out data" in follows[0]
    assert f"EVAL_DATA='{shards / 'train'}'" in out and "synthetic" not in out
    final = rows(tmp_path)[-1]
    assert final["step"] == 4 and math.isfinite(final["eval/fvu"])
    assert "eval/feature_recovery" not in final  # real data, not planted features
    assert Checkpointer(tmp_path, create=False).latest_step() == 4
    assert (tmp_path / "export" / "cfg.json").exists()
    # launch.eval and launch.browse read the run's EVAL_DATA from its config.gin
    assert apply_run_config(tmp_path).eval_data == str(shards / "train")


@pytest.mark.parametrize("eval_data", ["d8", "synthetic"])
def test_eval_data_of_another_d_is_refused_before_any_step(tmp_path, shards, capsys, eval_data):
    spec = "synthetic" if eval_data == "synthetic" else str(shards / eval_data)
    args = [f"--workdir={tmp_path}", *TINY, "--gin.SYNTH_DIM=64",
            f"--gin.TRAIN_DATA='{shards / 'train'}'", f"--gin.EVAL_DATA='{spec}'"]  # fmt: skip
    assert train_cli.main(args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: EVAL_DATA=") and "\n" not in err
    assert f"has d={64 if eval_data == 'synthetic' else 8}" in err and "has d=16" in err
    assert "compiling" not in captured.out
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_same_d_other_source_is_allowed_and_a_kind_mismatch_warns(shards):
    train = str(shards / "train")
    held = TrainConfig(train_data=train, eval_data=str(shards / "other"))
    train_src, eval_src = loop.open_sources(held)
    assert eval_src is not train_src and eval_src.d == train_src.d == 16
    with pytest.raises(ConfigError, match="has d=8, but TRAIN_DATA="):
        loop.open_sources(TrainConfig(train_data=train, eval_data=str(shards / "d8")))
    assert loop.other_kind_warning(held) is None and loop.same_data_note(held) is None
    warning = loop.other_kind_warning(TrainConfig(train_data=train, eval_data="synthetic"))
    assert warning.startswith("warning: ") and "\n" not in warning
    assert loop.other_kind_warning(TrainConfig(train_data="synthetic", eval_data=train))
    assert loop.other_kind_warning(TrainConfig()) is None  # synthetic, EVAL_DATA unset
    assert loop.other_kind_warning(TrainConfig(train_data=train)) is None
    assert TrainConfig(train_data=train).eval_spec == train  # the default follows TRAIN_DATA


def test_a_failing_final_evaluation_keeps_the_final_checkpoint(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("the evaluation broke")

    monkeypatch.setattr(loop, "evaluate", broken)
    with pytest.raises(RuntimeError, match="the evaluation broke"):
        train_cli.main([f"--workdir={tmp_path}", *TINY, "--gin.CHECKPOINT_EVERY=100"])
    assert Checkpointer(tmp_path, create=False).latest_step() == 4
    assert (tmp_path / "export" / "cfg.json").exists()
    assert "the final evaluation failed; the training is saved" in capsys.readouterr().out


def test_a_batch_job_prints_a_metrics_line_every_log_every(synthetic_run):
    _, out = synthetic_run
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 2/4", "step 4/4"]
    for line in lines:
        assert "mse=" in line and "fvu=" in line and line.endswith(" tokens/s)")


def test_the_end_of_a_run_says_where_things_are_and_what_next(synthetic_run):
    workdir, out = synthetic_run
    lines = out.splitlines()
    end = lines[[line.startswith("checkpoints: ") for line in lines].index(True) :][:4]
    assert end[0].startswith(f"checkpoints: {workdir / 'checkpoints'} (the last at step 4)")
    assert f"tensorboard --logdir {workdir}" in end[1]
    assert f"python -m launch.eval --workdir {workdir}" in end[2]
    assert f"python -m launch.browse --workdir {workdir}" in end[3]


def test_extending_a_finished_run_keeps_its_final_checkpoint_and_export(tmp_path, monkeypatch):
    """Extend a 4-step run to 10 steps, keeping 2 checkpoints: while the extension runs (and
    when its export fails) step 4's checkpoint and the 4-step export stay; once the new final
    ones exist, step 4 goes."""
    run = [f"--workdir={tmp_path}", *TINY, "--gin.TrainConfig.keep_checkpoints=2"]
    assert train_cli.main(run) == 0
    export = tmp_path / "export"
    before = {p.name: p.read_bytes() for p in export.iterdir()}
    extend = [*run, "--gin.STEPS=10", "--gin.CHECKPOINT_EVERY=2", "--allow_changes"]

    def disk_full(params, cfg, out, *args, **kwargs):
        out.mkdir(parents=True)
        (out / "sae.safetensors").write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loop, "export_sae", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train_cli.main(extend)
    assert Checkpointer(tmp_path, create=False).all_steps() == [4, 8, 10]
    assert {p.name: p.read_bytes() for p in export.iterdir()} == before
    monkeypatch.undo()
    for step in (8, 10):  # as if the kill had come at step 7: resume the 4-step run again
        shutil.rmtree(tmp_path / "checkpoints" / str(step))
    assert train_cli.main(extend) == 0
    assert Checkpointer(tmp_path, create=False).all_steps() == [8, 10]
    assert {p.name for p in tmp_path.iterdir()}.isdisjoint({"export.new", "export.old"})
    assert {p.name: p.read_bytes() for p in export.iterdir()} != before


def test_a_drop_fraction_that_stays_high_is_warned_once(tmp_path):
    """4 experts with room for a quarter of their share of tokens: most rows are dropped, and
    the run says so once (after 3 logged steps above 5%), not at every log line."""
    out = io.StringIO()
    args = [f"--workdir={tmp_path}", *TINY, "--gin.NUM_EXPERTS=4", "--gin.CAPACITY_FACTOR=0.25",
            "--gin.STEPS=8", "--gin.LOG_EVERY=1"]  # fmt: skip
    with redirect_stdout(out):
        assert train_cli.main(args) == 0
    warnings = [line for line in out.getvalue().splitlines() if line.startswith("warning: drop")]
    assert len(warnings) == 1, out.getvalue()
    assert "for 3 logged steps" in warnings[0] and "at step 3)" in warnings[0]
    drops = [r["drop_fraction"] for r in rows(tmp_path) if "drop_fraction" in r]
    assert min(drops[:3]) > 0.05


def test_a_drop_fraction_that_dips_restarts_the_count():
    watch = loop.DropWatch()
    said = [watch.warning(s, f) for s, f in enumerate([0.1, 0.2, 0.01, 0.1, 0.1, 0.1, 0.3], 1)]
    assert [s is not None for s in said] == [False] * 5 + [True, False]
