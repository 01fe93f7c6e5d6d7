"""Metric logs (TensorBoard, Weights & Biases), what a resumed run changes, config values,
console summaries and plots: unit tests, no training."""

import dataclasses
import json
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launch.cli import BASE_GIN
from sae_jax.config import MACROS, ConfigError, SAEConfig, TrainConfig
from sae_jax.evaluation.plots import y_scale
from sae_jax.gin_setup import parse
from sae_jax.model.losses import loss_and_metrics
from sae_jax.model.switch import SwitchOut
from sae_jax.training.checkpoint import check_changes, config_changes, model_record
from sae_jax.training.loop import CONSOLE, same_data_note
from sae_jax.training.metrics import MetricWriter, summary


def train_row(step: int, scale: float) -> dict:
    return {"step": step, "tokens": 256 * step, "loss": 3.0 + scale / step, "mse": scale / step,
            "fvu": 0.5 / step, "expert_load": [0.25, 0.75], "tokens_per_sec": 1e4}  # fmt: skip


def scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the event files of `directory`, read by TensorBoard itself."""
    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_tensorboard_events_hold_every_row_and_a_resume_replaces_the_rerun_steps(tmp_path):
    writer = MetricWriter(tmp_path)
    for step in (1, 2, 3, 4):
        writer.write(train_row(step, scale=1.0))
    writer.write({"step": 4, "tokens": 1024, "eval/fvu": 0.1, "eval/mse": None})
    writer.close()
    # Resumed from a checkpoint at step 2: steps 3 and 4 run again, with other values.
    writer = MetricWriter(tmp_path, resume_step=2)
    for step in (3, 4):
        writer.write(train_row(step, scale=2.0))
    writer.write({"step": 4, "tokens": 1024, "eval/fvu": 0.2})
    writer.close()

    series = scalars(tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for name in ("loss", "mse", "fvu", "tokens_per_sec"):
        expected = [(r["step"], pytest.approx(r[name])) for r in rows if name in r]
        assert series[f"train/{name}"] == expected, name
    assert series["train/mse"] == [(1, 1.0), (2, 0.5), (3, pytest.approx(2 / 3)), (4, 0.5)]
    assert series["eval/fvu"] == [(4, pytest.approx(0.2))]
    assert "eval/mse" not in series  # a NaN (None) is left out
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    load = acc.Histograms("train/expert_load")[-1]
    assert load.step == 4 and load.histogram_value.num == 2
    assert load.histogram_value.sum == pytest.approx(1.0)


def test_event_files_do_not_load_torch_into_the_training_process(tmp_path):
    # tensorboardX imports torch when it can; with torch loaded the XLA:CPU step ran ~20%
    # slower. A fresh process: this one may hold torch from other tests.
    code = ("import sys; from sae_jax.training.metric_logs import TensorBoardLog; "
            f"log = TensorBoardLog({str(tmp_path)!r}); log.write({{'step': 1, 'mse': 0.5}}); "
            "log.close(); print('torch' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"] and list(tmp_path.glob("events.out.tfevents.*"))


def test_wandb_offline_logs_with_no_network(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("WANDB_SILENT", "true")
    writer = MetricWriter(tmp_path, wandb_config={"model": {"k": 4}})
    writer.write(train_row(1, scale=1.0))
    writer.write({"step": 1, "tokens": 256, "eval/fvu": 0.25})
    writer.close()
    (run,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    names = (b"train/mse", b"train/expert_load", b"eval/fvu", b'"k"')
    # wandb's service process writes the run file; on a loaded machine it may still be
    # flushing it when finish() returns (seen once in CI: only the file's header was there).
    deadline = time.monotonic() + 60
    while not all(n in run.read_bytes() for n in names) and time.monotonic() < deadline:
        time.sleep(0.5)
    data = run.read_bytes()
    for name in names:
        assert name in data, name


RECORD_CFG = SAEConfig(d=16, num_latents=128, num_experts=4, k=4)
RECORD_TCFG = TrainConfig(steps=20, lr=1e-3)


def record() -> dict:
    return {"model": model_record(RECORD_CFG), "train": dataclasses.asdict(RECORD_TCFG)}


def test_resuming_with_other_settings_is_named_in_one_line_and_refused_unless_allowed(tmp_path):
    assert check_changes(record(), RECORD_CFG, RECORD_TCFG, tmp_path, allow=False) == []
    cfg = dataclasses.replace(RECORD_CFG, k=8, capacity_factor=2.0, compute_dtype="bfloat16",
                              dispatch="dropless")  # fmt: skip
    tcfg = dataclasses.replace(RECORD_TCFG, lr=None, steps=40)
    with pytest.raises(ConfigError) as e:
        check_changes(record(), cfg, tcfg, tmp_path, allow=False)
    message = str(e.value)
    assert "\n" not in message and "--allow_changes" in message
    changed = [
        "K 4 -> 8",
        "CAPACITY_FACTOR 1.25 -> 2.0",
        "COMPUTE_DTYPE 'auto' -> 'bfloat16'",
        "DISPATCH 'capacity' -> 'dropless'",
        "STEPS 20 -> 40",
        "LR 0.001 -> None",
    ]
    for change in changed:
        assert change in message, change
    assert len(check_changes(record(), cfg, tcfg, tmp_path, allow=True)) == 6
    # A JSON round trip (what the checkpoint stores) changes nothing.
    assert config_changes(json.loads(json.dumps(record())), RECORD_CFG, RECORD_TCFG) == []


def test_record_of_an_older_version_is_read(tmp_path):
    """Older records carry `encoder_bias` (read by nothing, now gone) and no "train" part."""
    old = {"model": {**model_record(RECORD_CFG), "encoder_bias": True}}
    assert SAEConfig.from_record(old["model"]) == RECORD_CFG
    assert config_changes(old, RECORD_CFG, dataclasses.replace(RECORD_TCFG, steps=99)) == []
    assert config_changes(old, dataclasses.replace(RECORD_CFG, k=2), RECORD_TCFG) == ["K 4 -> 2"]
    with pytest.raises(ConfigError, match="keys this version does not know .gate_bias."):
        SAEConfig.from_record({**old["model"], "gate_bias": 1})


def test_macro_names_in_messages_are_base_gin_bindings():
    bound = re.findall(r"^(\w+)\.(\w+) = %(\w+)$", BASE_GIN.read_text(), flags=re.M)
    expected = {(c, f, m) for c, f, m in bound if c in ("SAEConfig", "TrainConfig")}
    assert {(c, f, m) for c, fields in MACROS.items() for f, m in fields.items()} == expected


def test_bare_words_bind_as_strings_where_a_string_is_expected():
    _, tcfg = parse([], ["TRAIN_DATA=data/x", "EVAL_DATA=/abs/y-1.z"])
    assert (tcfg.train_data, tcfg.eval_data) == ("data/x", "/abs/y-1.z")
    cfg, tcfg = parse([], ["SAEConfig.expert_kernel=dense", "TrainConfig.train_data=d"])
    assert (cfg.expert_kernel, tcfg.train_data) == ("dense", "d")


@pytest.mark.parametrize(
    "binding, message",
    [
        ("LR='abc'", "LR='abc' must be a number or None"),
        ("LR=abc", "--gin.LR=abc: abc is not a value; write a number, 'quoted string'"),
        ("STEPS=1e", "--gin.STEPS=1e: 1e is not a value"),
        ("SAEConfig.k_aux=x", "--gin.SAEConfig.k_aux=x: x is not a value"),
        ("SAEConfig.k_aux=1.5", "SAEConfig.k_aux=1.5 must be an integer"),
        ("MESH_SHAPE=(1,)", "MESH_SHAPE=(1,) must be a pair of integers"),
        ("MESH_SHAPE=(1,8", "--gin.MESH_SHAPE=(1,8: (1,8 is not a value"),
        ("CAPACITY_FACTOR='big'", "CAPACITY_FACTOR='big' must be a number"),
        ("TRAIN_DATA=3", "TRAIN_DATA=3 must be a quoted string"),
        ("TRAIN_DATA=@nope", "--gin.TRAIN_DATA=@nope: No configurable matching"),
    ],
)
def test_bad_value_is_one_line_naming_the_binding(binding, message):
    with pytest.raises(ConfigError) as e:
        parse([], [binding])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_eval_on_the_training_data_says_so(tmp_path):
    (tmp_path / "a").mkdir()
    same = TrainConfig(train_data=str(tmp_path / "a"), eval_data=f"{tmp_path}/./a")
    assert "EVAL_DATA is TRAIN_DATA" in same_data_note(same)
    assert same_data_note(dataclasses.replace(same, eval_data=str(tmp_path))) is None
    assert same_data_note(TrainConfig()) is None  # synthetic eval is its own stream


def test_console_shows_the_loss_terms_apart():
    row = {"loss": 3.05, "mse": 0.02, "lb_loss": 1.01, "aux_loss": 0.3, "fvu": 0.02, "l0": 8}
    line = summary(row, CONSOLE)
    assert "mse=0.02 lb_loss=1.01 aux_loss=0.3" in line and "loss=3.05" not in line


def test_drop_fraction_is_never_negative_on_a_sharded_batch():
    """1 - mean(kept) over 24 tokens on 8 devices was -3e-8."""
    mesh = jax.make_mesh((8,), ("t",))
    tokens, d, n = 24, 4, 2
    kept = jax.device_put(jnp.ones(tokens, bool), NamedSharding(mesh, PartitionSpec("t")))
    x = jnp.zeros((tokens, d))
    out = SwitchOut(x, jnp.zeros(tokens, jnp.int32), jnp.ones(tokens), kept, jnp.ones(n),
                    jnp.ones(n), jnp.zeros((n, 2)), 0.0, 0.0, 0.0, float(tokens))  # fmt: skip
    metrics = jax.jit(lambda x, out: loss_and_metrics(x, out, lb_alpha=3.0, aux_weight=0.0)[1])
    assert float(metrics(x, out)["drop_fraction"]) == 0.0


def test_log_axis_only_over_a_wide_range():
    assert y_scale([3.0, 3.2, 3.4]) == "linear"  # the LB term keeps the loss near 3
    assert y_scale([1.0, 0.3, 0.05, 0.02]) == "log"  # a falling FVU
    assert y_scale([0.0, 0.5]) == "linear" and y_scale([]) == "linear"


def _cut_off_log(tmp_path) -> str:
    """metrics.jsonl of 4 steps and an eval row, its last line cut off by a crash mid-write."""
    writer = MetricWriter(tmp_path)
    for step in (1, 2, 3, 4):
        writer.write(train_row(step, scale=1.0))
    writer.write({"step": 4, "tokens": 1024, "eval/fvu": 0.1})
    writer.write(train_row(5, scale=1.0))
    writer.close()
    path = tmp_path / "metrics.jsonl"
    text = path.read_text()
    path.write_text(text[: len(text) - 20])  # the step-5 row, cut in the middle
    return path.read_text()


def test_a_cut_off_last_line_is_read_without_a_crash(tmp_path):
    from sae_jax.evaluation.metric_rows import read_rows
    from sae_jax.evaluation.plots import training_curves
    from sae_jax.training.loop import last_eval_row, logged_seconds

    _cut_off_log(tmp_path)
    path = tmp_path / "metrics.jsonl"
    assert [r["step"] for r in read_rows(path)] == [1, 2, 3, 4, 4]
    assert last_eval_row(path)["eval/fvu"] == 0.1
    assert logged_seconds(path, 3) == 0.0  # these rows hold no train_seconds
    assert training_curves(path, tmp_path / "curves.png").exists()
    MetricWriter(tmp_path, resume_step=4).close()  # a resume keeps the complete rows
    assert [r["step"] for r in read_rows(path)] == [1, 2, 3, 4, 4]


def test_a_resume_rewrites_metrics_jsonl_atomically(tmp_path, monkeypatch):
    """A failure while the resumed rows are written (here the flush to disk) leaves the
    previous file whole, never a truncated one."""
    before = _cut_off_log(tmp_path)

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        MetricWriter(tmp_path, resume_step=2)
    assert (tmp_path / "metrics.jsonl").read_text() == before
