"""The Switch SAE paper's comparison at our scale, on the same activation shards.

    python -m launch.experiments.compare --train DIR --eval DIR [--width 4608] [--passes 1]
        [--steps S] [--rows topk,switch8,...] [--gin NAME=VALUE ...] [--eval_points 9]
        [--workdir runs/compare] [--out runs/compare/results.md] [--doc docs/comparison.md]
        [--seeds 0,1,2] [--template T]
    python -m launch.experiments.compare --set DIR

Trains one SAE per row (RUNS; --rows picks them, default DEFAULT_ROWS, `all` for every one):
a TopK SAE (N = 1, NUM_LATENTS = width), Switch SAEs at equal width (N = 8, 32; top-1, or
top-2 with EXPERTS_PER_TOKEN = 2), at equal encoder FLOPs (N = 2, 4, 8 experts of the TopK's
width, NUM_LATENTS = N x width) and wider top-2 ones, all with configs/smollm2.gin otherwise;
a row's own gin bindings come after --gin's, which apply to every row. Each row trains for
ceil(passes x the training shards' tokens / BATCH_SIZE) steps (--steps overrides), with a
held-out evaluation every EVAL_EVERY steps (about --eval_points of them), then is evaluated
with launch.eval (FVU, L0, dead latents, loss recovered on the eval shards' held-out text when
the manifest names a model) and its decoder searched for duplicated features: latents with a
partner of cosine > 0.9 in another expert (and, apart, in their own expert).

Writes --out (a markdown table: FVU, L0, dead fraction, duplicates, loss recovered, training
and step tokens/s, the ratios to TopK, total training FLOPs and seconds), results.json and two
PNGs beside it: eval FVU against training wall-clock seconds (metrics.jsonl's
`train_seconds`, held-out evaluations left out) and against training FLOPs (tokens seen x
plan.estimate.training_flops_per_token, the analytic step without AuxK). "train tokens/s" is
the median logged throughput of the run (reader included; meaningful only when nothing else
shares the machine), "step tokens/s" the training step alone, benchmarked for every row in
this one process at the end (--bench_steps 0 skips it). --doc DOC regenerates that page from
launch/experiments/comparison_template.md, with the PNGs copied beside it. Finished runs
(those with an eval.json) are not trained again.

--seeds S0,S1,... trains every row once per seed (gin SEED: the initialisation and the data
order), in WORKDIR/ROW/seedS (with one seed, or without --seeds, in WORKDIR/ROW as before).
With several seeds a row's FVU is given as the mean ± the sample standard deviation over the
seeds and their min-max, the ratios are those of the means, "beats TopK" counts the seeds at
which the row's FVU is below the TopK baseline's of the same seed, the other metrics and the
curves are means over the seeds, "train tokens/s" the median over them, and the step is
benchmarked once per row; results.json keeps each seed's record under the row's `runs`.

--set DIR trains nothing: it prints the table of the SAEs a launch.train_many job trained in
DIR (each with its layer, settings and results) and writes it to DIR/table.md
(launch/experiments/set_table.py; launch.eval --workdir DIR writes it too).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from string import Template
from typing import NamedTuple

CONFIG = "smollm2.gin"
TEMPLATE = Path(__file__).with_name("comparison_template.md")
TIME_PNG, FLOPS_PNG = "comparison_fvu_time.png", "comparison_fvu_flops.png"


class Row(NamedTuple):
    """One SAE of the comparison: N experts of width x multiple / N latents each (experts 0:
    the config file's own N and NUM_LATENTS), plus gin bindings of its own (NAME=VALUE)."""

    name: str
    experts: int
    multiple: int
    kind: str
    bindings: tuple[str, ...] | list[str] = ()
    config: str = CONFIG


# The Switch SAE as published: top-1 routing balanced by the load-balancing loss.
TOP1 = ("EXPERTS_PER_TOKEN=1", "ROUTER_BIAS=False", "LB_ALPHA=3.0")
# Top-1 routing balanced by smollm2.gin's routing bias (Matryoshka experts need top-1).
TOP1_BIAS = ("EXPERTS_PER_TOKEN=1",)
KINDS = ("batchtopk", "matryoshka", "jumprelu")
RUNS = [
    Row("topk", 1, 1, "baseline"),
    Row("topk_lr", 1, 1, "TopK at BASE_LR = 3e-3", ("BASE_LR=3e-3",)),
    Row("switch8", 8, 1, "equal width, smollm2.gin (top-2, bias balancing)"),
    Row("switch8_top1", 8, 1, "equal width, top-1 + LB loss", TOP1),
    Row("switch4_flops", 4, 4, "equal FLOPs, top-1 + LB loss", TOP1),
    Row("wide", 0, 0, "smollm2_wide.gin", config="smollm2_wide.gin"),
    Row("switch32", 32, 1, "equal width"),
    Row("switch2_flops", 2, 2, "equal FLOPs, top-1 + LB loss", TOP1),
    Row("switch8_flops", 8, 8, "equal FLOPs, top-1 + LB loss", TOP1),
    # Other LRs: switch8's experts and router at 5.3e-3 (what one expert's width gave them
    # before the per-group LRs), the wide config at the width rule's 2.0e-3.
    Row("switch8_lr", 8, 1, "switch8 at BASE_LR = 2.8e-3", ("BASE_LR=2.8e-3",)),
    Row(
        "wide_lr", 0, 0, "smollm2_wide.gin at BASE_LR = 2e-3", ("BASE_LR=2e-3",), "smollm2_wide.gin"
    ),
    # The other activation kinds (docs/activations.md): each SAE of N = 1, a Switch of its
    # experts at equal width, and a wide one.
    *(Row(kind, 0, 0, f"{kind}, N = 1", config=f"smollm2_{kind}.gin") for kind in KINDS),
    *(Row(f"{kind}_switch8", 8, 1, f"{kind} experts, equal width, top-1",
          (f"ACTIVATION='{kind}'", *TOP1_BIAS)) for kind in KINDS),
    Row("batchtopk_wide", 0, 0, "smollm2_batchtopk_wide.gin", config="smollm2_batchtopk_wide.gin"),
    *(Row(f"{kind}_wide", 0, 0, f"smollm2_wide.gin of {kind} experts", (f"ACTIVATION='{kind}'",),
          "smollm2_wide.gin") for kind in KINDS[1:]),
]  # fmt: skip
DEFAULT_ROWS = "topk,topk_lr,switch8,switch8_top1,switch4_flops,wide"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.experiments.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--train", help="training activation shards (required but with --set)")
    p.add_argument("--eval", help="held-out activation shards (required but with --set)")
    p.add_argument("--set", default=None, metavar="DIR",
                   help="only print and write DIR/table.md, the table of the launch.train_many "
                   "set in DIR (launch/experiments/set_table.py); nothing is trained")  # fmt: skip
    p.add_argument("--width", type=int, default=4608, help="the TopK SAE's NUM_LATENTS")
    p.add_argument("--passes", type=float, default=1.0, help="passes over the training shards")
    p.add_argument("--steps", type=int, default=None, help="steps per row (overrides --passes)")
    p.add_argument("--eval_points", type=int, default=9, help="held-out evaluations per run")
    p.add_argument("--eval_tokens", type=int, default=65536, help="launch.eval's --tokens")
    p.add_argument("--workdir", default="runs/compare")
    p.add_argument("--out", default="runs/compare/results.md")
    names = ", ".join(r.name for r in RUNS)
    p.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma list, or 'all' ({names})")
    p.add_argument("--gin", action="append", default=[], help="NAME=VALUE for every row")
    p.add_argument("--bench_steps", type=int, default=5, help="timed steps per step benchmark")
    p.add_argument("--doc", default=None, help="also regenerate this markdown page")
    p.add_argument("--template", default=str(TEMPLATE), help="the page's template "
                   "(comparison_kinds_template.md: the activation kinds' page)")  # fmt: skip
    p.add_argument("--seeds", type=parse_seeds, default=None,
                   help="comma list of SEED values, one run per row and seed (default: one, "
                   "the config's)")  # fmt: skip
    p.add_argument("--in_process", action="store_true",
                   help="train and evaluate in this process, not in subprocesses")  # fmt: skip
    args = p.parse_args(argv)
    if args.set is None and (args.train is None or args.eval is None):
        p.error("the following arguments are required: --train, --eval (or --set DIR)")
    return args


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2] (distinct, in the given order)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a comma list of integers: {text!r}") from e
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"need one or more distinct seeds: {text!r}")
    return seeds


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.set is not None:
        return set_table_main(args.set)
    rows = chosen_rows(args.rows)
    steps, batch = planned_steps(args)
    results = [row_result(args, row, steps, batch) for row in rows]
    for row, result in zip(rows, results, strict=True):  # one process: comparable step times
        result["step_tokens_per_sec"] = step_speed(args, row_dirs(args, row)[0], result)
    add_ratios(results)
    if multi_seed(args):
        add_paired_wins(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plots = write_plots(results, out.parent, seeds_label(args))
    table = markdown(results, multi_seed(args))
    out.write_text(f"{setup_text(args, steps, batch)}\n\n{seeds_text(args)}{table}")
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    print(table)
    print(f"wrote {out}, {out.with_suffix('.json')}, {plots[0]}, {plots[1]}")
    if args.doc:
        print(f"wrote {write_doc(args, argv, results, plots, (steps, batch))}")
    return 0


def set_table_main(workdir: str) -> int:
    """--set DIR: print the set's table and write DIR/table.md (exit 2, one line, where DIR is
    no set)."""
    from launch.experiments.set_table import TABLE_FILE, write_table
    from sae_jax.config import ConfigError

    try:
        table = write_table(workdir)
    except ConfigError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(table)
    print(f"wrote {workdir.rstrip('/')}/{TABLE_FILE}")
    return 0


def chosen_rows(names: str) -> list[Row]:
    """The RUNS rows named in the comma list (in RUNS's order), or all of them for 'all'."""
    wanted = [n for n in names.split(",") if n]
    if wanted == ["all"]:
        return list(RUNS)
    unknown = sorted(set(wanted) - {r.name for r in RUNS})
    if unknown:
        known = ", ".join(r.name for r in RUNS)
        raise SystemExit(f"error: unknown row(s) {', '.join(unknown)}; known: {known}")
    return [r for r in RUNS if r.name in wanted]


def planned_steps(args) -> tuple[int, int]:
    """(steps per row, BATCH_SIZE): --steps, or ceil(passes x training tokens / BATCH_SIZE)
    with the tokens from the training shards' manifest and the batch from the config with
    --gin's bindings."""
    from sae_jax.data import ActivationData
    from sae_jax.gin_setup import parse

    _, tcfg = parse([CONFIG], [f"TRAIN_DATA={args.train!r}", f"EVAL_DATA={args.eval!r}", *args.gin])
    if args.steps is not None:
        return args.steps, tcfg.batch_size
    tokens = ActivationData(args.train, process=(0, 1)).total_tokens
    return max(1, math.ceil(args.passes * tokens / tcfg.batch_size)), tcfg.batch_size


def eval_every(steps: int, points: int) -> int:
    """EVAL_EVERY giving about `points` held-out evaluations (the last one at the end)."""
    return max(1, math.ceil(steps / max(points, 1)))


def train_argv(args, row: Row, steps: int, workdir: Path, seed: int | None = None) -> list[str]:
    """launch.train's arguments for a row: the config, the data, N, NUM_LATENTS, STEPS and
    EVAL_EVERY, then --gin's bindings, then the row's own, then SEED (unless None)."""
    shape = [f"NUM_EXPERTS={row.experts}", f"NUM_LATENTS={args.width * row.multiple}"]
    bindings = [f"TRAIN_DATA={args.train!r}", f"EVAL_DATA={args.eval!r}",
                *(shape if row.experts else []),
                f"STEPS={steps}", f"EVAL_EVERY={eval_every(steps, args.eval_points)}",
                *args.gin, *row.bindings, *([] if seed is None else [f"SEED={seed}"])]  # fmt: skip
    return [f"--gin_file={row.config}", f"--workdir={workdir}", "--no_progress",
            *[f"--gin.{b}" for b in bindings]]  # fmt: skip


def run_module(module: str, argv: list[str], in_process: bool) -> None:
    """python -m module argv (a subprocess, or in this process); raises on failure."""
    if not in_process:
        subprocess.run([sys.executable, "-m", module, *argv], check=True)
        return
    import importlib

    code = importlib.import_module(module).main(argv)
    if code:
        raise SystemExit(f"error: {module} {shlex.join(argv)} exited with {code}")


def multi_seed(args) -> bool:
    return args.seeds is not None and len(args.seeds) > 1


def row_dirs(args, row: Row) -> list[Path]:
    """The row's run directories, one per seed: WORKDIR/ROW/seedS, or WORKDIR/ROW alone
    with one seed."""
    if not multi_seed(args):
        return [Path(args.workdir) / row.name]
    return [Path(args.workdir) / row.name / f"seed{s}" for s in args.seeds]


def row_result(args, row: Row, steps: int, batch: int) -> dict:
    """run_row's record (one seed), or with several seeds aggregate() of each seed's."""
    if not multi_seed(args):
        seed = None if args.seeds is None else args.seeds[0]
        return run_row(args, row, steps, batch, row_dirs(args, row)[0], seed)
    records = [run_row(args, row, steps, batch, workdir, seed) | {"seed": seed}
               for seed, workdir in zip(args.seeds, row_dirs(args, row), strict=True)]  # fmt: skip
    return aggregate(records)


def run_row(args, row: Row, steps: int, batch: int, workdir: Path, seed: int | None) -> dict:
    """Train and evaluate a row at a seed (None: the config's) in workdir, unless its
    eval.json exists; its results: eval.json's numbers, throughput, curves, FLOPs and
    duplicates."""
    at = "" if seed is None else f" SEED={seed}"
    print(f"== {row.name}{at}: {row.config} N={row.experts or 'config'}, "
          f"x{row.multiple or 'config'} {' '.join(row.bindings)}", flush=True)  # fmt: skip
    if not (workdir / "eval.json").exists():  # done runs are kept: rerunning resumes
        run_module("launch.train", train_argv(args, row, steps, workdir, seed), args.in_process)
        eval_argv = ["--workdir", str(workdir), "--data", args.eval,
                     "--tokens", str(args.eval_tokens)]  # fmt: skip
        run_module("launch.eval", eval_argv, args.in_process)
    cfg, tcfg = run_configs(workdir)
    result = json.loads((workdir / "eval.json").read_text())
    result |= {"name": row.name, "num_experts": cfg.num_experts, "num_latents": cfg.num_latents,
               "experts_per_token": cfg.experts_per_token, "shared_latents": cfg.shared_latents,
               "kind": row.kind, "bindings": list(row.bindings), "steps": tcfg.steps,
               "batch_size": tcfg.batch_size, "d": cfg.d, "activation": cfg.activation}  # fmt: skip
    result |= training_record(workdir / "metrics.jsonl", flops_per_token(cfg, tcfg))
    result["duplicates"] = duplicates(workdir)
    return result


def run_configs(workdir: Path):
    """(SAEConfig, TrainConfig) of a run, from its latest checkpoint's record."""
    import dataclasses

    from sae_jax.config import SAEConfig, TrainConfig
    from sae_jax.training.checkpoint import Checkpointer

    ckpt = Checkpointer(workdir, create=False)
    try:
        record = ckpt.record(ckpt.latest_step())
    finally:
        ckpt.close()
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    train = {k: v for k, v in record["train"].items() if k in known}
    train["mesh_shape"] = tuple(train.get("mesh_shape", (-1, 1)))
    return SAEConfig.from_record(record["model"]), TrainConfig(**train)


def flops_per_token(cfg, tcfg) -> float:
    from sae_jax.plan.estimate import training_flops_per_token

    return training_flops_per_token(cfg, tcfg)


def training_record(metrics: Path, flops: float) -> dict:
    """From a run's metrics.jsonl: the median logged training tokens/s (leaving out the first
    interval, compilation), its training seconds and FLOPs, and the eval curve: (step,
    tokens, train_seconds, FLOPs = tokens x flops per token, eval/fvu) per held-out
    evaluation."""
    from sae_jax.evaluation.metric_rows import read_rows

    rows = read_rows(metrics)
    speeds = [r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r][1:]
    curve = [{"step": r["step"], "tokens": r["tokens"], "train_seconds": r.get("train_seconds"),
              "flops": r["tokens"] * flops, "fvu": r["eval/fvu"]}
             for r in rows if r.get("eval/fvu") is not None]  # fmt: skip
    last = rows[-1] if rows else {}
    return {
        "tokens_per_sec": statistics.median(speeds) if speeds else float("nan"),
        "flops_per_token": flops,
        "train_tokens": last.get("tokens", 0),
        "train_flops": last.get("tokens", 0) * flops,
        "train_seconds": last.get("train_seconds", float("nan")),
        "curve": curve,
    }


def duplicates(workdir: Path) -> dict:
    """count_duplicates of the run's exported decoder, kept in DIR/duplicates.json."""
    from sae_jax.evaluation.duplicates import DUPLICATE_COSINE, count_duplicates

    cached = workdir / "duplicates.json"
    if cached.exists():
        found = json.loads(cached.read_text())
        if found.get("threshold") == DUPLICATE_COSINE:
            return found
    import numpy as np

    from sae_jax.pretrained import load_pretrained

    found = count_duplicates(np.asarray(load_pretrained(workdir / "export").params["w_dec"]))
    cached.write_text(json.dumps(found, indent=1) + "\n")
    return found


def step_speed(args, workdir: Path, result: dict) -> float:
    """Tokens/s of the training step alone of the run in workdir (random inputs, one device),
    or NaN with --bench_steps 0. Kept in WORKDIR/ROW/step_speed.json (once per row: the step
    does not depend on the seed): a rerun (say with --doc) reuses it, as it reuses the
    training, so the rows keep the figures measured side by side."""
    if args.bench_steps <= 0:
        return float("nan")
    from launch import bench

    cache = Path(args.workdir) / result["name"] / "step_speed.json"
    if cache.exists():
        return json.loads(cache.read_text())["step_tokens_per_sec"]
    cfg, _ = run_configs(workdir)
    seconds, _, _ = bench.time_step(cfg, result["batch_size"], args.bench_steps)
    print(f"step benchmark {result['name']}: {1e3 * seconds:.0f} ms", flush=True)
    speed = result["batch_size"] / seconds
    cache.write_text(json.dumps({"step_tokens_per_sec": speed}) + "\n")
    return speed


def aggregate(records: list[dict]) -> dict:
    """One row's result over its seeds, from run_row's record of each (with its "seed"):
    mean_record() of them, the FVU's sample standard deviation, min and max, the median
    training tokens/s, the mean curve, the seeds, and every seed's record (`runs`)."""
    fvus = [r["fvu_dropless"] for r in records]
    result = mean_record([{k: v for k, v in r.items() if k != "seed"} for r in records])
    return result | {
        "seeds": [r["seed"] for r in records],
        "fvu_dropless_std": sample_std(fvus),
        "fvu_dropless_min": min(fvus),
        "fvu_dropless_max": max(fvus),
        "tokens_per_sec": statistics.median([r["tokens_per_sec"] for r in records]),
        "curve": mean_curve([r["curve"] for r in records]),
        "runs": records,
    }


def mean_record(records: list[dict]) -> dict:
    """Key by key (the first record's keys): the value all records share, else the mean of
    numbers, else mean_record() of dicts; keys whose values differ otherwise are left out."""
    out = {}
    for key in records[0]:
        values = [r.get(key) for r in records]
        if all(v == values[0] for v in values):
            out[key] = values[0]
        elif all(is_number(v) for v in values):
            out[key] = statistics.fmean(values)
        elif all(isinstance(v, dict) for v in values):
            out[key] = mean_record(values)
    return out


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def sample_std(values: list[float]) -> float:
    """The sample standard deviation (n - 1 in the denominator); NaN for fewer than 2."""
    return statistics.stdev(values) if len(values) > 1 else float("nan")


def mean_curve(curves: list[list[dict]]) -> list[dict]:
    """The eval curve's points at the steps every curve has, each field (tokens,
    train_seconds, FLOPs, FVU) the mean over the curves, by mean_record()."""
    by_step = [{p["step"]: p for p in curve} for curve in curves]
    steps = sorted(set.intersection(*(set(b) for b in by_step)))
    return [mean_record([b[step] for b in by_step]) for step in steps]


def paired_wins(fvus: dict[int, float], base: dict[int, float]) -> tuple[int, int]:
    """(how many seeds the row's FVU is below the baseline's at, how many seeds both have),
    from {seed: FVU} of each."""
    shared = [s for s in fvus if s in base]
    return sum(fvus[s] < base[s] for s in shared), len(shared)


def add_paired_wins(results: list[dict]) -> None:
    """Each aggregate()'s `beats_topk`: paired_wins() against the baseline row (None for the
    baseline itself)."""
    base = baseline(results)

    def fvus(result: dict) -> dict[int, float]:
        return {r["seed"]: r["fvu_dropless"] for r in result["runs"]}

    for r in results:
        r["beats_topk"] = None if r is base else list(paired_wins(fvus(r), fvus(base)))


def baseline(results: list[dict]) -> dict:
    """The row the ratios are to: 'topk', else the first N = 1 row, else the first row."""
    named = [r for r in results if r["name"] == "topk"]
    return (named or [r for r in results if r["num_experts"] == 1] or results)[0]


def add_ratios(results: list[dict]) -> None:
    """vs-TopK ratios of FVU and of the training and step tokens/s (NaN where missing), and
    the FVU's ratio to the best TopK (the lowest FVU of the N = 1 TopK rows, say at another
    LR; rows of other activation kinds are not TopKs)."""
    base = baseline(results)
    topk_fvus = [r["fvu_dropless"] for r in results
                 if r["num_experts"] == 1 and r.get("activation", "topk") == "topk"]  # fmt: skip
    best = min(topk_fvus) if topk_fvus else None
    for r in results:
        for key in ("fvu_dropless", "tokens_per_sec", "step_tokens_per_sec"):
            r[f"{key}_vs_topk"] = ratio(r.get(key), base.get(key))
        r["fvu_dropless_vs_best_topk"] = ratio(r.get("fvu_dropless"), best)


def ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return float("nan")
    return a / b


def write_plots(
    results: list[dict], directory: Path, ylabel: str = "eval FVU"
) -> tuple[Path, Path]:
    """Eval FVU (each row's curve: with several seeds the mean one) against training seconds,
    and against training FLOPs (two PNGs)."""
    from sae_jax.evaluation.plots import comparison_curves

    def series(x: str) -> dict[str, list[tuple[float, float]]]:
        return {r["name"]: [(p[x], p["fvu"]) for p in r["curve"] if p.get(x) is not None]
                for r in results}  # fmt: skip

    time_png = comparison_curves(series("train_seconds"), "training wall-clock seconds",
                                 ylabel, directory / TIME_PNG)  # fmt: skip
    flops_png = comparison_curves(series("flops"), "training FLOPs (analytic)", ylabel,
                                  directory / FLOPS_PNG)  # fmt: skip
    return time_png, flops_png


COLUMNS = [  # (header, function of a result -> cell)
    ("run", lambda r: r["name"]),
    ("N", lambda r: str(r["num_experts"])),
    ("e", lambda r: str(r["experts_per_token"])),
    ("NUM_LATENTS", lambda r: str(r["num_latents"])),
    ("compared as", lambda r: r["kind"]),
    ("FVU", lambda r: cell(r.get("fvu_dropless"), "{:.4f}")),
    ("FVU vs TopK", lambda r: cell(r.get("fvu_dropless_vs_topk"), "{:.2f}x")),
    ("vs best TopK", lambda r: cell(r.get("fvu_dropless_vs_best_topk"), "{:.3f}x")),
    ("L0", lambda r: cell(r.get("l0"), "{:.1f}")),
    ("dead", lambda r: cell(r.get("dead_fraction"), "{:.1%}")),
    ("duplicates (other expert)", lambda r: duplicate_cell(r, "cross_expert")),
    ("duplicates (same expert)", lambda r: duplicate_cell(r, "within_expert")),
    ("loss recovered", lambda r: cell(r.get("loss_recovered"), "{:.1%}")),
    ("train tokens/s", lambda r: cell(r.get("tokens_per_sec"), "{:.0f}")),
    ("vs TopK", lambda r: cell(r.get("tokens_per_sec_vs_topk"), "{:.2f}x")),
    ("step tokens/s", lambda r: cell(r.get("step_tokens_per_sec"), "{:.0f}")),
    ("vs TopK ", lambda r: cell(r.get("step_tokens_per_sec_vs_topk"), "{:.2f}x")),
    ("training FLOPs", lambda r: cell(r.get("train_flops"), "{:.3g}")),
    ("training s", lambda r: cell(r.get("train_seconds"), "{:.0f}")),
]
SEED_COLUMNS = [  # with several seeds: the FVU's spread and the paired wins
    *COLUMNS[:5],
    ("FVU (mean ± sd)", lambda r: spread_cell(r)),
    ("FVU min–max", lambda r: range_cell(r)),
    *COLUMNS[6:8],
    ("beats TopK", lambda r: wins_cell(r)),
    *COLUMNS[8:],
]


def cell(value: float | None, fmt: str) -> str:
    """`value` formatted, or '-' when it is missing or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def spread_cell(r: dict) -> str:
    """'mean ± sample standard deviation' of the FVU over the seeds."""
    mean, std = r.get("fvu_dropless"), r.get("fvu_dropless_std")
    return f"{cell(mean, '{:.4f}')} ± {cell(std, '{:.4f}')}"


def range_cell(r: dict) -> str:
    """'min–max' of the FVU over the seeds."""
    return (
        f"{cell(r.get('fvu_dropless_min'), '{:.4f}')}–{cell(r.get('fvu_dropless_max'), '{:.4f}')}"
    )


def wins_cell(r: dict) -> str:
    """'wins/seeds' of add_paired_wins(), '-' for the baseline."""
    wins = r.get("beats_topk")
    return "-" if wins is None else f"{wins[0]}/{wins[1]}"


def duplicate_cell(r: dict, key: str) -> str:
    dup = r.get("duplicates") or {}
    if key not in dup:
        return "-"
    count = f"{dup[key]:.1f}" if isinstance(dup[key], float) else str(dup[key])
    return f"{count} ({dup[f'{key}_fraction']:.1%})"


def markdown(results: list[dict], seeds: bool = False, columns: list | None = None) -> str:
    """The results table, one line per row (SEED_COLUMNS for aggregates over seeds; `columns`:
    other (header, function) pairs, as set_table's)."""
    columns = columns or (SEED_COLUMNS if seeds else COLUMNS)
    lines = ["| " + " | ".join(h.strip() for h, _ in columns) + " |",
             "|" + "---|" * len(columns)]  # fmt: skip
    lines += ["| " + " | ".join(f(r) for _, f in columns) + " |" for r in results]
    return "\n".join(lines) + "\n"


def setup_text(args, steps: int, batch: int) -> str:
    """One paragraph: the data, the steps and the evaluation points."""
    return (
        f"Training: {steps} steps x {batch} tokens ({args.passes:g} pass(es) unless --steps) on "
        f"`{args.train}` with configs/{CONFIG}, a held-out evaluation every "
        f"{eval_every(steps, args.eval_points)} steps; evaluation on `{args.eval}`."
    )


def seeds_text(args) -> str:
    """With several seeds, a paragraph (and a blank line) on them and how the table
    aggregates over them; else ''."""
    if not multi_seed(args):
        return ""
    seeds = ", ".join(map(str, args.seeds))
    return (
        f"Each row is trained at {len(args.seeds)} seeds (SEED = {seeds}: the initialisation "
        "and the data order). FVU is the mean ± the sample standard deviation over the seeds, "
        'with their min–max; the ratios are those of the means; "beats TopK" counts the '
        "seeds at which the row's FVU is below the TopK baseline's at the same seed. The other "
        'figures and the curves are means over the seeds, "train tokens/s" the median, and '
        "the step is benchmarked once per row.\n\n"
    )


def seeds_label(args) -> str:
    """The curves' y label: 'eval FVU', with several seeds '... (mean of S seeds)'."""
    return f"eval FVU (mean of {len(args.seeds)} seeds)" if multi_seed(args) else "eval FVU"


def page_png(doc: Path, name: str) -> str:
    """The name a plot takes beside the page `doc`: comparison_fvu_time.png beside
    docs/comparison.md, comparison_kinds_fvu_time.png beside docs/comparison_kinds.md."""
    return name.replace("comparison", Path(doc).stem, 1)


def write_doc(args, argv: list[str], results: list[dict], plots, shape: tuple[int, int]) -> Path:
    """Fill --template (comparison_template.md) into --doc, the PNGs copied beside it, named
    after the page (docs/comparison.md: comparison_fvu_time.png, ...)."""
    doc = Path(args.doc)
    doc.parent.mkdir(parents=True, exist_ok=True)
    names = {}
    for png in plots:
        names[png.name] = page_png(doc, png.name)
        if png.resolve() != (doc.parent / names[png.name]).resolve():
            shutil.copyfile(png, doc.parent / names[png.name])
    text = Template(Path(args.template).read_text()).substitute(
        setup=setup_text(args, *shape),
        command=f"python -m launch.experiments.compare {shlex.join(argv)}",
        seeds=seeds_text(args),
        table=markdown(results, multi_seed(args)),
        fvu_time=names.get(TIME_PNG, TIME_PNG),
        fvu_flops=names.get(FLOPS_PNG, FLOPS_PNG),
        rows=", ".join(f"`{r['name']}` ({r['kind']})" for r in results),
    )
    doc.write_text(text)
    return doc


if __name__ == "__main__":
    sys.exit(main())
