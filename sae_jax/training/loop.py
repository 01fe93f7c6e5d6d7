"""The training loop, `train`: set-up (`set_up` -> a `Run`), the steps (`compile_steps`, then
`train_steps`), the end (`finish`: final evaluation, checkpoint and export).

`compile_steps` compiles every step variant the run can use before the first step (see
training/step.py), so no step waits for a compile. In `train_steps` the host waits for the
device only to log metrics (every LOG_EVERY steps), before a checkpoint and for an
evaluation: the AuxK bucket is chosen from a count the host already holds, and the batches
are made on the host, so the host runs up to DEAD_COUNT_LAG - 1 steps ahead of the device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from itertools import chain, islice
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from tqdm.auto import tqdm

from sae_jax import storage
from sae_jax.config import FOLLOW, ConfigError, SAEConfig, TrainConfig
from sae_jax.data import ActivationData, Batch, SyntheticData, make_source
from sae_jax.distributed import gather_ints, process_rows, put_local
from sae_jax.evaluation import saebench
from sae_jax.evaluation.held_out import evaluate, make_eval_step
from sae_jax.export import export_sae
from sae_jax.mesh import make_mesh, token_sharding
from sae_jax.model.init import geometric_median
from sae_jax.model.switch import SwitchSAE, check_mesh
from sae_jax.plan.suggest import check_fits, device_memory_bytes
from sae_jax.pretrained import load_pretrained
from sae_jax.training.checkpoint import (
    Checkpointer,
    UnreadableCheckpoint,
    check_changes,
    check_compatible,
    model_record,
)
from sae_jax.training.learning_rates import lr_message
from sae_jax.training.metric_logs import check_wandb
from sae_jax.training.metrics import MetricWriter, read_metric_rows, summary
from sae_jax.training.preemption import Preempted, PreemptionGuard
from sae_jax.training.step import TrainState, TrainStep, setup_training
from sae_jax.training.update import zero_message

# The loss's parts apart (loss = mse + LB_ALPHA * lb_loss + aux_weight * aux_loss; lb_loss is
# at least 1, so the total sits near LB_ALPHA whatever the reconstruction).
CONSOLE = ("mse", "lb_loss", "aux_loss", "fvu", "l0", "dead_fraction", "drop_fraction")
FINAL = ("eval/fvu", "eval/mse", "eval/l0", "eval/drop_fraction", "eval/feature_recovery",
         "saebench/explained_variance", "saebench/cossim", "saebench/frac_alive")  # fmt: skip


Source = SyntheticData | ActivationData


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


@dataclasses.dataclass(frozen=True)
class Run:
    """What set-up found, fixed for the whole run: the configs (cfg with d from the data), the
    data sources, the mesh and this process's rows of each batch, the checkpoints, and where
    training starts (step and this process's data position)."""

    cfg: SAEConfig
    tcfg: TrainConfig
    workdir: str | Path
    config_text: str
    train_src: Source
    eval_src: Source
    mesh: Mesh
    tokens: NamedSharding  # a batch's tokens on the mesh
    rows: slice  # this process's rows of each global batch
    eval_batches: int
    ckpt: Checkpointer
    start: int
    position: int  # this process's data-stream position at `start`
    changes: list[str]  # settings changed since the checkpoint resumed from
    allow_changes: bool  # --allow_changes: resume a checkpoint trained with other settings
    lead: bool  # process 0: writes the logs and prints

    @property
    def real(self) -> bool:
        return isinstance(self.train_src, ActivationData)

    @property
    def local_rows(self) -> int:
        return self.rows.stop - self.rows.start


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

    The workdir may be a URL (gs://...): checkpoints, metrics.jsonl, TensorBoard events,
    config.gin and the export are written there (metrics and events uploaded before every
    checkpoint save and at the end; see training/metrics.py).
    """
    run = set_up(sae_cfg, tcfg, workdir, config_text, allow_changes, wandb)
    if run.start >= tcfg.steps:
        return already_trained(run)
    describe_data(run)
    say(run.lead, zero_message(run.mesh, run.cfg.num_experts, run.cfg.latents_per_expert))
    say(run.lead, lr_message(run.cfg, tcfg))
    with jax.set_mesh(run.mesh):
        run, graphdef, state, step_fn = initial_state(run)
        log = open_log(run, graphdef, wandb)
        stream = run.train_src.batches("train", run.rows, tcfg.batch_size, start=run.position)
        with PreemptionGuard() as guard, closing(run.ckpt), closing(stream), synced(log):
            batches = compile_steps(run, state, step_fn, stream)
            shown = progress and run.lead
            bar = tqdm(total=tcfg.steps, initial=run.start, disable=not shown, unit="step")
            state, position = train_steps(run, state, step_fn, batches, guard, log, bar)
            final = finish(run, state, position, log)
    run.ckpt.close()  # idempotent; also closed (after pending saves finish) on errors
    log.close()
    say(run.lead, final_message(tcfg, final))
    say(run.lead, where_message(run))
    return final


def set_up(
    sae_cfg: SAEConfig,
    tcfg: TrainConfig,
    workdir: str | Path,
    config_text: str,
    allow_changes: bool,
    wandb: bool,
    sources: tuple[Source, Source] | None = None,
) -> Run:
    """Check the configs against the data and the devices (before anything is created), open
    the data (or take `sources`, the (train, eval) that open_sources gave for this tcfg) and
    the checkpoints, and find the step to start from."""
    tcfg.validate()
    if wandb:
        check_wandb()
    train_src, eval_src = sources or open_sources(tcfg)
    cfg = dataclasses.replace(sae_cfg, d=train_src.d).validate()
    mesh = make_mesh(tcfg.mesh_shape)
    check_mesh(cfg, dict(mesh.shape), tcfg.batch_size)
    if (memory := device_memory_bytes()) is not None:  # GPU/TPU: before anything is created
        check_fits(cfg, tcfg, (mesh.shape["data"], mesh.shape["expert"]), memory)
    tokens = token_sharding(mesh)
    rows = process_rows(tokens, tcfg.batch_size)
    eval_batches = eval_batch_count(tcfg, eval_src)
    ckpt = Checkpointer(workdir, tcfg.keep_checkpoints)
    real = isinstance(train_src, ActivationData)
    start, position, changes = resume_point(ckpt, cfg, tcfg, real, allow_changes)
    if 0 < start < tcfg.steps and ckpt.record(start)["train"]["steps"] == start:
        ckpt.preserve(start)  # a finished run, extended: its final checkpoint stays till ours
    return Run(
        cfg=cfg,
        tcfg=tcfg,
        workdir=workdir,
        config_text=config_as_run(config_text, tcfg),
        train_src=train_src,
        eval_src=eval_src,
        mesh=mesh,
        tokens=tokens,
        rows=rows,
        eval_batches=eval_batches,
        ckpt=ckpt,
        start=start,
        position=position,
        changes=changes,
        allow_changes=allow_changes,
        lead=jax.process_index() == 0,
    )


def config_as_run(config_text: str, tcfg: TrainConfig) -> str:
    """The gin config as run: an EVAL_DATA left to follow TRAIN_DATA is bound to it at the
    end, so that what reads a run's config.gin (launch.eval, launch.browse) finds the data."""
    if not config_text or tcfg.eval_data != FOLLOW:
        return config_text
    return (f"{config_text.rstrip()}\n\n# EVAL_DATA was left at {FOLLOW!r}: it followed "
            f"TRAIN_DATA\nTrainConfig.eval_data = {tcfg.train_data!r}\n")  # fmt: skip


def open_sources(tcfg: TrainConfig) -> tuple[Source, Source]:
    """(training data, evaluation data): one source when EVAL_DATA is TRAIN_DATA (or is unset
    and follows it). Evaluation data of another d is refused in one line."""
    train_src = make_source(tcfg.train_data, tcfg.seed)
    spec = tcfg.eval_spec
    eval_src = train_src if spec == tcfg.train_data else make_source(spec, tcfg.seed)
    if eval_src.d != train_src.d:
        raise ConfigError(
            f"EVAL_DATA={spec!r} has d={eval_src.d}, but TRAIN_DATA={tcfg.train_data!r} has "
            f"d={train_src.d}: the SAE could not be evaluated on it; pass shards of "
            f"d={train_src.d} as EVAL_DATA, or leave EVAL_DATA unset to evaluate on TRAIN_DATA"
        )
    if isinstance(train_src, ActivationData) and isinstance(eval_src, ActivationData):
        eval_src.input_scale = train_src.input_scale  # the model's scale, not the eval set's
    return train_src, eval_src


def eval_batch_count(tcfg: TrainConfig, eval_src: Source) -> int:
    """Batches in a held-out evaluation: eval_tokens' worth, or as many as EVAL_DATA holds."""
    held = eval_src.max_batches(tcfg.batch_size)
    count = min(max(1, tcfg.eval_tokens // tcfg.batch_size), held)
    if count < 1:
        raise ConfigError(f"EVAL_DATA={tcfg.eval_spec!r} holds less than one batch")
    return count


def already_trained(run: Run) -> dict:
    """The workdir's last eval row, when it is trained to STEPS already."""
    run.ckpt.close()
    final = last_eval_row(storage.path(run.workdir) / "metrics.jsonl")
    say(
        run.lead,
        f"{run.workdir} is already trained to step {run.start} (STEPS={run.tcfg.steps}): "
        f"nothing to do; its last eval: {summary(final, FINAL)}",
    )
    return final


def describe_data(run: Run) -> None:
    """Say what the training data is, and whether the evaluation reads it too or data of
    another kind."""
    if run.real:
        say(run.lead, data_message(run.train_src))
    for note in (same_data_note(run.tcfg), other_kind_warning(run.tcfg)):
        if note is not None:
            say(run.lead, note)


def initial_state(run: Run) -> tuple[Run, nnx.GraphDef, TrainState, TrainStep]:
    """(run, graphdef, train state, step function): a new model, or the checkpoint resumed
    from. A checkpoint whose files do not read back is moved to checkpoints/broken/<step>
    (said in one line) and the next newest one is used: the returned run's start, position and
    changes are those of the checkpoint actually restored."""
    model = build_model(run.cfg, run.tcfg, run.train_src)
    graphdef, fresh, step_fn = setup_training(model, run.tcfg)
    del model
    state = fresh
    while run.start:
        try:
            state = run.ckpt.restore(run.start, like=fresh)
            broken = None
        except UnreadableCheckpoint as e:
            broken = e
        agree_restored(run.start, broken)
        if broken is None:
            say(run.lead, resume_message(run.ckpt, run.start, run.changes))
            break
        run = fall_back(run, broken)
    return run, graphdef, state, step_fn


class TrainClock:
    """Wall-clock seconds of training (`seconds`): from `offset` (the seconds a resumed run had
    logged) on, not counting the time spent in `paused` (held-out evaluations) or after
    `stop` (the final checkpoint and export). The first step's compilation counts."""

    def __init__(self, offset: float = 0.0):
        self.offset, self.start, self.stopped_at = offset, time.perf_counter(), None

    def seconds(self) -> float:
        now = self.stopped_at if self.stopped_at is not None else time.perf_counter()
        return self.offset + now - self.start

    def stop(self) -> None:
        if self.stopped_at is None:
            self.stopped_at = time.perf_counter()

    @contextmanager
    def paused(self) -> Iterator[None]:
        if self.stopped_at is not None:  # stopped: stays stopped
            yield
            return
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - begin


@dataclasses.dataclass(frozen=True)
class Log:
    """Where metric rows go: metrics.jsonl, TensorBoard (and W&B) on the lead process, nowhere
    on the others; `evaluate` adds a held-out evaluation's row. Every row holds
    `train_seconds`, the training clock's reading (TrainClock)."""

    run: Run
    writer: MetricWriter | None
    eval_step: Callable
    clock: TrainClock = dataclasses.field(default_factory=TrainClock)

    def row(self, step: int, row: dict) -> dict:
        """Log `row` at `step`; returns it as logged."""
        row = {"step": step, "tokens": step * self.run.tcfg.batch_size, **row,
               "train_seconds": self.clock.seconds()}  # fmt: skip
        return self.writer.write(row) if self.writer else row

    def evaluate(self, step: int, params: nnx.State, export: storage.AnyPath | None = None) -> dict:
        """Evaluate `params` on the held-out batches and log the row; the training clock
        waits for the steps dispatched so far, then pauses during the evaluation. With
        `export` (the final evaluation) the row also holds SAEBench's metrics of that
        exported SAE on the same tokens (`saebench/...`, the lead process's)."""
        jax.block_until_ready(params)
        with self.clock.paused():
            row = evaluate(
                self.eval_step,
                params,
                held_out(self.run),
                outliers=isinstance(self.run.eval_src, ActivationData),
                features=getattr(self.run.eval_src, "features", None),
            )
            if export is not None and self.run.lead:
                row |= exported_saebench(self.run, export)
        return self.row(step, row)

    def sync(self) -> None:
        """Upload the rows logged so far where the workdir is a URL (MetricWriter.sync)."""
        if self.writer:
            self.writer.sync()

    def close(self) -> None:
        if self.writer:
            self.writer.close()


@contextmanager
def synced(log: Log) -> Iterator[None]:
    """On an error, upload the rows logged so far (a URL workdir) before it propagates; an
    error of the upload itself does not hide it."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            log.sync()
        raise


def save(run: Run, log: Log, step: int, state: TrainState, record: dict) -> None:
    """Start the checkpoint save at `step`, the logged rows uploaded first (a URL workdir):
    a resume from this checkpoint finds every row up to its step."""
    log.sync()
    run.ckpt.save(step, state, record)


def open_log(run: Run, graphdef: nnx.GraphDef, wandb: bool) -> Log:
    """The run's Log (a new one, or the resumed run's cut back to its start step); the lead
    also writes the gin config to workdir/config.gin."""
    cfg, tcfg = run.cfg, run.tcfg
    run_config = {"model": model_record(cfg), "train": dataclasses.asdict(tcfg)}
    wandb_config = run_config if wandb else None
    writer = MetricWriter(run.workdir, run.start, wandb_config) if run.lead else None
    if run.lead and run.config_text:
        storage.write_atomic(storage.path(run.workdir) / "config.gin", run.config_text)
    eval_step = make_eval_step(
        graphdef, cfg.eval_capacity_factor, tcfg.lb_alpha, tcfg.aux_weight, tcfg.router_z_weight
    )
    clock = TrainClock(logged_seconds(storage.path(run.workdir) / "metrics.jsonl", run.start))
    return Log(run, writer, eval_step, clock)


def logged_seconds(path: storage.AnyPath, step: int) -> float:
    """The last `train_seconds` that metrics.jsonl logged at or before `step` (what a resumed
    run's clock starts from); 0 for a new run, or rows written before it was logged."""
    seconds = 0.0
    for row in read_metric_rows(path) if step else []:
        if row.get("step", step + 1) <= step and "train_seconds" in row:
            seconds = float(row["train_seconds"])
    return seconds


def held_out(run: Run) -> Iterator[tuple[jax.Array, jax.Array]]:
    """The evaluation's (x, keep) batches, on the devices; the same tokens at every call."""
    batch_size = run.tcfg.batch_size
    with closing(run.eval_src.batches("eval", run.rows, batch_size)) as batches:
        for b in islice(batches, run.eval_batches):
            keep = np.ones(run.local_rows) if b.keep is None else b.keep
            x = put_local(b.x, run.tokens, batch_size)
            yield x, put_local(keep.astype(np.float32), run.tokens, batch_size)


def compile_steps(
    run: Run, state: TrainState, step_fn: TrainStep, batches: Iterator[Batch]
) -> Iterator[Batch]:
    """Compile the run's steps for batches like the first one (`compile_for`); returns the
    batches, the first one included."""
    first = next(batches)
    compile_for(run, state, step_fn, first)
    return chain([first], batches)


def compile_for(run: Run, state: TrainState, step_fn: TrainStep, first: Batch) -> None:
    """Compile, before the first step, the training step of every AuxK bucket the run can use
    (TrainStep.compile, for batches like `first`, as placed on the mesh), so that no step
    waits for a compile; says what it compiles."""
    tcfg = run.tcfg
    if tcfg.compile_ahead and not step_fn.pending(state):
        return  # compiled already (train_many: another SAE of the same config)
    buckets = step_fn.buckets(state)
    aux = [b for b in buckets if b]
    with_aux = f" and with AuxK on {', '.join(map(str, aux))} dead ids per expert" if aux else ""
    steps = f"{run.start + 1}-{tcfg.steps}"
    if not tcfg.compile_ahead:
        say(run.lead, f"compiling the training step (the first step takes a while, and the "
                      f"first with AuxK), then training steps {steps}")  # fmt: skip
        return
    say(run.lead, f"compiling the training step (without AuxK{with_aux}), then training steps "
                  f"{steps}")  # fmt: skip
    x = jax.ShapeDtypeStruct((tcfg.batch_size, *first.x.shape[1:]), first.x.dtype,
                             sharding=run.tokens)  # fmt: skip
    step_fn.compile(state, x)


def train_steps(
    run: Run,
    state: TrainState,
    step_fn: TrainStep,
    batches: Iterator[Batch],
    guard: PreemptionGuard,
    log: Log,
    bar: tqdm,
) -> tuple[TrainState, int]:
    """Steps start + 1..STEPS, logging, evaluating and checkpointing every so many steps;
    after a signal, saves a checkpoint and raises Preempted. Returns the state and this
    process's data position after the last step."""
    steps = Stepper(run, state, step_fn, log, bar)
    for step in range(run.start, run.tcfg.steps):
        batch = next(batches)
        done = steps.advance(step, put_local(batch.x, run.tokens, run.tcfg.batch_size),
                             batch.position)  # fmt: skip
        if guard.stop_after(done) and done < run.tcfg.steps:
            steps.checkpoint(done)  # closing(ckpt) waits for the save to finish
            bar.close()
            raise Preempted(guard.signal, done, storage.path(run.workdir))
        if done < run.tcfg.steps and done % run.tcfg.checkpoint_every == 0:
            steps.checkpoint(done)
    steps.end()
    bar.close()
    return steps.state, steps.position


class Stepper:
    """A run's steps after set-up: `advance` runs one step on a batch already on the mesh,
    then its logging and held-out evaluation; `checkpoint` saves; `end` waits for the last
    step and stops the training clock. `name` (train_many) prefixes its console lines."""

    def __init__(self, run: Run, state: TrainState, step_fn: TrainStep, log: Log, bar: tqdm,
                 name: str = ""):  # fmt: skip
        self.run, self.state, self.step_fn, self.log, self.bar = run, state, step_fn, log, bar
        self.prefix = f"{name}: " if name else ""
        self.position, self.metrics = run.position, None
        self.rate = TokenRate(run.start, run.tcfg.batch_size)
        self.drops = DropWatch()
        self.auxk_said = False

    def advance(self, step: int, x: jax.Array, position: int) -> int:
        """Step `step` + 1 on `x` [BATCH_SIZE, d] (the stream is at `position` after it);
        returns the step number done."""
        run, tcfg = self.run, self.run.tcfg
        if run.lead and not self.auxk_said and self.step_fn.uses_auxk(self.state):
            self.auxk_said = True
            tqdm.write(f"{self.prefix}step {step + 1}: dead latents; AuxK on")
        self.state, self.metrics = self.step_fn(self.state, x)
        self.position = position
        done = step + 1
        if done % tcfg.log_every == 0 or done == tcfg.steps:
            self.log_metrics(done)
        if tcfg.eval_every and done % tcfg.eval_every == 0 and done != tcfg.steps:
            self.log.evaluate(done, self.state.params)
        self.bar.update(1)
        return done

    def log_metrics(self, done: int) -> None:
        run = self.run
        metrics = host_metrics(run, self.metrics, done, self.position, self.rate)
        if run.lead and (warning := self.drops.warning(done, metrics.get("drop_fraction", 0.0))):
            tqdm.write(self.prefix + warning)
        line = summary(self.log.row(done, metrics), CONSOLE)
        self.bar.set_postfix_str(line)
        if self.bar.disable:  # no progress bar: a line for the log instead
            rate_said = f"{metrics['tokens_per_sec']:,.0f} tokens/s"
            say(run.lead, f"{self.prefix}step {done}/{run.tcfg.steps}: {line} ({rate_said})")

    def checkpoint(self, done: int) -> None:
        """Save a checkpoint after step `done` (never a NaN state)."""
        check_finite(jax.device_get(self.metrics), done)
        save(self.run, self.log, done, self.state, checkpoint_record(self.run, done, self.position))

    def end(self) -> None:
        jax.block_until_ready(self.state.params)
        self.log.clock.stop()  # the final checkpoint, export and evaluation are not training


class DropWatch:
    """One warning when the logged drop_fraction stays above WARN_ABOVE for WARN_ROWS logged
    steps in a row: dropped tokens reconstruct to b_dec and teach their experts nothing."""

    WARN_ABOVE, WARN_ROWS = 0.05, 3

    def __init__(self):
        self.high, self.said = 0, False

    def warning(self, step: int, drop_fraction: float) -> str | None:
        self.high = self.high + 1 if drop_fraction > self.WARN_ABOVE else 0
        if self.said or self.high < self.WARN_ROWS:
            return None
        self.said = True
        return (f"warning: drop_fraction has stayed above {self.WARN_ABOVE:.0%} for "
                f"{self.WARN_ROWS} logged steps ({drop_fraction:.1%} at step {step}): dropped "
                "tokens reconstruct to b_dec; raise CAPACITY_FACTOR, balance harder "
                "(ROUTER_BIAS_RATE, LB_ALPHA) or use DISPATCH='dropless'")  # fmt: skip


class TokenRate:
    """Training tokens per second since the last call (or since the start step)."""

    def __init__(self, step: int, batch_size: int):
        self.batch_size = batch_size
        self.time, self.step = time.perf_counter(), step

    def since_last(self, step: int) -> float:
        now = time.perf_counter()
        rate = (step - self.step) * self.batch_size / (now - self.time)
        self.time, self.step = now, step
        return rate


def host_metrics(run: Run, metrics: dict, done: int, position: int, rate: TokenRate) -> dict:
    """The step's metrics on the host, with the data stream's and the speed; checks the loss
    is finite."""
    metrics = jax.device_get(metrics)
    if run.real:  # this process's stream: raw tokens read vs tokens used
        metrics["data/outlier_fraction"] = 1 - done * run.local_rows / position
        metrics["data/epoch"] = position / run.train_src.local_tokens[jax.process_index()]
    metrics["tokens_per_sec"] = rate.since_last(done)
    check_finite(metrics, done)
    return metrics


def checkpoint_record(run: Run, step: int, position: int) -> dict:
    """A checkpoint's record: configs, gin text and every process's data position (a
    collective: every process calls it)."""
    tcfg = run.tcfg
    data = {
        "train_step": step,
        "seed": tcfg.seed,
        "input_scale": run.train_src.input_scale,
        "train_data": tcfg.train_data,
        "process_count": jax.process_count(),
        "positions": gather_ints(position),
    }
    return {
        "model": model_record(run.cfg),
        "train": dataclasses.asdict(tcfg),
        "data": data,
        "gin_config": run.config_text,
    }


def finish(run: Run, state: TrainState, position: int, log: Log) -> dict:
    """The final checkpoint and export, then the final evaluation (so that a failing
    evaluation loses no training); returns the final eval row."""
    tcfg, workdir = run.tcfg, storage.path(run.workdir)
    final_record = checkpoint_record(run, tcfg.steps, position)  # a collective
    say(run.lead, f"saving the final checkpoint and exporting the SAE to {workdir / 'export'}")
    save(run, log, tcfg.steps, state, final_record)
    out = export_final(run, state, final_record["data"])
    run.ckpt.release()
    say(run.lead, f"exported {out}")
    tokens = run.eval_batches * tcfg.batch_size
    say(run.lead, f"final evaluation on {tokens} tokens of EVAL_DATA={tcfg.eval_spec!r}")
    try:
        return log.evaluate(tcfg.steps, state.params, export=out)
    except Exception:
        saved = f"checkpoint at step {tcfg.steps} in {workdir / 'checkpoints'}, SAE in {out}"
        say(run.lead, f"the final evaluation failed; the training is saved ({saved}); evaluate "
                      f"it later with: python -m launch.eval --workdir {workdir}")  # fmt: skip
        raise


def export_final(run: Run, state: TrainState, source: dict) -> storage.AnyPath:
    """Export into DIR/export.new, then swap it in for DIR/export: an earlier export (of the
    run this one extends) stays whole until the new one is complete. Every process writes
    the experts its devices hold (a collective). A URL DIR is written through a local
    staging directory per process (swap_in_store)."""
    out = storage.path(run.workdir) / "export"
    new, old = out.with_name("export.new"), out.with_name("export.old")
    params = nnx.to_pure_dict(state.params)
    if storage.is_url(out):
        if run.lead:
            storage.remove_tree(new)  # what an export cut off earlier left
        sync_processes("sae_jax.loop: export.new emptied")  # before any process uploads
        with storage.local_dir(new) as staged:
            export_sae(params, run.cfg, staged, run.train_src.input_scale, source=source)
        sync_processes("sae_jax.loop: export uploaded")
        if run.lead:
            swap_in_store(new, out)
    else:
        export_sae(params, run.cfg, new, run.train_src.input_scale, source=source)
        if run.lead:
            shutil.rmtree(old, ignore_errors=True)
            if out.exists():
                out.rename(old)
            new.rename(out)
            shutil.rmtree(old, ignore_errors=True)
    sync_processes("sae_jax.loop: export swapped in")
    return out


def swap_in_store(new: storage.AnyPath, out: storage.AnyPath) -> None:
    """Replace the export `out` by the complete one at `new` in an object store, which cannot
    rename: delete `out`, then copy `new` there and delete it. Cut off at any moment, one of
    the two holds a complete export."""
    storage.forget_listings(out)
    storage.remove_tree(out)
    storage.move(new, out)


def sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def exported_saebench(run: Run, export: storage.AnyPath) -> dict:
    """SAEBench's metrics (`saebench/<name>`) of the exported SAE, run dropless on the host
    on as many held-out tokens as the eval step saw, every row read by the lead (the eval
    step's tokens on one process or synthetic data); {}, or no max cosines, with a note where
    the SAE is too large for that (launch.eval gives them)."""
    cfg = run.cfg
    size = 2 * saebench.num_latents(cfg) * cfg.d * 4
    if size > saebench.HOST_BYTES:
        say(run.lead, f"saebench metrics skipped: the SAE's {size / 2**30:.0f} GiB of weights "
                      f"exceed {saebench.HOST_BYTES / 2**30:.0f} GiB on one host")  # fmt: skip
        return {}
    weights = saebench.weight_flops(cfg) <= saebench.WEIGHT_FLOPS
    if not weights:
        say(run.lead, f"saebench max cosines skipped ({saebench.weight_flops(cfg):.1e} FLOPs); "
                      f"python -m launch.eval --workdir {run.workdir} computes them")  # fmt: skip
    with storage.local_copy(export) as local:  # a URL: downloaded (at most HOST_BYTES)
        metrics = saebench.evaluate_source(load_pretrained(local), run.eval_src,
                                           run.tcfg.batch_size, run.eval_batches,
                                           weights)  # fmt: skip
    return {saebench.PREFIX + name: value for name, value in metrics.items()}


def final_message(tcfg: TrainConfig, final: dict) -> str:
    on_train = " (on the training data)" if same_data_note(tcfg) else ""
    return f"final step {tcfg.steps}{on_train}: " + summary(final, FINAL)


def where_message(run: Run) -> str:
    """Where the run's outputs are, and the commands that read them next."""
    workdir = storage.path(run.workdir)
    return (
        f"checkpoints: {workdir / 'checkpoints'} (the last at step {run.tcfg.steps})\n"
        f"metrics: {workdir / 'metrics.jsonl'} (TensorBoard: tensorboard --logdir {workdir})\n"
        f"next: python -m launch.eval --workdir {workdir}\n"
        f"      python -m launch.browse --workdir {workdir}"
    )


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
    if tcfg.eval_spec == "synthetic" or tcfg.train_data == "synthetic":
        return None
    if tcfg.eval_data == FOLLOW:
        return (f"note: EVAL_DATA is left at TRAIN_DATA ({tcfg.train_data}): "
                "eval/ metrics measure tokens the SAE trains on, not held-out data (pass "
                "--gin.EVAL_DATA=DIR for held-out shards)")  # fmt: skip
    if Path(tcfg.eval_data).resolve() != Path(tcfg.train_data).resolve():
        return None
    return (f"note: EVAL_DATA is TRAIN_DATA ({tcfg.eval_data}): eval/ metrics measure tokens the "
            "SAE trains on, not held-out data")  # fmt: skip


def other_kind_warning(tcfg: TrainConfig) -> str | None:
    """A warning when one of TRAIN_DATA and EVAL_DATA is synthetic and the other shards."""
    spec = tcfg.eval_spec
    if (tcfg.train_data == "synthetic") == (spec == "synthetic"):
        return None
    if spec == "synthetic":
        return (
            "warning: TRAIN_DATA is activation shards but EVAL_DATA='synthetic': eval/ metrics "
            "measure synthetic data, not activations like the training data"
        )
    return (
        f"warning: TRAIN_DATA='synthetic' but EVAL_DATA is activation shards ({spec}): eval/ "
        "metrics measure data unlike the training data"
    )


def data_message(source: ActivationData) -> str:
    stats = source.manifest.get("stats", {})
    return (
        f"data: {source.directory} ({source.manifest['total_tokens']} tokens, d={source.d}, "
        f"{source.dtype}); input scale {source.input_scale:.4g}; skipping tokens with norm > "
        f"{source.max_norm:.4g} ({stats.get('outlier_fraction', float('nan')):.3%} of the "
        f"manifest's sample)"
    )


def last_eval_row(path: storage.AnyPath) -> dict:
    evals = [r for r in read_metric_rows(path) if "eval/fvu" in r]
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
    """Stop before a non-finite state is saved: a NaN loss, or a NaN/inf gradient norm (the
    loss of the step is computed before its update, so it can be finite while the gradient
    has just made every parameter NaN)."""
    for name in ("loss", "grad_norm"):
        if name in metrics and not np.isfinite(metrics[name]):
            raise TrainingError(
                f"{name} is {metrics[name]} at step {step}: lower LR, check the data for "
                "NaN/inf, or raise the capacity factor"
            )


def agree_restored(step: int, broken: UnreadableCheckpoint | None) -> None:
    """With several processes, a checkpoint that fails to restore on any of them stops all of
    them in one line (each would otherwise fall back on its own and diverge)."""
    if jax.process_count() == 1:
        return
    failed = [p for p, bad in enumerate(gather_ints(int(broken is not None))) if bad]
    if failed:
        reason = f" ({broken.reason})" if broken is not None else ""
        raise ConfigError(
            f"the checkpoint at step {step} does not restore on process(es) "
            f"{', '.join(map(str, failed))}{reason}; with several processes it is not skipped "
            f"automatically: move checkpoints/{step} to checkpoints/broken/{step} and resume"
        )


def fall_back(run: Run, broken: UnreadableCheckpoint) -> Run:
    """Move the unreadable checkpoint aside, say so in one line, and return the run resumed
    from the newest remaining checkpoint (its settings checked again, under the same
    --allow_changes), or started anew when none is left."""
    moved = run.ckpt.set_aside(broken.step)
    start, position, changes = resume_point(
        run.ckpt, run.cfg, run.tcfg, run.real, run.allow_changes
    )
    where = moved.relative_to(run.ckpt.directory.parent)
    then = f"resuming from step {start}" if start else "training from step 0 (no other checkpoint)"
    say(run.lead, f"{broken}; moved to {where} and {then}")
    return dataclasses.replace(run, start=start, position=position, changes=changes)
