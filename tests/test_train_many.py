"""launch.train_many: several SAEs from one read of each data directory, each ending bitwise
as its own launch.train run from the config.gin it leaves; a SIGKILL and a resume change
nothing; the SAES list's errors are one line."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from data_utils import TINY_TRAIN, assert_same_params, final_params, untimed_rows, write_dataset

from launch import train as train_cli
from launch import train_many as many_cli
from sae_jax.config import ConfigError
from sae_jax.data import ActivationData
from sae_jax.gin_setup import parse
from sae_jax.sae_set import parse_many, read_sae_set
from sae_jax.training.step import TrainStep

ROOT = Path(__file__).resolve().parent.parent
D = 16
SAES = """SAES = [
    {'name': 'l3_small', 'layer': 3},
    {'name': 'l3_wide', 'layer': 3, 'NUM_LATENTS': 256, 'K': 8, 'NUM_EXPERTS': 1, 'LR': 1e-3},
    {'name': 'l9', 'layer': 9},
]
"""
NAMES = ("l3_small", "l3_wide", "l9")


def multi_layer_dump(root: Path) -> Path:
    """A two-layer dump's layout (layers.json, layer_03, layer_09) of random tokens."""
    for seed, layer in enumerate((3, 9)):
        write_dataset(root / f"layer_{layer:02d}", [1500, 1200, 900], d=D, seed=seed)
    (root / "layers.json").write_text(json.dumps({"layers": [3, 9]}))
    return root


def many_args(data: Path, config: Path, workdir: Path) -> list[str]:
    return [f"--gin_file={config}", f"--workdir={workdir}", *TINY_TRAIN,
            "--gin.MESH_SHAPE=(1, 1)", "--gin.STEPS=60", f"--gin.TRAIN_DATA='{data}'",
            f"--gin.EVAL_DATA='{data}'"]  # fmt: skip


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> tuple[Path, Path, Path, list[str], list[int]]:
    """(data, config, workdir, train streams opened, steps compiled per TrainStep.compile
    call) of the uninterrupted job."""
    root = tmp_path_factory.mktemp("many")
    data = multi_layer_dump(root / "acts")
    config = root / "many.gin"
    config.write_text(f"include 'base.gin'\n{SAES}")
    opened, compiled = [], []
    batches, compile_steps = ActivationData.batches, TrainStep.compile

    def counted_compile(self, *args):
        compiled.append(compile_steps(self, *args))
        return compiled[-1]

    def counted(self, split, *args, **kwargs):
        if split == "train":
            opened.append(str(self.directory))
        return batches(self, split, *args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(ActivationData, "batches", counted)
        m.setattr(TrainStep, "compile", counted_compile)
        assert many_cli.main(many_args(data, config, root / "job")) == 0
    return data, config, root / "job", opened, compiled


def test_each_sae_equals_its_own_run_from_its_config(job, tmp_path):
    data, _, workdir, _, _ = job
    assert [s["name"] for s in read_sae_set(workdir)] == list(NAMES)
    assert [s["layer"] for s in read_sae_set(workdir)] == [3, 3, 9]
    for name in NAMES:
        alone = tmp_path / name
        args = [f"--gin_file={workdir / name / 'config.gin'}", f"--workdir={alone}",
                "--no_progress"]  # fmt: skip
        assert train_cli.main(args) == 0
        assert untimed_rows(workdir / name) == untimed_rows(alone), name
        assert_same_params(final_params(workdir / name), final_params(alone))
        mine = sorted(p.name for p in (workdir / name / "export").iterdir())
        for f in mine:
            assert (workdir / name / "export" / f).read_bytes() == (
                alone / "export" / f
            ).read_bytes()
    assert "layer_09" in (workdir / "l9" / "config.gin").read_text()


def test_each_data_directory_is_read_once(job):
    data, _, _, opened, _ = job
    assert sorted(opened) == [str(data / "layer_03"), str(data / "layer_09")]


def test_saes_of_one_config_compile_their_step_once(job):
    """l9 is l3_small on another layer: it runs l3_small's executables (and stays bitwise its
    own run: test_each_sae_equals_its_own_run_from_its_config)."""
    *_, compiled = job
    assert len(compiled) == 2 and all(n > 0 for n in compiled), compiled


def finished_steps(workdir: Path) -> dict[str, int]:
    found = {}
    for name in NAMES:
        steps = [int(p.name) for p in (workdir / name / "checkpoints").iterdir()
                 if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists()]  # fmt: skip
        found[name] = max(steps, default=0)
    return found


def test_a_sigkill_and_a_resume_change_nothing(job, tmp_path, capsys):
    data, config, reference, *_ = job
    workdir = tmp_path / "job"
    cmd = [sys.executable, "-m", "launch.train_many", *many_args(data, config, workdir)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (workdir / "l9" / "checkpoints").exists() and min(
            finished_steps(workdir).values()
        ) >= 30:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"ended before the kill: {err.decode()[-2000:]}"
    # One SAE a checkpoint behind the others: it steps alone until they join it.
    behind = workdir / "l3_wide" / "checkpoints"
    shutil.rmtree(behind / str(max(int(p.name) for p in behind.iterdir() if p.name.isdigit())))
    assert many_cli.main(many_args(data, config, workdir)) == 0
    assert "l3_wide: resuming at step" in capsys.readouterr().out
    for name in NAMES:
        assert untimed_rows(workdir / name) == untimed_rows(reference / name), name
        assert_same_params(final_params(workdir / name), final_params(reference / name))
    assert many_cli.main(many_args(data, config, workdir)) == 0
    assert "already trained" in capsys.readouterr().out


@pytest.mark.parametrize(
    "saes, message",
    [
        ("[]", "SAES is empty"),
        ("[{'K': 4}]", "needs a 'name'"),
        ("[{'name': 'a', 'STEPS': 5}]", "STEPS is job-wide"),
        ("[{'name': 'a', 'KK': 5}]", "unknown key 'KK'"),
        ("[{'name': 'a'}, {'name': 'a', 'K': 8}]", "the name(s) a appear more than once"),
        ("[{'name': 'a', 'layer': 4}]", "layer 4 is not in"),
        ("[{'name': 'a', 'layer': 'x'}]", "must be a block index"),
    ],
)
def test_a_bad_list_is_one_line(tmp_path, saes, message):
    data = multi_layer_dump(tmp_path / "acts")
    config = tmp_path / "many.gin"
    config.write_text(f"include 'base.gin'\nSAES = {saes}\n")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        parse_many([config], [f"TRAIN_DATA='{data}'"])
    assert "\n" not in str(e.value)


def test_a_layer_needs_a_multi_layer_dump(tmp_path):
    write_dataset(tmp_path / "plain", [600], d=D)
    config = tmp_path / "many.gin"
    config.write_text("include 'base.gin'\nSAES = [{'name': 'a', 'layer': 3}]\n")
    with pytest.raises(ConfigError, match="is not a multi-layer dump"):
        parse_many([config], [f"TRAIN_DATA='{tmp_path / 'plain'}'"])


def test_launch_train_refuses_a_list(tmp_path, capsys):
    assert train_cli.main(["--gin_file=smollm2_many.gin", f"--workdir={tmp_path}"]) == 2
    assert "launch.train_many" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="lists 4 SAEs"):
        parse(["smollm2_many.gin"], [])


def test_the_worked_example_parses(tmp_path):
    specs = parse_many(["smollm2_many.gin"], ["TRAIN_DATA='/data'"])
    assert [(s.sae_cfg.num_latents, s.sae_cfg.k) for s in specs] == [
        (2304, 16), (2304, 32), (4608, 16), (4608, 32)
    ]  # fmt: skip
    assert all(s.tcfg.train_data == "/data" for s in specs)


def test_saes_that_do_not_fit_together_are_refused_in_one_line(job, monkeypatch, capsys):
    from sae_jax.training import many

    data, config, *_ = job
    monkeypatch.setattr(many, "device_memory_bytes", lambda: 2**20)
    args = many_args(data, config, config.parent / "too_big")
    assert many_cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "3 SAEs in turn on MESH_SHAPE=(1, 1) need about" in err and "\n" not in err


def test_a_layer_list_or_all_makes_one_sae_per_layer(tmp_path):
    data = multi_layer_dump(tmp_path / "acts")
    config = tmp_path / "many.gin"
    config.write_text("include 'base.gin'\nSAES = [{'name': 'e', 'layer': 'all', 'K': 8}, "
                      "{'name': 'f', 'layer': [9]}]\n")  # fmt: skip
    specs = parse_many([config], [f"TRAIN_DATA='{data}'", f"EVAL_DATA='{data}'"])
    got = [(s.name, s.layer, s.sae_cfg.k, s.tcfg.train_data, s.tcfg.eval_spec) for s in specs]
    l3, l9 = str(data / "layer_03"), str(data / "layer_09")
    assert got == [("e_l03", 3, 8, l3, l3), ("e_l09", 9, 8, l9, l9), ("f_l09", 9, 32, l9, l9)]
    config.write_text("include 'base.gin'\nSAES = [{'name': 'e', 'layer': 'all'}]\n")
    with pytest.raises(ConfigError, match="has layer 'all', but TRAIN_DATA="):
        parse_many([config], ["TRAIN_DATA='synthetic'"])
