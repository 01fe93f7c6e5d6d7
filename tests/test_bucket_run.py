"""A whole run in a bucket, against a real GCS API server (fake-gcs-server): activations read
from gs://, the workdir on gs://, two SIGKILLs and resumes, then export, load_pretrained and
launch.eval from gs:// — each equal to the uninterrupted run on local disk."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from data_utils import TINY_TRAIN, assert_same_params, final_params, untimed_rows, write_dataset

from launch import eval as eval_cli
from launch import train as train_cli
from sae_jax import load_pretrained, storage

ROOT = Path(__file__).resolve().parent.parent
D = 16
RUN = [*TINY_TRAIN, "--gin.MESH_SHAPE=(1, 1)", "--gin.STEPS=240"]


def train_args(data: str, workdir: str) -> list[str]:
    return [f"--workdir={workdir}", *RUN, f"--gin.TRAIN_DATA='{data}'",
            f"--gin.EVAL_DATA='{data}'"]  # fmt: skip


def finished_steps(workdir: str) -> list[int]:
    """Steps whose checkpoint is complete (on gs://, orbax's commit_success.txt is last)."""
    directory = storage.path(workdir) / "checkpoints"
    return [int(p.parent.name) for p in directory.glob("*/commit_success.txt")
            if p.parent.name.isdigit()]  # fmt: skip


def kill_after_checkpoint(args: list[str], workdir: str, at_least: int) -> None:
    cmd = [sys.executable, "-m", "launch.train", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if max(finished_steps(workdir), default=0) >= at_least:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"ended before the kill: {err.decode()[-2000:]}"


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> tuple[Path, Path]:
    """(activations, workdir) of the uninterrupted run on local disk, evaluated."""
    root = tmp_path_factory.mktemp("local")
    write_dataset(root / "acts", [1500, 1200, 900], d=D)
    assert train_cli.main(train_args(str(root / "acts"), str(root / "run"))) == 0
    assert eval_cli.main(["--workdir", str(root / "run"), "--no_lm", "--no_plots"]) == 0
    return root / "acts", root / "run"


def test_run_in_a_bucket_killed_twice_equals_the_local_run(local_run, bucket, capsys):
    acts, reference = local_run
    data, workdir = f"{bucket}/acts", f"{bucket}/run"
    storage.upload_tree(acts, data)
    args = train_args(data, workdir)
    kill_after_checkpoint(args, workdir, at_least=30)
    kill_after_checkpoint(args, workdir, at_least=max(finished_steps(workdir)) + 40)
    assert train_cli.main(args) == 0
    assert "resuming from the checkpoint at step" in capsys.readouterr().out
    assert untimed_rows(workdir) == untimed_rows(str(reference))
    assert_same_params(final_params(workdir), final_params(str(reference)))

    sae, local_sae = load_pretrained(f"{workdir}/export"), load_pretrained(reference / "export")
    x = np.random.default_rng(0).normal(size=(64, D)).astype(np.float32)
    np.testing.assert_array_equal(sae.decode(sae.encode(x)), local_sae.decode(local_sae.encode(x)))

    assert eval_cli.main(["--workdir", workdir, "--no_lm", "--no_plots"]) == 0
    remote = json.loads((storage.path(workdir) / "eval.json").read_text())
    local = json.loads((reference / "eval.json").read_text())
    drop = ("data", "plots", "tokens_per_sec", "seconds")  # data: the path itself
    assert {k: v for k, v in remote.items() if k not in drop} == {
        k: v for k, v in local.items() if k not in drop
    }
