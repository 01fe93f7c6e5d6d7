"""The Switch SAE paper's comparison at our scale, on the same activation shards.

    python -m launch.experiments.compare --train DIR --eval DIR [--width 4608] [--steps 150]

Trains a TopK SAE (N = 1, NUM_LATENTS = width), Switch SAEs at equal width (N = 8, 32) and at
equal encoder FLOPs (N = 2, 4, 8 with NUM_LATENTS = N x width), all with configs/smollm2.gin
otherwise; evaluates each with launch.eval (FVU, L0, loss recovered on the eval shards'
held-out text) and writes a markdown table with the throughput: the median logged tokens/s
of each training run (the whole loop, reader included; meaningful only when nothing else
shares the machine) and the training step alone, benchmarked for every row in this one
process at the end. Finished runs (those with an eval.json) are not trained again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

# (name, N, width multiple, comparison)
RUNS = [
    ("topk", 1, 1, "baseline"),
    ("switch8", 8, 1, "equal width"),
    ("switch32", 32, 1, "equal width"),
    ("switch2_flops", 2, 2, "equal FLOPs"),
    ("switch4_flops", 4, 4, "equal FLOPs"),
    ("switch8_flops", 8, 8, "equal FLOPs"),
]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m launch.experiments.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--train", required=True, help="training activation shards")
    p.add_argument("--eval", required=True, help="held-out activation shards")
    p.add_argument("--width", type=int, default=4608, help="the TopK SAE's NUM_LATENTS")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--workdir", default="runs/compare")
    p.add_argument("--out", default="runs/compare/results.md")
    p.add_argument("--only", default="", help="comma-separated run names (default: all)")
    p.add_argument("--gin", action="append", default=[], help="extra NAME=VALUE bindings")
    p.add_argument("--bench_steps", type=int, default=5, help="timed steps per step benchmark")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    chosen = [r for r in RUNS if not args.only or r[0] in args.only.split(",")]
    results = []
    for name, n, multiple, kind in chosen:
        workdir = Path(args.workdir) / name
        latents = args.width * multiple
        train = [sys.executable, "-m", "launch.train", "--gin_file=smollm2.gin",
                 f"--workdir={workdir}", f"--gin.TRAIN_DATA='{args.train}'",
                 f"--gin.EVAL_DATA='{args.eval}'", f"--gin.NUM_EXPERTS={n}",
                 f"--gin.NUM_LATENTS={latents}", f"--gin.STEPS={args.steps}", "--no_progress",
                 *[f"--gin.{b}" for b in args.gin]]  # fmt: skip
        print(f"== {name}: N={n}, NUM_LATENTS={latents}", flush=True)
        if not (workdir / "eval.json").exists():  # done runs are kept: rerunning resumes
            subprocess.run(train, check=True)
            subprocess.run([sys.executable, "-m", "launch.eval", "--workdir", str(workdir),
                            "--data", args.eval], check=True)  # fmt: skip
        result = json.loads((workdir / "eval.json").read_text())
        result |= {"name": name, "num_experts": n, "num_latents": latents, "kind": kind,
                   "tokens_per_sec": train_speed(workdir / "metrics.jsonl")}  # fmt: skip
        results.append(result)
    for result in results:  # one process, one after another: comparable step times
        result["step_tokens_per_sec"] = step_speed(args, result)
    table = markdown(results, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table)
    (Path(args.out).with_suffix(".json")).write_text(json.dumps(results, indent=1))
    print(table)
    return 0


def step_speed(args, result: dict) -> float:
    """Tokens/s of the training step alone (launch.bench's measurement, random inputs)."""
    from launch import bench
    from sae_jax.data import ActivationData

    d = ActivationData(args.train, process=(0, 1)).d
    spec = argparse.Namespace(d=d, k=32, batch=4096, capacity_factor=1.25, steps=args.bench_steps)
    row = bench.measure(spec, result["num_experts"], result["num_latents"], (1, 1))
    print(f"step benchmark {result['name']}: {row['step_ms']:.0f} ms", flush=True)
    return row["tokens_per_sec"]


def train_speed(metrics: Path) -> float:
    """Median logged training tokens/s, leaving out the first interval (compilation)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    speeds = [r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r][1:]
    return statistics.median(speeds) if speeds else float("nan")


def markdown(results: list[dict], args) -> str:
    base = next((r for r in results if r["num_experts"] == 1), results[0])
    lines = [
        f"Training: {args.steps} steps x 4096 tokens on `{args.train}`; evaluation on "
        f"`{args.eval}`.",
        "",
        "| run | N | NUM_LATENTS | compared as | FVU | FVU incl. outliers | L0 | dead | "
        "CE clean | CE with SAE | delta CE | loss recovered | train tokens/s | "
        "step tokens/s | vs TopK |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lm = [f"{r[k]:.4f}" if k in r else "-" for k in ("ce_clean", "ce_sae", "delta_ce")]
        rec = f"{r['loss_recovered']:.1%}" if "loss_recovered" in r else "-"
        lines.append(
            f"| {r['name']} | {r['num_experts']} | {r['num_latents']} | {r['kind']} | "
            f"{r['fvu_dropless']:.4f} | {r['fvu_dropless_with_outliers']:.4f} | {r['l0']:.1f} | "
            f"{r['dead_fraction']:.1%} | {' | '.join(lm)} | {rec} | "
            f"{r['tokens_per_sec']:.0f} | {r['step_tokens_per_sec']:.0f} | "
            f"{r['step_tokens_per_sec'] / base['step_tokens_per_sec']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
