"""Several SAEs trained from one read of their data (`launch.train_many`).

Each SAE is a run of its own (training.loop's set-up, checkpoints, logs, export and final
evaluation, in WORKDIR/<name>/), stepped in turn on every batch of its data: SAEs on the same
data directory share one stream, read once, so each sees the batches its own `launch.train`
run would, and ends bitwise the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from contextlib import closing
from itertools import chain

import jax
from tqdm.auto import tqdm

from sae_jax import storage
from sae_jax.config import ConfigError, SAEConfig, TrainConfig
from sae_jax.data import Batch
from sae_jax.distributed import put_local
from sae_jax.plan.layouts import check_in_turn_fits
from sae_jax.plan.suggest import device_memory_bytes
from sae_jax.training.learning_rates import lr_message
from sae_jax.training.loop import (
    Log,
    Run,
    Stepper,
    TrainingError,
    already_trained,
    compile_for,
    final_message,
    finish,
    initial_state,
    open_log,
    open_sources,
    say,
    set_up,
    synced,
)
from sae_jax.training.preemption import Preempted, PreemptionGuard

SET_FILE = "saes.json"  # WORKDIR/saes.json: the job's SAEs (sae_set.read_sae_set)


@dataclasses.dataclass(frozen=True)
class SAESpec:
    """One SAE of a job: its name (subdirectory), configs, the gin text that trains it alone,
    the dump layer it reads (None: a plain data directory) and the entry's own settings."""

    name: str
    sae_cfg: SAEConfig
    tcfg: TrainConfig
    config_text: str
    layer: int | None = None
    settings: dict = dataclasses.field(default_factory=dict)


def set_record(specs: list[SAESpec]) -> dict:
    """WORKDIR/saes.json's content: each SAE's name, layer, data and main settings."""
    return {"saes": [{
        "name": s.name, "layer": s.layer, "train_data": s.tcfg.train_data,
        "eval_data": s.tcfg.eval_spec, "num_latents": s.sae_cfg.num_latents, "k": s.sae_cfg.k,
        "num_experts": s.sae_cfg.num_experts,
        "experts_per_token": s.sae_cfg.experts_per_token,
        "lr": s.tcfg.lr, "base_lr": s.tcfg.base_lr, "settings": s.settings,
    } for s in specs]}  # fmt: skip


def write_set_record(workdir: str | storage.AnyPath, specs: list[SAESpec]) -> None:
    storage.path(workdir).mkdir(parents=True, exist_ok=True)
    text = json.dumps(set_record(specs), indent=1, sort_keys=True, default=str)
    storage.write_atomic(storage.path(workdir) / SET_FILE, text + "\n")


@dataclasses.dataclass
class Member:
    """One SAE of the job, set up: its run (training.loop.Run), its Log and its Stepper."""

    name: str
    run: Run
    log: Log
    steps: Stepper


@dataclasses.dataclass
class Group:
    """The SAEs on one training data directory and the one stream of batches they share,
    started at the position of the member furthest behind."""

    members: list[Member]
    stream: Iterator[Batch]
    position: int  # this process's stream position before the next batch

    @property
    def start(self) -> int:
        return min(m.run.start for m in self.members)


def train_many(
    specs: list[SAESpec],
    workdir: str | storage.AnyPath,
    progress: bool = True,
    allow_changes: bool = False,
) -> dict[str, dict]:
    """Train every SAE of `specs` in WORKDIR/<name>/, resuming each from its last complete
    checkpoint, from one read of each distinct TRAIN_DATA; returns each SAE's final eval row
    by name. Every SAE steps in turn on each batch over the whole mesh. SIGTERM / SIGINT
    save every SAE at the same step and raise Preempted."""
    workdir = storage.path(workdir)
    lead = jax.process_index() == 0
    if lead:
        write_set_record(workdir, specs)
    runs = set_up_all(specs, workdir, allow_changes)
    check_memory([run for _, run in runs])
    finals = {spec.name: already_trained(run) for spec, run in runs if run.start >= run.tcfg.steps}
    todo = [(spec, run) for spec, run in runs if spec.name not in finals]
    if not todo:
        return finals
    for spec, run in todo:
        say(lead, f"{spec.name}: {lr_message(run.cfg, run.tcfg)}")
    with jax.set_mesh(todo[0][1].mesh), contextlib.ExitStack() as stack:
        guard = stack.enter_context(PreemptionGuard())
        members = [start_member(spec, run, stack, progress) for spec, run in todo]
        share_compiled(members)
        groups = open_groups(members, stack)
        run_steps(groups, guard, todo[0][1].tcfg)
        for m in members:
            finals[m.name] = finish(m.run, m.steps.state, m.steps.position, m.log)
            say(lead, f"{m.name}: {final_message(m.run.tcfg, finals[m.name])}")
    return {spec.name: finals[spec.name] for spec in specs}


def set_up_all(
    specs: list[SAESpec], workdir: storage.AnyPath, allow_changes: bool
) -> list[tuple[SAESpec, Run]]:
    """Each SAE's Run in WORKDIR/<name>, the data of each distinct (TRAIN_DATA, EVAL_DATA)
    opened once and shared."""
    opened: dict[tuple[str, str], tuple] = {}
    runs = []
    for spec in specs:
        key = (spec.tcfg.train_data, spec.tcfg.eval_spec)
        if key not in opened:
            opened[key] = open_sources(spec.tcfg)
        run = set_up(spec.sae_cfg, spec.tcfg, workdir / spec.name, spec.config_text,
                     allow_changes, False, opened[key])  # fmt: skip
        runs.append((spec, run))
    return runs


def check_memory(runs: list[Run]) -> None:
    """On a GPU/TPU, before anything is created: a one-line ConfigError where the SAEs'
    states together and the largest step exceed a device's memory (plan.layouts)."""
    if (memory := device_memory_bytes()) is None:
        return
    mesh = runs[0].mesh
    shape = (mesh.shape["data"], mesh.shape["expert"])
    check_in_turn_fits([(run.cfg, run.tcfg) for run in runs], shape, memory)


def start_member(spec: SAESpec, run: Run, stack: contextlib.ExitStack, progress: bool) -> Member:
    """The SAE's initial state (new or restored), log and Stepper, their closing on `stack`."""
    run, graphdef, state, step_fn = initial_state(run)
    say(run.lead, f"{spec.name}: " + (f"resuming at step {run.start}" if run.start else "new"))
    log = open_log(run, graphdef, wandb=False)
    stack.enter_context(closing(run.ckpt))
    stack.enter_context(synced(log))
    stack.callback(log.close)
    shown = progress and run.lead
    bar = tqdm(total=run.tcfg.steps, initial=run.start, disable=not shown, unit="step",
               desc=spec.name)  # fmt: skip
    stack.callback(bar.close)
    return Member(spec.name, run, log, Stepper(run, state, step_fn, log, bar, name=spec.name))


def step_key(run: Run) -> tuple:
    """What a compiled training or eval step depends on: the SAEConfig and the training
    settings but the data (the mesh is the job's)."""
    return run.cfg, dataclasses.replace(run.tcfg, train_data="", eval_data="")


def share_compiled(members: list[Member]) -> None:
    """SAEs of one config (on other layers, say) use the first one's compiled training and
    eval steps: each step compiles once for all of them."""
    first: dict[tuple, Member] = {}
    for m in members:
        key = step_key(m.run)
        if key not in first:
            first[key] = m
            continue
        m.steps.step_fn.share_compiled(first[key].steps.step_fn)
        m.log = dataclasses.replace(m.log, eval_step=first[key].log.eval_step)
        m.steps.log = m.log
        say(m.run.lead, f"{m.name}: the same SAE config as {first[key].name}: shares its "
                        "compiled steps")  # fmt: skip


def open_groups(members: list[Member], stack: contextlib.ExitStack) -> list[Group]:
    """One stream per distinct TRAIN_DATA, from the position of its member furthest behind;
    every member's steps compiled before the first step."""
    by_data: dict[str, list[Member]] = {}
    for m in members:
        by_data.setdefault(m.run.tcfg.train_data, []).append(m)
    groups = []
    for group_members in by_data.values():
        behind = min(group_members, key=lambda m: m.run.start).run
        stream = behind.train_src.batches("train", behind.rows, behind.tcfg.batch_size,
                                          start=behind.position)  # fmt: skip
        stack.enter_context(closing(stream))
        first = next(stream)
        for m in group_members:
            compile_for(m.run, m.steps.state, m.steps.step_fn, first)
        groups.append(Group(group_members, chain([first], stream), behind.position))
    return groups


def run_steps(groups: list[Group], guard: PreemptionGuard, tcfg: TrainConfig) -> None:
    """The steps: each group's next batch goes to each of its SAEs in turn; checkpoints every
    CHECKPOINT_EVERY steps (and after a signal, then Preempted) for every SAE at once."""
    active = [m for g in groups for m in g.members]
    for step in range(min(g.start for g in groups), tcfg.steps):
        for group in groups:
            step_group(group, step, tcfg)
        done = step + 1
        stepped = [m for m in active if m.run.start < done]
        if guard.stop_after(done) and done < tcfg.steps:
            for m in stepped:
                m.steps.checkpoint(done)
            raise Preempted(guard.signal, done, storage.path(active[0].run.workdir).parent)
        if done < tcfg.steps and done % tcfg.checkpoint_every == 0:
            for m in stepped:
                m.steps.checkpoint(done)
    for m in active:
        m.steps.end()


def step_group(group: Group, step: int, tcfg: TrainConfig) -> None:
    """Step `step` + 1 of every member of `group` that has reached it, on one batch (none
    before the group's stream starts)."""
    if step < group.start:
        return
    batch = next(group.stream)
    x = None
    for m in group.members:
        if step < m.run.start:
            continue  # resumed ahead of the stream: it saw this batch before the kill
        if step == m.run.start and m.run.position != group.position:
            raise ConfigError(f"{m.name}: its checkpoint at step {step} is at data position "
                              f"{m.run.position}, the shared stream at {group.position}: it "
                              "was trained on another data order; give it a new name")  # fmt: skip
        if x is None:
            x = put_local(batch.x, m.run.tokens, tcfg.batch_size)
        try:
            m.steps.advance(step, x, batch.position)
        except TrainingError as e:
            raise TrainingError(f"{m.name}: {e}") from None
    group.position = batch.position
