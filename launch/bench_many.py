"""Benchmark train_many's choice: S same-shaped SAEs stepped one after another (one compiled
step per SAE, what launch.train_many runs) against one step of the S stacked on a leading
axis (jax.vmap of the same step body, one compiled step for all).

    python -m launch.bench_many [--saes 4] [--d 576] [--num_latents 4608] [--experts 8]
        [--experts_per_token 2] [--k 32] [--batch 4096] [--rounds 5] [--repeats 3] [--out F]

Both run the real training step (training/step.py, without AuxK) on the same batch; the
rounds alternate between the two and the medians are reported. Also checks that the stacked
step gives each SAE the state its own step gives (max relative difference after one step).
Ratios are meaningful within one run; absolute times only on an accelerator.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.bench_many", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--saes", type=int, default=4, help="same-shaped SAEs (S)")
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--num_latents", type=int, default=4608)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--experts_per_token", type=int, default=2)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (S steps each) per repeat")
    p.add_argument("--repeats", type=int, default=3, help="alternations of the two layouts")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    result = measure(args)
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def measure(args: argparse.Namespace) -> dict:
    import jax
    import numpy as np

    from sae_jax.config import SAEConfig, TrainConfig
    from sae_jax.mesh import make_mesh

    cfg = SAEConfig(d=args.d, num_latents=args.num_latents, num_experts=args.experts, k=args.k,
                    experts_per_token=args.experts_per_token,
                    router_bias=args.experts > 1).validate()  # fmt: skip
    tcfg = TrainConfig(steps=1000, batch_size=args.batch)
    with jax.set_mesh(make_mesh((1, 1))):
        x = jax.numpy.asarray(np.random.default_rng(0).normal(size=(args.batch, args.d)),
                              jax.numpy.float32)  # fmt: skip
        apart, stacked = Apart(cfg, tcfg, args.saes), Stacked(cfg, tcfg, args.saes)
        difference = apart.difference(stacked, x)
        times = {"apart": [], "stacked": []}
        for _ in range(args.repeats):
            times["apart"].append(apart.time(x, args.rounds))
            times["stacked"].append(stacked.time(x, args.rounds))
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "backend": jax.default_backend(), "saes": args.saes, "d": args.d,
        "num_latents": args.num_latents, "experts": args.experts,
        "experts_per_token": args.experts_per_token, "k": args.k, "batch": args.batch,
        "seconds_per_round": times, "median_seconds_per_round": median,
        "stacked_speedup": median["apart"] / median["stacked"],
        "max_relative_difference": difference,
    }  # fmt: skip


def models(cfg, tcfg, count: int):
    """(graphdef, optimiser, [step-0 TrainState]) of `count` SAEs of seeds 0..count-1."""
    from flax import nnx

    from sae_jax.model.switch import SwitchSAE
    from sae_jax.training.learning_rates import make_optimizer
    from sae_jax.training.step import init_state

    tx = make_optimizer(cfg, tcfg)
    built = [nnx.jit(lambda s=s: SwitchSAE(cfg, rngs=nnx.Rngs(s)))() for s in range(count)]
    return nnx.graphdef(built[0]), tx, [init_state(m, tx) for m in built]


def seconds_per_round(round_fn, x, rounds: int) -> float:
    """Seconds per call of round_fn(x), after one untimed call, waiting for the results."""
    import jax

    jax.block_until_ready(round_fn(x))
    start = time.perf_counter()
    for _ in range(rounds):
        metrics = round_fn(x)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / rounds


class Apart:
    """The S SAEs stepped one after another, each by the jitted step (as train_many)."""

    def __init__(self, cfg, tcfg, count: int):
        from sae_jax.training.step import make_train_step

        graphdef, tx, self.states = models(cfg, tcfg, count)
        self.step = make_train_step(graphdef, tx, tcfg, auxk=False)

    def round(self, x):
        out = []
        for i, state in enumerate(self.states):
            self.states[i], metrics = self.step(state, x)
            out.append(metrics)
        return out

    def time(self, x, rounds: int) -> float:
        return seconds_per_round(self.round, x, rounds)

    def difference(self, stacked: Stacked, x) -> float:
        """Max relative difference of the parameters after one step, stacked vs apart."""
        import jax
        import numpy as np

        self.round(x)
        stacked.round(x)
        worst = 0.0
        for i, state in enumerate(self.states):
            mine = jax.tree.leaves(state.params)
            theirs = jax.tree.leaves(jax.tree.map(lambda a, i=i: a[i], stacked.state.params))
            for a, b in zip(mine, theirs, strict=True):
                a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
                worst = max(worst, float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-30)))
        return worst


class Stacked:
    """The S SAEs' states stacked on a leading axis, stepped by one jitted vmap of the step."""

    def __init__(self, cfg, tcfg, count: int):
        import jax

        from sae_jax.training.step import step_body

        graphdef, tx, states = models(cfg, tcfg, count)
        self.state = jax.tree.map(lambda *a: jax.numpy.stack(a), *states)
        body = step_body(graphdef, tx, tcfg, auxk=False)
        self.step = jax.jit(jax.vmap(body, in_axes=(0, None)), donate_argnums=0)

    def round(self, x):
        self.state, metrics = self.step(self.state, x)
        return metrics

    def time(self, x, rounds: int) -> float:
        return seconds_per_round(self.round, x, rounds)


if __name__ == "__main__":
    sys.exit(main())
