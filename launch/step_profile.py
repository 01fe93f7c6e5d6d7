"""Where the training step's time goes: XLA:CPU's per-op times, grouped into the step's parts.

    python -m launch.step_profile [--configs 1:4608,4:18432] [--rounds 5] [--steps 2]
                                  [--d 576] [--k 32] [--batch 4096] [--bucket 0]
                                  [--out step_profile.json]

For each config (N:NUM_LATENTS; capacity dispatch, CAPACITY_FACTOR 1.25, float32; AuxK off,
or with `--bucket B` on B dead ids per expert) it builds the jitted TrainStep
(training/step.py) and traces `--steps` steps with
`jax.profiler` (a Perfetto trace: one event per executed XLA op, nested in its while loops).
Each op's self time (its duration less that of the ops it encloses) is attributed to a part
of the step from the op's name scope in the compiled HLO (`op_name` metadata: jvp = forward,
transpose(jvp) = backward, the optimizer's fori_loop = update, ...). The configs are traced
in turn, `--rounds` times, and the table gives each part's median over the rounds, in ms per
step, beside the wall time of the traced steps: on a machine shared with other work only the
columns of one run compare. The expert parts other than the encoder matmul and the top-k are
told from routing and dispatch by the gather kernel's loop over experts (experts of more than
1024 latents); with the dense kernel they count as dispatch.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

PARTS = (
    "route, dispatch, loss (fwd+bwd)",
    "expert fwd: encoder matmul",
    "expert fwd: top-k",
    "expert fwd: rest (slices, values, decode)",
    "expert bwd (gather-kernel gradients)",
    "AuxK (fwd+bwd)",
    "expert-sized zero fills and copies",
    "optimizer update loop (Adam, projection, renorm)",
    "grad norm, decoder dots, dead-latent counters",
    "other",
)
SKIP = ("Thunk", "$", "Slinky", "PjRt", "Execute", "Common", "Parse", "Handle", "Pjit")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.step_profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--configs", default="1:4608,4:18432", help="N:NUM_LATENTS pairs")
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=5, help="traces per config, interleaved")
    p.add_argument("--steps", type=int, default=2, help="steps per trace")
    p.add_argument("--bucket", type=int, default=0, help="AuxK dead ids per expert (0: off)")
    p.add_argument("--out", default="step_profile.json")
    return p.parse_args(argv)


def part_of(op_name: str, shape: str, latents: int) -> str:
    """The step part an HLO op belongs to, from its op_name scope (and, unnamed, its shape)."""
    if not op_name:
        return PARTS[6] if f",{latents}," in shape or f"[{latents}," in shape else PARTS[9]
    inner = op_name.split("/", 1)[-1]
    if "/auxk/" in inner:
        return PARTS[5]
    if inner.startswith(("jvp()", "transpose(jvp())")):
        in_experts = "/while/" in inner  # the gather kernel's loop over experts
        if inner.startswith("transpose"):
            return PARTS[4] if in_experts else PARTS[0]
        if "dot_general" in inner and "cd,ld->cl" in inner:
            return PARTS[1]
        if "top_k" in inner:
            return PARTS[2]
        return PARTS[3] if in_experts else PARTS[0]
    return PARTS[7] if inner.startswith("while/") else PARTS[8]


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
    """Instruction name -> (op_name metadata, result shape) for every op of the module."""
    ops = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ", line)
        if m:
            op = re.search(r'op_name="([^"]*)"', line)
            ops[m.group(1)] = (op.group(1) if op else "", m.group(2))
    return ops


def self_times(trace_dir: str) -> dict[str, float]:
    """Summed self time (us) per op name in the trace: its duration less its nested ops'."""
    path = sorted(glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True))[-1]
    with gzip.open(path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    by_thread = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(SKIP):
            by_thread[e["tid"]].append(e)
    total = collections.Counter()
    for thread in by_thread.values():
        thread.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack = []
        for e in thread:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
                stack.pop()
            total[e["name"]] += e["dur"]
            if stack:
                total[stack[-1]["name"]] -= e["dur"]
            stack.append(e)
    return total


def build(args, num_experts: int, num_latents: int):
    """(run one step and wait, compiled HLO text, XLA's figures) for one config, 1x1 mesh."""
    import jax
    import numpy as np
    from flax import nnx

    from sae_jax.config import SAEConfig, TrainConfig
    from sae_jax.distributed import put_batch
    from sae_jax.mesh import make_mesh, token_sharding
    from sae_jax.model.switch import SwitchSAE
    from sae_jax.training.step import setup_training

    cfg = SAEConfig(d=args.d, num_latents=num_latents, num_experts=num_experts, k=args.k,
                    capacity_factor=1.25, compute_dtype="float32").validate()  # fmt: skip
    mesh = make_mesh((1, 1))
    with jax.set_mesh(mesh):
        model = nnx.jit(lambda: SwitchSAE(cfg, rngs=nnx.Rngs(0)))()
        _, state, step = setup_training(model, TrainConfig(steps=1000, batch_size=args.batch))
        x = np.random.default_rng(0).normal(size=(args.batch, args.d)).astype(np.float32)
        x = put_batch(x, token_sharding(mesh))
        fn = step.for_bucket(args.bucket)  # 0: the step without AuxK
        compiled = fn.lower(state, x).compile()
    box = [state]

    def run() -> None:
        with jax.set_mesh(mesh):
            box[0], metrics = fn(box[0], x)
            jax.block_until_ready(metrics)

    run()
    return run, compiled.as_text(), xla_figures(compiled)


def xla_figures(compiled) -> dict[str, float]:
    """The compiled step's temporary buffer (first touched, so page-faulted, every step on
    CPU) and XLA's count of the bytes its ops access (while loop bodies counted once)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return {
        "XLA temp buffer MiB": compiled.memory_analysis().temp_size_in_bytes / 2**20,
        "XLA bytes accessed MiB": float(cost.get("bytes accessed", 0.0)) / 2**20,
    }


def trace_parts(run, ops: dict, latents: int, steps: int) -> tuple[dict[str, float], float]:
    """ms per step in each part, and the wall ms per step, over one trace of `steps` steps."""
    import jax

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            start = time.perf_counter()
            for _ in range(steps):
                run()
            wall = (time.perf_counter() - start) * 1e3 / steps
        times = self_times(d)
    parts = dict.fromkeys(PARTS, 0.0)
    for name, us in times.items():
        if name in ops:
            parts[part_of(*ops[name], latents)] += us / 1e3 / steps
    return parts, wall


def profile(args) -> dict:
    configs = [tuple(int(v) for v in c.split(":")) for c in args.configs.split(",") if c]
    built = {c: build(args, *c) for c in configs}
    samples = {c: [] for c in configs}
    for _ in range(args.rounds):
        for (n, m), (run, hlo, _) in built.items():
            samples[(n, m)].append(trace_parts(run, hlo_ops(hlo), m // n, args.steps))
    out = {}
    for (n, m), rounds in samples.items():
        med = {p: statistics.median(r[0][p] for r in rounds) for p in PARTS}
        med["sum of parts"] = sum(med[p] for p in PARTS)
        med["wall ms per step (traced)"] = statistics.median(r[1] for r in rounds)
        med.update(built[(n, m)][2])
        out[f"N={n}, M={m}"] = med
    return out


def print_table(table: dict) -> None:
    names = list(table)
    print(f"{'part (ms per step, median)':50s}" + "".join(f"{n:>16s}" for n in names))
    for part in table[names[0]]:
        print(f"{part:50s}" + "".join(f"{table[n][part]:16.1f}" for n in names))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    table = profile(args)
    print_table(table)
    with open(args.out, "w") as f:
        json.dump(table, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
