"""A training run whose --workdir is an object-store URL (gs://, against fake-gcs-server)
behaves as on a local disk: killed and resumed it equals the uninterrupted local run bitwise;
an unreadable checkpoint is set aside; metrics.jsonl, TensorBoard events and config.gin land
in the bucket, a resume keeping the rows up to its step; SIGTERM saves and exits."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from data_utils import TINY_TRAIN, assert_same_params
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launch import train as train_cli
from sae_jax import storage
from sae_jax.export import WEIGHTS
from sae_jax.training.checkpoint import Checkpointer
from sae_jax.training.metrics import MetricWriter

ROOT = Path(__file__).resolve().parent.parent
TINY = [*TINY_TRAIN, "--gin.SYNTH_FEATURES=64", "--gin.MESH_SHAPE=(1, 1)"]
STEPS = "--gin.STEPS=150"
TIMING = ("tokens_per_sec", "train_seconds")


def run(workdir: str | Path, *extra: str) -> int:
    return train_cli.main([f"--workdir={workdir}", *TINY, *extra])


def spawn(workdir: str, *extra: str, tmp: Path | None = None) -> subprocess.Popen:
    """`python -m launch.train` in a subprocess (it inherits the emulator's settings), its
    temporary files in `tmp` if given."""
    cmd = [sys.executable, "-m", "launch.train", f"--workdir={workdir}", *TINY, *extra]
    env = {**os.environ, "TMPDIR": str(tmp)} if tmp else None
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)  # fmt: skip


def finished_steps(url: str) -> list[int]:
    """The steps whose checkpoint is committed in the bucket, read fresh (no listing cache)."""
    fs, root = storage.filesystem(f"{url}/checkpoints")
    fs.invalidate_cache()
    names = fs.glob(f"{root}/*/commit_success.txt")
    return sorted(int(n.split("/")[-2]) for n in names if n.split("/")[-2].isdigit())


def wait_for_checkpoint(url: str, proc: subprocess.Popen, at_least: int) -> None:
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        steps = finished_steps(url)
        if steps and max(steps) >= at_least:
            return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint >= {at_least}: {proc.communicate()}")


def rows(workdir: str | Path) -> list[dict]:
    p = storage.path(workdir) / "metrics.jsonl"
    if storage.is_url(workdir):
        storage.filesystem(workdir)[0].invalidate_cache()
    lines = p.read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def final_params(workdir: str | Path) -> dict:
    ckpt = Checkpointer(workdir, create=False)
    params = ckpt.restore_params(ckpt.latest_step())
    ckpt.close()
    return {k: np.asarray(v) for k, v in params.items()}


def scalars(directory: Path, tag: str) -> list[tuple[int, float]]:
    """The series `tag` as TensorBoard shows it (a resume's purge applied)."""
    acc = EventAccumulator(str(directory))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run on a local disk."""
    workdir = tmp_path_factory.mktemp("reference")
    assert run(workdir, STEPS) == 0
    return workdir


def test_sigkill_then_resume_on_gs_equals_the_local_run(bucket, reference, capsys):
    url = f"{bucket}/run"
    proc = spawn(url, STEPS)
    wait_for_checkpoint(url, proc, at_least=20)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = max(finished_steps(url))
    logged = {r["step"] for r in rows(url) if "mse" in r}  # uploaded before each save:
    assert set(range(10, killed_at + 1, 10)) <= logged  # every row the resume keeps
    assert run(url, STEPS) == 0
    assert "resuming from the checkpoint at step" in capsys.readouterr().out
    assert rows(url) == rows(reference)
    assert_same_params(final_params(url), final_params(reference))
    exported = storage.path(f"{url}/export/{WEIGHTS}").read_bytes()
    assert exported == (reference / "export" / WEIGHTS).read_bytes()
    assert not storage.path(f"{url}/export.new").exists()
    gin = storage.path(f"{url}/config.gin").read_text()
    assert gin == (reference / "config.gin").read_text()
    with storage.local_copy(url) as local:  # the killed run's events and the resumed run's
        assert len(list(local.glob("events.out.tfevents.*"))) == 2
        assert scalars(local, "train/mse") == scalars(reference, "train/mse")


def test_unreadable_checkpoint_on_gs_is_set_aside(bucket, capsys):
    url = f"{bucket}/run"
    assert run(url, "--gin.STEPS=20") == 0
    fs, root = storage.filesystem(f"{url}/checkpoints/20")
    sizes = fs.du(root, total=False)
    largest = max(sizes, key=sizes.get)
    fs.pipe(largest, fs.cat(largest)[: sizes[largest] // 2])  # truncated in the bucket
    capsys.readouterr()

    assert run(url, "--gin.STEPS=30", "--allow_changes") == 0
    out, err = capsys.readouterr()
    notes = [line for line in out.splitlines() if "does not restore" in line]
    assert len(notes) == 1, out
    assert notes[0].startswith("checkpoint at step 20 does not restore (")
    assert notes[0].endswith("); moved to checkpoints/broken/20 and resuming from step 10")
    assert "resuming from the checkpoint at step 10, with changed settings: STEPS 20 -> 30" in out
    assert "Traceback" not in err
    fs.invalidate_cache()
    assert fs.exists(largest.replace("/checkpoints/20/", "/checkpoints/broken/20/"))
    assert finished_steps(url) == [10, 20, 30]  # 20 written again by the resumed run
    assert [r["step"] for r in rows(url) if "mse" in r] == [10, 20, 30]


def test_incomplete_step_on_gs_is_named_and_never_used(bucket, capsys):
    """What a kill during a save leaves on a store: the step directory without its
    commit_success.txt."""
    url = f"{bucket}/run"
    assert run(url, "--gin.STEPS=20") == 0
    fs, root = storage.filesystem(f"{url}/checkpoints")
    fs.copy(f"{root}/20", f"{root}/30", recursive=True)
    fs.rm(f"{root}/30/commit_success.txt")
    capsys.readouterr()
    assert run(url, "--gin.STEPS=40", "--allow_changes") == 0
    out = capsys.readouterr().out
    assert "resuming from the checkpoint at step 20 (ignored incomplete checkpoint 30)" in out
    assert finished_steps(url) == [20, 30, 40]  # 30 written anew
    assert run(url, "--gin.STEPS=40") == 0
    out = capsys.readouterr().out
    last = [r for r in rows(url) if "eval/fvu" in r][-1]
    assert f"{url} is already trained to step 40 (STEPS=40): nothing to do; its last eval: " \
           f"eval/fvu={last['eval/fvu']:.4g}" in out  # fmt: skip


def test_metrics_events_and_config_land_in_the_bucket(bucket, tmp_path):
    """The rows and the TensorBoard events are uploaded at sync and close; a resume keeps the
    rows up to its step, and TensorBoard hides the events after it."""
    url = f"{bucket}/run"
    writer = MetricWriter(url)
    for step in (1, 2, 3):
        writer.write({"step": step, "mse": 1.0 / step})
    writer.sync()
    assert [r["step"] for r in rows(url)] == [1, 2, 3]
    writer.write({"step": 4, "mse": 0.25})
    writer.close()
    writer = MetricWriter(url, resume_step=2)  # steps 3 and 4 run again
    assert [r["step"] for r in rows(url)] == [1, 2]
    for step in (3, 4):
        writer.write({"step": step, "mse": 2.0 / step})
    writer.close()
    assert [(r["step"], r["mse"]) for r in rows(url)] == [(1, 1.0), (2, 0.5), (3, 2 / 3),
                                                          (4, 0.5)]  # fmt: skip
    with storage.local_copy(url) as local:
        got = scalars(local, "train/mse")
        assert len(list(local.glob("events.out.tfevents.*"))) == 2
    assert got == [(1, 1.0), (2, 0.5), (3, pytest.approx(2 / 3)), (4, 0.5)]


def test_sigterm_on_gs_saves_and_exits(bucket, reference, tmp_path):
    url = f"{bucket}/run"
    proc = spawn(url, STEPS, tmp=tmp_path)
    wait_for_checkpoint(url, proc, at_least=10)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("preempted: SIGTERM: saved a checkpoint at step")
    step = int(line.split("at step ")[1].split()[0])
    assert line.endswith(f"in {url}; run the same command again to resume")
    assert max(finished_steps(url)) == step
    logged = [r["step"] for r in rows(url) if "mse" in r]
    assert logged == [s for s in range(10, step + 1, 10)]
    assert storage.path(f"{url}/config.gin").exists()
    assert not list(tmp_path.glob("sae_jax-*"))  # the local staging of the logs: removed
    assert run(url, STEPS) == 0
    assert rows(url) == rows(reference)
    assert_same_params(final_params(url), final_params(reference))


def test_wandb_files_stay_local_for_a_gs_workdir(bucket, tmp_path, monkeypatch):
    """wandb's own files go to a kept local directory (`wandb sync` reads them), not to the
    bucket; the staging directory of the rows is removed at close."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    url = f"{bucket}/run"
    writer = MetricWriter(url, wandb_config={"model": {"k": 4}})
    writer.write({"step": 1, "mse": 0.5})
    writer.close()
    assert [r["step"] for r in rows(url)] == [1]
    (kept,) = tmp_path.glob("sae_jax-wandb-*/wandb/offline-run-*")
    assert list(kept.glob("run-*.wandb"))
    assert not list(tmp_path.glob("sae_jax-logs-*"))
    fs, root = storage.filesystem(url)
    fs.invalidate_cache()
    names = sorted(n.removeprefix(f"{root}/") for n in fs.find(root))
    assert names[-1] == "metrics.jsonl" and len(names) == 2
    assert names[0].startswith("events.out.tfevents.")
