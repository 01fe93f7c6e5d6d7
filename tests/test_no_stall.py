"""The training loop keeps the host ahead of the device and compiles every step before the
first one (training/step.py: DEAD_COUNT_LAG, TrainStep.compile)."""

import functools

import jax
import jax.numpy as jnp

from sae_jax.config import SAEConfig, TrainConfig
from sae_jax.training import loop
from sae_jax.training import step as step_module
from sae_jax.training.loop import train
from sae_jax.training.step import TrainStep

CFG = SAEConfig(num_latents=128, num_experts=2, k=4, k_aux=8)


def slowed(make, iters: int):
    """make_train_step, with a chain of `iters` [256, 256] matmuls before each step (the
    step's input depends on it), so that the device is slower than the host."""

    def make_slow(*args, **kwargs):
        inner = make(*args, **kwargs)

        @functools.partial(jax.jit, donate_argnums=0)
        def step(state, x):
            m = jnp.full((256, 256), 1 / 256, jnp.float32) + x[0, 0] * 0
            m = jax.lax.fori_loop(0, iters, lambda _, m: jnp.tanh(m @ m), m)
            return inner(state, jnp.where(m[0, 0] > 1e30, x + 1, x))

        return step

    return make_slow


def spy_calls(monkeypatch, record, before=lambda: None):
    """Calls before() at the start of every TrainStep call, record(self, its result) after."""
    call = TrainStep.__call__

    def spied(self, state, x):
        before()
        out = call(self, state, x)
        record(self, out)
        return out

    monkeypatch.setattr(TrainStep, "__call__", spied)


def test_host_dispatches_two_steps_ahead_of_the_device(tmp_path, monkeypatch):
    # Synthetic data: its batches are generated on the host's CPU device, here also the
    # device the steps run on, so that reading one would wait for the steps queued before it
    # (as on a GPU, in one stream) unless generated ahead.
    tcfg = TrainConfig(steps=8, batch_size=64, mesh_shape=(1, 1), log_every=8,
                       checkpoint_every=100, eval_tokens=64)  # fmt: skip
    monkeypatch.setattr(step_module, "make_train_step", slowed(step_module.make_train_step, 300))
    losses, ready = [], []

    def record(_, out):  # right after step t is dispatched: are steps 0..t-1 done?
        ready.append([loss.is_ready() for loss in losses])
        losses.append(out[1]["loss"])

    spy_calls(monkeypatch, record)
    train(CFG, tcfg, tmp_path / "run", progress=False)
    # Step t - 2 still runs (or waits) when step t is queued: nothing in the loop or in the
    # AuxK bucket choice waited for it.
    assert [r[t - 2] for t, r in enumerate(ready) if t >= 2] == [False] * 6


def test_no_compile_after_the_first_step(tmp_path, monkeypatch):
    # 64 latents per expert, AuxK on at most 16 of them: steps without AuxK and with it on
    # 16 dead ids; latents die after 2 steps, so AuxK runs from step 2 + DEAD_COUNT_LAG on.
    # (No checkpoint before the end: orbax's first save compiles small slicing programs.)
    tcfg = TrainConfig(steps=10, batch_size=64, mesh_shape=(1, 2), log_every=5,
                       checkpoint_every=100, eval_tokens=64, dead_after_tokens=128,
                       aux_max_share=0.25)  # fmt: skip
    events, buckets = [], []

    def compiled(event, seconds, fun_name="?", **_):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(fun_name)

    def record(step, out):
        buckets.append(step.bucket(out[0]))  # the next call's

    spy_calls(monkeypatch, record, before=lambda: events.append("STEP"))
    finish = loop.finish
    monkeypatch.setattr(loop, "finish", lambda *a: (events.append("FINISH"), finish(*a))[1])
    jax.monitoring.register_event_duration_secs_listener(compiled)
    try:
        train(CFG, tcfg, tmp_path / "run", progress=False)
    finally:
        jax.monitoring.unregister_event_duration_listener(compiled)
    assert 16 in buckets, buckets  # AuxK steps ran
    first, end = events.index("STEP"), events.index("FINISH")
    assert events[:first].count("jit(step)") == 2  # without AuxK and on 16 dead ids
    assert not [e for e in events[first:end] if e != "STEP"]  # nothing compiles mid-run
