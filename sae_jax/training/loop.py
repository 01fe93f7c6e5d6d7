"""The training loop: build model and state, run steps, log, evaluate."""

from __future__ import annotations

import dataclasses
import json
import time
from contextlib import closing
from itertools import islice
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from sae_jax.config import ConfigError, SAEConfig, TrainConfig
from sae_jax.data import ActivationData, make_source
from sae_jax.distributed import gather_ints, process_rows, put_local
from sae_jax.evaluation.held_out import evaluate, make_eval_step
from sae_jax.export import export_sae
from sae_jax.mesh import make_mesh, token_sharding
from sae_jax.model.init import geometric_median
from sae_jax.model.switch import SwitchSAE, check_mesh
from sae_jax.plan.suggest import check_fits, device_memory_bytes
from sae_jax.training.checkpoint import Checkpointer, check_changes, check_compatible, model_record
from sae_jax.training.metric_logs import check_wandb
from sae_jax.training.metrics import MetricWriter, summary
from sae_jax.training.preemption import Preempted, PreemptionGuard
from sae_jax.training.step import setup_training

# The loss's parts apart (loss = mse + LB_ALPHA * lb_loss + aux_weight * aux_loss; lb_loss is
# at least 1, so the total sits near LB_ALPHA whatever the reconstruction).
CONSOLE = ("mse", "lb_loss", "aux_loss", "fvu", "l0", "dead_fraction", "drop_fraction")
FINAL = ("eval/fvu", "eval/mse", "eval/l0", "eval/drop_fraction", "eval/feature_recovery")


class TrainingError(RuntimeError):
    """Training cannot go on (for example the loss became NaN)."""


def build_model(cfg: SAEConfig, tcfg: TrainConfig, source) -> SwitchSAE:
    """Create the SAE under the current mesh, its expert tensors born sharded (inside jit, so
    no device ever holds them whole), with b_dec = b_router = geometric median of a sample."""
    median = geometric_median(jax.numpy.asarray(source.sample(tcfg.geometric_median_tokens)))

    @nnx.jit
    def create(median):
        model = SwitchSAE(cfg, rngs=nnx.Rngs(tcfg.seed))
        model.b_dec[...] = median
        if cfg.num_experts > 1:
            model.b_router[...] = median
        return model

    return create(median)


def train(
    sae_cfg: SAEConfig,
    tcfg: TrainConfig,
    workdir: str | Path,
    progress: bool = True,
    config_text: str = "",
    allow_changes: bool = False,
    wandb: bool = False,
) -> dict:
    """Train to `tcfg.steps`, resuming from the last complete checkpoint in workdir, writing
    workdir/metrics.jsonl (and TensorBoard events; a Weights & Biases run with `wandb`) and
    checkpoints; returns the final eval row. Resuming a checkpoint trained with other settings
    (K, LR, STEPS, ...) is refused unless `allow_changes`.

    SIGTERM / SIGINT save a checkpoint at a step boundary (the same one on every process) and
    raise Preempted.
    """
    tcfg.validate()
    if wandb:
        check_wandb()
    train_src = make_source(tcfg.train_data, tcfg.seed)
    eval_src = (
        train_src if tcfg.eval_data == tcfg.train_data else make_source(tcfg.eval_data, tcfg.seed)
    )
    real = isinstance(train_src, ActivationData)
    if real and isinstance(eval_src, ActivationData):
        eval_src.input_scale = train_src.input_scale  # the model's scale, not the eval set's
    cfg = dataclasses.replace(sae_cfg, d=train_src.d).validate()
    mesh = make_mesh(tcfg.mesh_shape)
    check_mesh(cfg, dict(mesh.shape), tcfg.batch_size)
    if (memory := device_memory_bytes()) is not None:  # GPU/TPU: before anything is created
        check_fits(cfg, tcfg, (mesh.shape["data"], mesh.shape["expert"]), memory)
    tokens = token_sharding(mesh)
    rows = process_rows(tokens, tcfg.batch_size)
    local_rows = rows.stop - rows.start
    eval_batches = min(max(1, tcfg.eval_tokens // tcfg.batch_size), eval_src.max_batches(
        tcfg.batch_size))  # fmt: skip
    if eval_batches < 1:
        raise ConfigError(f"EVAL_DATA={tcfg.eval_data!r} holds less than one batch")
    lead = jax.process_index() == 0
    input_scale = train_src.input_scale
    ckpt = Checkpointer(workdir, tcfg.keep_checkpoints)
    start, position, changes = resume_point(ckpt, cfg, tcfg, real, allow_changes)
    if start >= tcfg.steps:
        ckpt.close()
        final = last_eval_row(Path(workdir) / "metrics.jsonl")
        say(lead, f"{workdir} is already trained to step {start} (STEPS={tcfg.steps}): "
            f"nothing to do; its last eval: {summary(final, FINAL)}")  # fmt: skip
        return final
    if real:
        say(lead, data_message(train_src))
    if (note := same_data_note(tcfg)) is not None:
        say(lead, note)
    with jax.set_mesh(mesh):
        model = build_model(cfg, tcfg, train_src)
        graphdef, state, step_fn = setup_training(model, tcfg)
        del model
        if start:
            state = ckpt.restore(start, like=state)
            say(lead, resume_message(ckpt, start, changes))
        run_config = {"model": model_record(cfg), "train": dataclasses.asdict(tcfg)}
        wandb_config = run_config if wandb else None
        writer = MetricWriter(workdir, start, wandb_config) if lead else None
        if lead and config_text:
            (Path(workdir) / "config.gin").write_text(config_text)
        eval_step = make_eval_step(
            graphdef, cfg.eval_capacity_factor, tcfg.lb_alpha, tcfg.aux_weight
        )

        def record(step: int) -> dict:
            data = {"train_step": step, "seed": tcfg.seed, "input_scale": input_scale,
                    "train_data": tcfg.train_data, "process_count": jax.process_count(),
                    "positions": gather_ints(position)}  # fmt: skip
            return {"model": model_record(cfg), "train": dataclasses.asdict(tcfg), "data": data,
                    "gin_config": config_text}  # fmt: skip

        def held_out():
            with closing(eval_src.batches("eval", rows, tcfg.batch_size)) as batches:
                for b in islice(batches, eval_batches):
                    keep = np.ones(local_rows) if b.keep is None else b.keep
                    yield (put_local(b.x, tokens, tcfg.batch_size),
                           put_local(keep.astype(np.float32), tokens, tcfg.batch_size))  # fmt: skip

        def run_eval(step: int) -> dict:
            row = evaluate(
                eval_step,
                state.params,
                held_out(),
                outliers=isinstance(eval_src, ActivationData),
                features=getattr(eval_src, "features", None),
            )
            return log(step, row)

        def log(step: int, row: dict) -> dict:
            row = {"step": step, "tokens": step * tcfg.batch_size, **row}
            return writer.write(row) if writer else row

        say(lead, f"compiling the training step (the first step takes a while), then "
            f"training steps {start + 1}-{tcfg.steps}")  # fmt: skip
        bar = tqdm(total=tcfg.steps, initial=start, disable=not (progress and lead), unit="step")
        last_time, last_step = time.perf_counter(), start
        auxk_said = False
        batches = train_src.batches("train", rows, tcfg.batch_size, start=position)
        with PreemptionGuard() as guard, closing(ckpt), closing(batches):
            for step in range(start, tcfg.steps):
                batch = next(batches)
                if lead and not auxk_said and step_fn.uses_auxk(state):
                    auxk_said = True  # the AuxK variant compiles at its first use
                    tqdm.write(f"step {step + 1}: dead latents; compiling the AuxK step")
                state, metrics = step_fn(state, put_local(batch.x, tokens, tcfg.batch_size))
                position = batch.position
                done = step + 1
                if done % tcfg.log_every == 0 or done == tcfg.steps:
                    metrics = jax.device_get(metrics)
                    if real:  # this process's stream: raw tokens read vs tokens used
                        metrics["data/outlier_fraction"] = 1 - done * local_rows / position
                        metrics["data/epoch"] = position / train_src.local_tokens[
                            jax.process_index()]  # fmt: skip
                    now = time.perf_counter()
                    speed = (done - last_step) * tcfg.batch_size / (now - last_time)
                    metrics["tokens_per_sec"] = speed
                    last_time, last_step = now, done
                    check_finite(metrics, done)
                    bar.set_postfix_str(summary(log(done, metrics), CONSOLE))
                if tcfg.eval_every and done % tcfg.eval_every == 0 and done != tcfg.steps:
                    run_eval(done)
                bar.update(1)
                if guard.stop_after(done) and done < tcfg.steps:
                    ckpt.save(done, state, record(done))  # closing(ckpt) waits for it
                    bar.close()
                    raise Preempted(guard.signal, done, Path(workdir))
                if done < tcfg.steps and done % tcfg.checkpoint_every == 0:
                    check_finite(jax.device_get(metrics), done)  # never save a NaN state
                    ckpt.save(done, state, record(done))
            bar.close()
            say(lead, f"final evaluation on {eval_batches * tcfg.batch_size} tokens of "
                f"EVAL_DATA={tcfg.eval_data!r}")  # fmt: skip
            final = run_eval(tcfg.steps)
            final_record = record(tcfg.steps)  # a collective: every process calls it
            say(lead, f"saving the final checkpoint and exporting the SAE to "
                f"{Path(workdir) / 'export'}")  # fmt: skip
            ckpt.save(tcfg.steps, state, final_record)
            # every process writes the experts its devices hold (a collective)
            out = export_sae(nnx.to_pure_dict(state.params), cfg, Path(workdir) / "export",
                             input_scale, source=final_record["data"])  # fmt: skip
            say(lead, f"exported {out}")
    ckpt.close()  # idempotent; also closed (after pending saves finish) on errors
    if writer:
        writer.close()
        on_train = " (on the training data)" if same_data_note(tcfg) else ""
        print(f"final step {tcfg.steps}{on_train}: " + summary(final, FINAL), flush=True)
    return final


def resume_point(
    ckpt: Checkpointer, cfg: SAEConfig, tcfg: TrainConfig, real: bool, allow_changes: bool
) -> tuple[int, int, list[str]]:
    """(step, this process's data position, settings changed) to resume from: (0, 0, []) for
    a new workdir. Refuses, in one line, a checkpoint of another shape, or one trained with
    other settings unless `allow_changes`."""
    start = ckpt.latest_step() or 0
    if not start:
        return 0, 0, []
    saved = ckpt.record(start)
    check_compatible(saved["model"], cfg, ckpt.directory)
    changes = check_changes(saved, cfg, tcfg, ckpt.directory.parent, allow_changes)
    return start, data_position(saved["data"], start, real), changes


def data_position(saved: dict, step: int, real: bool) -> int:
    """This process's data-stream position in a checkpoint's data record."""
    if not real:
        return step  # synthetic batches are numbered by step
    if "positions" not in saved:
        raise ConfigError(f"the checkpoint at step {step} has no data position (written by an "
                          "older version); start a new --workdir")  # fmt: skip
    count = saved.get("process_count")
    if count != jax.process_count():
        raise ConfigError(
            f"the checkpoint at step {step} was written by {count} process(es); the data order "
            f"depends on the process count, so resume it with {count}, not {jax.process_count()}"
        )
    return int(saved["positions"][jax.process_index()])


def same_data_note(tcfg: TrainConfig) -> str | None:
    """A note when the held-out evaluation reads the training shards themselves (synthetic
    data draws eval and train from separate streams, so it is held out)."""
    if tcfg.eval_data == "synthetic" or tcfg.train_data == "synthetic":
        return None
    if Path(tcfg.eval_data).resolve() != Path(tcfg.train_data).resolve():
        return None
    return (f"note: EVAL_DATA is TRAIN_DATA ({tcfg.eval_data}): eval/ metrics measure tokens the "
            "SAE trains on, not held-out data")  # fmt: skip


def data_message(source: ActivationData) -> str:
    stats = source.manifest.get("stats", {})
    return (
        f"data: {source.directory} ({source.manifest['total_tokens']} tokens, d={source.d}, "
        f"{source.dtype}); input scale {source.input_scale:.4g}; skipping tokens with norm > "
        f"{source.max_norm:.4g} ({stats.get('outlier_fraction', float('nan')):.3%} of the "
        f"manifest's sample)"
    )


def last_eval_row(path: Path) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    evals = [r for r in rows if "eval/fvu" in r]
    return evals[-1] if evals else {}


def resume_message(ckpt: Checkpointer, step: int, changes: list[str]) -> str:
    broken = ckpt.incomplete()
    note = f" (ignored incomplete checkpoint {', '.join(broken)})" if broken else ""
    changed = f", with changed settings: {', '.join(changes)}" if changes else ""
    return f"resuming from the checkpoint at step {step}{note}{changed}"


def say(lead: bool, message: str) -> None:
    if lead:
        print(message, flush=True)


def check_finite(metrics: dict, step: int) -> None:
    if not np.isfinite(metrics["loss"]):
        raise TrainingError(
            f"loss is {metrics['loss']} at step {step}: lower LR, check the data for "
            "NaN/inf, or raise the capacity factor"
        )
