"""The training loop: build model and state, run steps, log, evaluate."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from sae_jax.config import SAEConfig, TrainConfig
from sae_jax.data import make_source
from sae_jax.distributed import put_batch
from sae_jax.evaluation import evaluate, make_eval_step
from sae_jax.init import geometric_median
from sae_jax.mesh import make_mesh, token_sharding
from sae_jax.metrics import MetricWriter, summary
from sae_jax.model import SwitchSAE, check_mesh
from sae_jax.train_step import init_state, make_optimizer, make_train_step, sharding_of

CONSOLE = ("loss", "fvu", "l0", "dead_fraction", "drop_fraction")
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
) -> dict:
    """Train to `tcfg.steps`, writing workdir/metrics.jsonl; returns the final eval row."""
    tcfg.validate()
    train_src = make_source(tcfg.train_data)
    eval_src = train_src if tcfg.eval_data == tcfg.train_data else make_source(tcfg.eval_data)
    cfg = dataclasses.replace(sae_cfg, d=train_src.d).validate()
    mesh = make_mesh(tcfg.mesh_shape)
    check_mesh(cfg, dict(mesh.shape), tcfg.batch_size)
    tokens = token_sharding(mesh)
    lead = jax.process_index() == 0
    writer = MetricWriter(workdir) if lead else None
    with jax.set_mesh(mesh):
        model = build_model(cfg, tcfg, train_src)
        tx = make_optimizer(tcfg, cfg.num_latents)
        graphdef, state = nnx.graphdef(model), init_state(model, tx)
        del model
        step_fn = make_train_step(graphdef, tx, tcfg, sharding_of(state))
        eval_step = make_eval_step(
            graphdef, cfg.eval_capacity_factor, tcfg.lb_alpha, tcfg.aux_weight
        )

        def run_eval(step: int) -> dict:
            row = evaluate(
                eval_step,
                state.params,
                lambda i: put_batch(eval_src.batch("eval", i, tcfg.batch_size), tokens),
                tokens=tcfg.eval_tokens,
                batch_size=tcfg.batch_size,
                features=getattr(eval_src, "features", None),
            )
            return log(step, row)

        def log(step: int, row: dict) -> dict:
            row = {"step": step, "tokens": step * tcfg.batch_size, **row}
            return writer.write(row) if writer else row

        bar = tqdm(total=tcfg.steps, disable=not (progress and lead), unit="step")
        last_time, last_step, row = time.perf_counter(), 0, None
        for step in range(tcfg.steps):
            x = put_batch(train_src.batch("train", step, tcfg.batch_size), tokens)
            state, metrics = step_fn(state, x)
            done = step + 1
            if done % tcfg.log_every == 0 or done == tcfg.steps:
                metrics = jax.device_get(metrics)
                now = time.perf_counter()
                metrics["tokens_per_sec"] = (done - last_step) * tcfg.batch_size / (now - last_time)
                last_time, last_step = now, done
                check_finite(metrics, done)
                row = log(done, metrics)
                bar.set_postfix_str(summary(row, CONSOLE))
            if tcfg.eval_every and done % tcfg.eval_every == 0 and done != tcfg.steps:
                run_eval(done)
            bar.update(1)
        bar.close()
        final = run_eval(tcfg.steps)
    if writer:
        writer.close()
        print(f"final step {tcfg.steps}: " + summary(final, FINAL), flush=True)
    return final


def check_finite(metrics: dict, step: int) -> None:
    if not np.isfinite(metrics["loss"]):
        raise TrainingError(
            f"loss is {metrics['loss']} at step {step}: lower LR, check the data for "
            "NaN/inf, or raise the capacity factor"
        )
