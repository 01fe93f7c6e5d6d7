"""Training on activation shards: outlier reporting, resume of the data position, meshes."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from data_utils import write_dataset
from test_checkpoint import assert_same_params, final_params, rows

from launch import train as train_cli

TINY = [
    "--gin.BATCH_SIZE=128", "--gin.NUM_LATENTS=64", "--gin.NUM_EXPERTS=4", "--gin.K=4",
    "--gin.LOG_EVERY=2", "--gin.CHECKPOINT_EVERY=3", "--gin.LR=1e-2",
    "--gin.TrainConfig.eval_tokens=512", "--gin.TrainConfig.dead_after_tokens=1280",
    "--gin.SAEConfig.k_aux=8", "--gin.ActivationData.shuffle_buffer=512",
    "--gin.ActivationData.chunk_tokens=32", "--no_progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("acts")
    write_dataset(root / "train", [900, 700, 1000], d=16, outliers=30)
    write_dataset(root / "eval", [600], d=16, outliers=6, seed=1)
    return root / "train", root / "eval"


LONG = ["--gin.STEPS=24", "--gin.MESH_SHAPE=(1, 1)", "--gin.TrainConfig.keep_checkpoints=10"]


def run(workdir: Path, data, *extra: str) -> int:
    train_dir, eval_dir = data
    paths = [f"--gin.TRAIN_DATA='{train_dir}'", f"--gin.EVAL_DATA='{eval_dir}'"]
    return train_cli.main([f"--workdir={workdir}", *TINY, *paths, *extra])


def test_trains_reports_outliers_and_resumes_at_the_data_position(tmp_path, data, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    assert run(full, data, *LONG) == 0
    out = capsys.readouterr().out
    assert "input scale" in out and "skipping tokens with norm" in out
    last = rows(full)[-1]
    assert np.isfinite(last["eval/fvu"]) and last["eval/fvu"] < 1
    assert last["eval/fvu_with_outliers"] != last["eval/fvu"]
    assert last["eval/outlier_fraction"] == pytest.approx(6 / 512, abs=4 / 512)
    logged = [r for r in rows(full) if "data/outlier_fraction" in r]
    assert 0 < logged[-1]["data/outlier_fraction"] < 0.05
    assert logged[-1]["data/epoch"] > 1  # 24 x 128 tokens > 2600: crossed an epoch

    # A crash right after the checkpoint at step 9: its workdir is the full run's, less later
    # checkpoints. Resuming must give the full run's later metrics and final parameters.
    shutil.copytree(full, part)
    for ckpt in (part / "checkpoints").iterdir():
        if ckpt.name.isdigit() and int(ckpt.name) > 9:
            shutil.rmtree(ckpt)
    assert run(part, data, *LONG) == 0
    assert "resuming from the checkpoint at step 9" in capsys.readouterr().out
    assert rows(part) == rows(full)
    assert_same_params(final_params(part), final_params(full))
    record = json.loads((part / "export" / "cfg.json").read_text())
    assert record["source"]["positions"][0] > 24 * 128  # raw tokens read, outliers included


def test_data_order_does_not_depend_on_the_mesh(tmp_path, data):
    no_drops = ["--gin.STEPS=6", "--gin.CAPACITY_FACTOR=4.0", "--gin.EVAL_CAPACITY_FACTOR=4.0"]
    assert run(tmp_path / "one", data, *no_drops, "--gin.MESH_SHAPE=(1, 1)") == 0
    assert run(tmp_path / "eight", data, *no_drops, "--gin.MESH_SHAPE=(2, 4)") == 0
    a, b = rows(tmp_path / "one"), rows(tmp_path / "eight")
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "mse", "eval/fvu", "eval/fvu_with_outliers"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], rel=1e-4), key


def test_bad_data_is_one_line_before_any_step(tmp_path, data, capsys):
    bad = tmp_path / "bad"
    write_dataset(bad, [300, 300], d=16)
    shard = sorted(bad.glob("*.npy"))[1]
    shard.write_bytes(shard.read_bytes()[:-64])
    assert train_cli.main([f"--workdir={tmp_path / 'w'}", *TINY, f"--gin.TRAIN_DATA='{bad}'",
                           f"--gin.EVAL_DATA='{data[1]}'"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and shard.name in err and "truncated" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "w" / "metrics.jsonl").exists()
    assert train_cli.main(["--gin_file=smollm2.gin", f"--workdir={tmp_path / 'w2'}"]) == 2
    assert "--gin.TRAIN_DATA=DIR" in capsys.readouterr().err
