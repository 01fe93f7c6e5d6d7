"""Checkpoints: kill/resume, preemption, integrity, incompatible workdirs, other meshes, export."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from data_utils import TINY_TRAIN, assert_same_params
from flax import nnx
from safetensors import safe_open

from launch import export as export_cli
from launch import train as train_cli
from sae_jax import load_pretrained
from sae_jax.config import SAEConfig, TrainConfig
from sae_jax.export import INDEX, WEIGHTS, export_mesh, export_sae
from sae_jax.mesh import make_mesh
from sae_jax.model.switch import SwitchSAE
from sae_jax.training.checkpoint import Checkpointer
from sae_jax.training.step import init_state, make_optimizer

ROOT = Path(__file__).resolve().parent.parent
TINY = [*TINY_TRAIN, "--gin.SYNTH_FEATURES=64"]
ONE = "--gin.MESH_SHAPE=(1, 1)"


def run(workdir: Path, *extra: str) -> int:
    return train_cli.main([f"--workdir={workdir}", *TINY, *extra])


def spawn(workdir: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "launch.train", f"--workdir={workdir}", *TINY, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def wait_for_checkpoint(workdir: Path, proc: subprocess.Popen, at_least: int) -> None:
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        steps = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
        if steps and max(steps) >= at_least:
            return
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint >= {at_least}: {proc.communicate()}")


def rows(workdir: Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    timing = ("tokens_per_sec", "train_seconds")
    return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in lines]


def final_params(workdir: Path) -> dict:
    ckpt = Checkpointer(workdir)
    params = ckpt.restore_params(ckpt.latest_step())
    ckpt.close()
    return {k: np.asarray(v) for k, v in params.items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 300-step run on one device."""
    workdir = tmp_path_factory.mktemp("reference")
    assert run(workdir, ONE, "--gin.STEPS=300") == 0
    return workdir


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, reference, capsys):
    proc = spawn(tmp_path, ONE, "--gin.STEPS=300")
    wait_for_checkpoint(tmp_path, proc, at_least=20)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert run(tmp_path, ONE, "--gin.STEPS=300") == 0
    assert "resuming from the checkpoint at step" in capsys.readouterr().out
    assert rows(tmp_path) == rows(reference)
    assert_same_params(final_params(tmp_path), final_params(reference))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_preemption_signal_saves_and_exits(tmp_path, reference, sig):
    proc = spawn(tmp_path, ONE, "--gin.STEPS=300")
    wait_for_checkpoint(tmp_path, proc, at_least=10)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"preempted: {signal.Signals(sig).name}: saved a checkpoint at step")
    step = int(line.split("at step ")[1].split()[0])
    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest_step() == step
    ckpt.close()
    assert run(tmp_path, ONE, "--gin.STEPS=300") == 0
    assert rows(tmp_path) == rows(reference)
    assert_same_params(final_params(tmp_path), final_params(reference))


def test_checkpoint_cut_off_mid_write_is_never_used(tmp_path, capsys):
    assert run(tmp_path, ONE, "--gin.STEPS=20") == 0
    ckdir = tmp_path / "checkpoints"
    # What a kill during the save of step 30 leaves: orbax's temporary directory, half full.
    broken = ckdir / "30.orbax-checkpoint-tmp-1234567"
    shutil.copytree(ckdir / "20", broken)
    for f in list(broken.rglob("*"))[::2]:
        if f.is_file():
            f.unlink()
    capsys.readouterr()
    assert run(tmp_path, ONE, "--gin.STEPS=40", "--allow_changes") == 0
    out = capsys.readouterr().out
    assert "resuming from the checkpoint at step 20" in out
    assert "ignored incomplete checkpoint 30.orbax-checkpoint-tmp-1234567" in out


def test_incompatible_workdir_is_refused_untouched(tmp_path, capsys):
    assert run(tmp_path, ONE, "--gin.STEPS=10") == 0
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    capsys.readouterr()
    assert run(tmp_path, ONE, "--gin.STEPS=20", "--gin.NUM_LATENTS=256") == 2
    err = capsys.readouterr().err.strip()
    assert "holds a checkpoint of another model (num_latents 128 vs 256)" in err
    assert "\n" not in err
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before

    # A checkpoint whose tree this version does not have (an older layout): one line from
    # training and from export, not orbax's traceback.
    delete_from_checkpoint(tmp_path / "checkpoints" / "10", "params.w_enc.")
    assert run(tmp_path, ONE, "--gin.STEPS=20", "--allow_changes") == 2
    assert export_cli.main([f"--workdir={tmp_path}", f"--out={tmp_path / 'out'}"]) == 2
    for err in capsys.readouterr().err.strip().splitlines():
        assert err.startswith("error: the checkpoint at step 10 in") and "does not match" in err


def test_restore_onto_other_meshes(tmp_path, capsys):
    """Train on (2, 4), resume on (4, 2), then on (1, 1); the start-up line says how ZeRO-1
    splits each; the state saved on one mesh (parameters, Adam moments, counters) restores
    on every other one bitwise, in that mesh's layout."""
    for steps, mesh in ((10, "(2, 4)"), (20, "(4, 2)"), (30, "(1, 1)")):
        assert run(tmp_path, f"--gin.MESH_SHAPE={mesh}", f"--gin.STEPS={steps}",
                   "--allow_changes") == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "resuming from the checkpoint at step 10, with changed settings: STEPS 10 -> 20" in out
    assert "resuming from the checkpoint at step 20, with changed settings: STEPS 20 -> 30" in out
    split = "ZeRO-1: Adam state of the expert rows split over 'data' ({} devices, by latent rows"
    assert split.format(2) in out and split.format(4) in out
    assert "ZeRO-1: off ('data' axis of 1 device)" in out
    train_rows = [r for r in rows(tmp_path) if "loss" in r]
    assert [r["step"] for r in train_rows] == [10, 20, 30]
    assert all(np.isfinite(r["loss"]) for r in train_rows)
    ckpt = Checkpointer(tmp_path)
    for step in (10, 20):  # saved on (2, 4), on (4, 2)
        states = [restored_state(ckpt, step, shape) for shape in ((2, 4), (4, 2), (1, 1))]
        for other in states[1:]:
            jax.tree.map(np.testing.assert_array_equal, states[0], other)
    ckpt.close()


def restored_state(ckpt: Checkpointer, step: int, shape: tuple[int, int]) -> dict:
    """The TrainState at `step` restored on a mesh of `shape`, as numpy arrays; its Adam
    moment of w_enc [4, 32, 16] is split over 'data' by latent rows (ZeRO-1) on 2 or 4."""
    cfg = SAEConfig.from_record(ckpt.record(step)["model"])
    with jax.set_mesh(make_mesh(shape)):
        tx = make_optimizer(cfg, TrainConfig())
        state = ckpt.restore(step, like=init_state(SwitchSAE(cfg, rngs=nnx.Rngs(0)), tx))
    mu = state.opt_state[0].mu["w_enc"][...]
    data, expert = shape
    assert mu.sharding.shard_shape(mu.shape) == (4 // expert, 32 // data, 16)
    return jax.tree.map(np.asarray, jax.device_get(state))


def test_export_then_load_reconstructs_like_the_model(tmp_path):
    assert run(tmp_path, ONE, "--gin.STEPS=20") == 0
    assert export_cli.main([f"--workdir={tmp_path}", f"--out={tmp_path / 'again'}"]) == 0
    params = final_params(tmp_path)
    cfg = SAEConfig(d=16, num_latents=128, num_experts=4, k=4, k_aux=0, capacity_factor=4.0)
    x = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
    with jax.set_mesh(make_mesh((1, 1))):
        model = SwitchSAE(cfg, rngs=__import__("flax").nnx.Rngs(0))
        for name, value in params.items():
            getattr(model, name)[...] = jnp.asarray(value)
        expected = np.asarray(model(jnp.asarray(x)).x_hat)
    for directory in (tmp_path / "export", tmp_path / "again"):
        sae = load_pretrained(directory)
        np.testing.assert_allclose(np.asarray(sae(x)), expected, rtol=1e-5, atol=1e-5)
        codes = sae.encode(x)
        assert codes.values.shape == (64, 4) and codes.indices.shape == (64, 4)
        assert int(codes.indices.max()) < 128
        np.testing.assert_array_equal(codes.indices // 32, np.repeat(codes.expert[:, None], 4, 1))
        np.testing.assert_allclose(np.asarray(sae.route(x).probs).sum(-1), 1.0, rtol=1e-5)
    # The input scale is folded in: on raw = x / s the export gives model(x) / s.
    scale = 4.0
    cfg = SAEConfig(**{**cfg.__dict__, "capacity_factor": 1.25})
    scaled = load_pretrained(export_sae(params, cfg, tmp_path / "scaled", input_scale=scale))
    np.testing.assert_allclose(np.asarray(scaled(x / scale)), expected / scale, rtol=1e-4,
                               atol=1e-5)  # fmt: skip
    assert json.loads((tmp_path / "scaled" / "cfg.json").read_text())["input_scale"] == scale


def test_export_without_checkpoint_is_an_error(tmp_path, capsys):
    assert export_cli.main([f"--workdir={tmp_path}"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
    assert export_cli.main([f"--workdir={tmp_path / 'nope'}"]) == 2
    assert not (tmp_path / "nope").exists()
    assert run(tmp_path, ONE, "--gin.STEPS=10") == 0
    capsys.readouterr()
    assert export_cli.main([f"--workdir={tmp_path}", "--step=7"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no checkpoint of step 7 in") and err.count("\n") == 1


def test_export_passes_over_an_unreadable_newest_checkpoint_in_one_line(tmp_path, capsys):
    assert run(tmp_path, ONE, "--gin.STEPS=20") == 0
    for f in (tmp_path / "checkpoints" / "20").rglob("*"):
        if f.is_file() and f.parent.name == "d":  # every data file of step 20, cut in half
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    capsys.readouterr()
    assert export_cli.main([f"--workdir={tmp_path}", f"--out={tmp_path / 'out'}"]) == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == 2 and err == "", out + err
    assert lines[0].startswith("checkpoint at step 20 does not restore (")
    assert lines[0].endswith("; exporting step 10, the next newest")
    assert lines[1] == f"exported step 10 to {tmp_path / 'out'}"
    assert json.loads((tmp_path / "out" / "cfg.json").read_text())["source"]["train_step"] == 10
    assert export_cli.main([f"--workdir={tmp_path}", "--step=20"]) == 2  # asked for: no other
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint at step 20 does not restore") and err.count("\n") == 1


def whole_state_params(workdir: Path, step: int) -> dict:
    """The parameters through a restore of the whole training state, Adam moments included
    (how export used to read them)."""
    ckpt = Checkpointer(workdir)
    try:
        args = ocp.args.Composite(state=ocp.args.StandardRestore())
        params = ckpt.manager.restore(step, args=args)["state"]["params"]
    finally:
        ckpt.close()
    return {k: np.asarray(v["value"]) for k, v in params.items()}


def delete_from_checkpoint(step_dir: Path, prefix: str) -> None:
    """Delete every array whose name starts with `prefix` from a checkpoint's OCDBT store."""
    store = {"driver": "ocdbt", "base": f"file://{step_dir / 'state'}/"}
    kv = ts.KvStore.open(store).result()
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    kv.delete_range(ts.KvStore.KeyRange(prefix, end)).result()
    assert not [k for k in kv.list().result() if k.startswith(prefix.encode())]


def test_export_of_a_2x4_checkpoint_reads_only_params_onto_one_device(tmp_path, capsys):
    """Train on a 2x4 mesh, delete the Adam state from the checkpoint, export on one device
    (a process with a single CPU device): only the parameters are read, and they are the
    trained ones. The sharded export of the same checkpoint on 8 devices equals it."""
    assert run(tmp_path, "--gin.MESH_SHAPE=(2, 4)", "--gin.STEPS=10") == 0
    expected = whole_state_params(tmp_path, 10)
    delete_from_checkpoint(tmp_path / "checkpoints" / "10", "opt_state.")
    with pytest.raises(ValueError, match="opt_state"):
        whole_state_params(tmp_path, 10)  # the deletion bites: the whole state is unreadable
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    cmd = [sys.executable, "-m", "launch.export", f"--workdir={tmp_path}",
           f"--out={tmp_path / 'one'}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "one" / WEIGHTS).exists() and not (tmp_path / "one" / INDEX).exists()
    one = load_pretrained(tmp_path / "one")
    assert_same_params({k: np.asarray(v) for k, v in one.params.items()}, expected)
    # The end-of-run export, written from the live state on the 2x4 mesh, is the same.
    end_of_run = load_pretrained(tmp_path / "export")
    assert_same_params({k: np.asarray(v) for k, v in end_of_run.params.items()}, expected)

    # Restored on the 8 devices (a 2x4 mesh), each device reads only its experts.
    ckpt = Checkpointer(tmp_path, create=False)
    params = ckpt.restore_params(10, export_mesh(4))
    ckpt.close()
    assert {s.data.shape for s in params["w_enc"].addressable_shards} == {(1, 32, 16)}
    # Forced sharded (one expert per file): a file of replicated tensors + 4 expert files.
    out = tmp_path / "sharded"
    assert export_cli.main([f"--workdir={tmp_path}", f"--out={out}", "--max_file_bytes=5000"]) == 0
    files = sorted(p.name for p in out.glob("sae-*.safetensors"))
    assert files == [f"sae-{i:05d}-of-00005.safetensors" for i in range(5)]
    assert not (out / WEIGHTS).exists()
    with safe_open(str(out / files[2]), framework="numpy") as f:
        assert f.metadata() == {"experts": "1:2", "process": "0"}
        assert sorted(f.keys()) == ["b_enc", "w_dec", "w_enc"]
    entry = json.loads((out / INDEX).read_text())["tensors"]["w_enc"]
    assert entry["shape"] == [4, 32, 16] and entry["parts"][3] == {"file": files[4],
                                                                   "experts": [3, 4]}  # fmt: skip
    sharded = load_pretrained(out)
    assert_same_params({k: np.asarray(v) for k, v in sharded.params.items()}, expected)
    for path in [*out.iterdir(), *(tmp_path / "export").iterdir()]:
        assert path.stat().st_mode & 0o777 == 0o644, path

    # The input scale is folded into every slice alike; re-exporting a directory in the
    # other form leaves none of the old files.
    ckpt = Checkpointer(tmp_path, create=False)
    cfg, whole = SAEConfig(**ckpt.record(10)["model"]), ckpt.restore_params(10)  # one device
    ckpt.close()
    single = load_pretrained(export_sae(expected, cfg, tmp_path / "single", input_scale=4.0))
    for source, limit, count in ((params, 5000, 5), (whole, 10_000, 3)):
        export_sae(source, cfg, out, input_scale=4.0, max_file_bytes=limit)
        names = [f"sae-{i:05d}-of-{count:05d}.safetensors" for i in range(count)]
        assert sorted(p.name for p in out.glob("sae-*")) == names
        assert_same_params({k: np.asarray(v) for k, v in load_pretrained(out).params.items()},
                           {k: np.asarray(v) for k, v in single.params.items()})  # fmt: skip
    export_sae(params, cfg, out, input_scale=4.0)
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", WEIGHTS]
