"""Training on 1 device, 8 simulated devices and 2 processes x 4 devices gives the same run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from launch import train as train_cli
from sae_jax import load_pretrained, storage
from sae_jax.export import INDEX
from sae_jax.training.checkpoint import Checkpointer

ROOT = Path(__file__).resolve().parent.parent
RUN = [
    "--gin.STEPS=50", "--gin.BATCH_SIZE=512", "--gin.NUM_LATENTS=256", "--gin.NUM_EXPERTS=8",
    "--gin.K=4", "--gin.SYNTH_DIM=16", "--gin.SYNTH_FEATURES=64", "--gin.LOG_EVERY=10",
    "--gin.CAPACITY_FACTOR=8.0", "--gin.EVAL_CAPACITY_FACTOR=8.0", "--gin.LR=1e-3",
    "--gin.TrainConfig.eval_tokens=1024", "--gin.TrainConfig.dead_after_tokens=4096",
    "--gin.SAEConfig.k_aux=8", "--no_progress",
]  # fmt: skip
SKIP = {"tokens_per_sec", "train_seconds", "step", "tokens"}


def _rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: list[dict], b: list[dict], rtol: float = 2e-3, rows: int = 6) -> None:
    """Equal to float tolerance. Summation order differs across meshes, so a latent whose
    firing is a near-tie may flip: dead_fraction may differ by 2 of the 256 latents."""
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) == rows
    for ra, rb in zip(a, b, strict=True):
        assert set(ra) == set(rb)
        for key in set(ra) - SKIP:
            atol = 2 / 256 if key == "dead_fraction" else 1e-6
            np.testing.assert_allclose(ra[key], rb[key], rtol=rtol, atol=atol, err_msg=key)


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory) -> list[dict]:
    workdir = tmp_path_factory.mktemp("one")
    assert train_cli.main([f"--workdir={workdir}", "--gin.MESH_SHAPE=(1, 1)", *RUN]) == 0
    rows = _rows(workdir)
    assert rows[-2]["dead_fraction"] > 0, "the run should exercise AuxK"
    return rows


@pytest.mark.parametrize("mesh", ["(1, 8)", "(2, 4)", "(8, 1)"])
def test_eight_devices_train_like_one(tmp_path, one_device_run, mesh):
    assert train_cli.main([f"--workdir={tmp_path}", f"--gin.MESH_SHAPE={mesh}", *RUN]) == 0
    assert_same_run(_rows(tmp_path), one_device_run)


def spawn_two_processes(
    workdir: Path, *args: str, module: str = "launch.train"
) -> list[subprocess.Popen]:
    """`python -m launch.train` (or another module) as 2 processes x 4 CPU devices on
    localhost (gloo)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                module,
                f"--workdir={workdir}",
                *args,
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]


def finish(procs: list[subprocess.Popen]) -> list[str]:
    """Wait for the processes (killing them all if one hangs, say in a collective that the
    other never joins) and return their outputs."""
    try:
        return [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def run_two_processes(workdir: Path, *args: str, module: str = "launch.train") -> None:
    procs = spawn_two_processes(workdir, *args, module=module)
    outputs = finish(procs)
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]


def test_two_processes_match_one_process(tmp_path, one_device_run):
    """...and export without gathering: the end-of-run export, and launch.export run as 2
    processes (parameters restored onto a 1x8 mesh, so each process holds 4 experts and
    writes them), load equal to the trained parameters."""
    run_two_processes(tmp_path, "--gin.MESH_SHAPE=(2, 4)", *RUN)
    assert_same_run(_rows(tmp_path), one_device_run)
    out = tmp_path / "export_cli"
    run_two_processes(tmp_path, f"--out={out}", module="launch.export")
    ckpt = Checkpointer(tmp_path, create=False)
    expected = {k: np.asarray(v) for k, v in ckpt.restore_params(50).items()}
    ckpt.close()
    for directory in (tmp_path / "export", out):
        assert (directory / INDEX).exists()  # several processes: always the sharded form
        params = load_pretrained(directory).params
        assert params.keys() == expected.keys()
        for name, value in expected.items():
            np.testing.assert_array_equal(params[name], value, err_msg=f"{directory} {name}")
    writers = []
    for path in sorted(out.glob("sae-*.safetensors"))[1:]:
        with safe_open(str(path), framework="numpy") as f:
            writers.append(f.metadata()["process"])
    assert sorted(writers) == ["0"] * 4 + ["1"] * 4, writers


@pytest.mark.parametrize("where", ["local", "gs"])
def test_two_processes_read_their_own_shards(tmp_path, where, request):
    """Each process feeds its rows from its own shards; the checkpoint keeps both positions,
    and resuming with another process count is refused (the data order depends on it). With
    the shards and the workdir in a bucket (gs://), nothing is shared but the store: each
    process reads its own shards' ranges, orbax writes the checkpoint from both, and each
    process uploads its own experts' export files."""
    from data_utils import write_dataset

    write_dataset(tmp_path / "train", [700, 500, 600, 400], d=16, outliers=8)
    write_dataset(tmp_path / "eval", [300, 300], d=16, seed=1)
    root = str(tmp_path)
    if where == "gs":
        root = request.getfixturevalue("bucket")
        storage.upload_tree(tmp_path / "train", f"{root}/train")
        storage.upload_tree(tmp_path / "eval", f"{root}/eval")
    data = [
        f"--gin.TRAIN_DATA='{root}/train'",
        f"--gin.EVAL_DATA='{root}/eval'",
        "--gin.STEPS=6",
        "--gin.CHECKPOINT_EVERY=3",
        "--gin.TrainConfig.eval_tokens=512",
        "--gin.ActivationData.shuffle_buffer=256",
        "--gin.ActivationData.chunk_tokens=32",
    ]
    run = [a for a in RUN if not a.startswith(("--gin.STEPS", "--gin.TrainConfig.eval"))]
    workdir = storage.path(f"{root}/run")
    run_two_processes(workdir, "--gin.MESH_SHAPE=(2, 4)", *run, *data)
    rows = _rows(workdir)
    assert np.isfinite(rows[-1]["eval/fvu"])
    source = json.loads((workdir / "export" / "cfg.json").read_text())["source"]
    assert source["process_count"] == 2
    # 6 steps x 256 rows per process, plus any outliers each stream skipped (8 in all)
    assert all(6 * 256 <= p <= 6 * 256 + 8 for p in source["positions"])
    more = [*run, *data, "--gin.STEPS=9", "--gin.MESH_SHAPE=(1, 1)", "--allow_changes"]
    assert train_cli.main([f"--workdir={workdir}", *more]) == 2


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
    """The scheduler's signal may reach one process only (or each at another time); JAX's
    preemption service makes both save the same step, and the run resumes as if unbroken."""
    run = [a for a in RUN if not a.startswith("--gin.STEPS")] + ["--gin.STEPS=80"]
    procs = spawn_two_processes(tmp_path, "--gin.MESH_SHAPE=(2, 4)", *run)
    deadline = time.time() + 240
    while time.time() < deadline and not any(p.poll() is not None for p in procs):
        if (tmp_path / "metrics.jsonl").exists() and len(_rows(tmp_path)) >= 2:
            break
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # not the process that writes metrics
    outputs = finish(procs)
    lines = [out.strip().splitlines()[-1] for out in outputs]
    assert [p.returncode for p in procs] == [128 + signal.SIGTERM] * 2, outputs[1][-3000:]
    steps = {int(line.split("at step ")[1].split()[0]) for line in lines}
    assert len(steps) == 1 and 20 <= steps.pop() < 80, lines
    assert all(line.startswith("preempted: SIGTERM: saved a checkpoint") for line in lines)
    run_two_processes(tmp_path, "--gin.MESH_SHAPE=(2, 4)", *run)
    reference = tmp_path / "reference"
    assert train_cli.main([f"--workdir={reference}", "--gin.MESH_SHAPE=(2, 4)", *run]) == 0
    assert_same_run(_rows(tmp_path), _rows(reference), rows=9)
