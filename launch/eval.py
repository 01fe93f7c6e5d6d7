"""Evaluate a trained SAE on held-out activations; write DIR/eval.json and plots.

    python -m launch.eval --workdir DIR [--data EVAL_DIR] [--tokens 65536] [--no_lm]
    python -m launch.eval --sae SAE_DIR --data EVAL_DIR [--out OUT]

DIR may be a launch.train_many set (it holds saes.json): every SAE of it is then evaluated in
turn as DIR/<name> alone would be, with the same options (a failure is one line, and the rest
still run), and the set's table (launch/experiments/set_table.py) is printed and written to
DIR/table.md.

--sae evaluates any directory sae_jax.load_pretrained reads (our export, a peer's SAELens or
sparsify SAE: docs/peer_saes.md) on the shards of --data, with no capacity limit, and writes
OUT/eval.json and the plots (OUT default: runs/peer_<name of SAE_DIR>).

Uses DIR/export (written at the end of training, or by `python -m launch.export`), so the
SAE runs on raw activations with no capacity limit (hence `fvu_dropless`, where the training
log's `eval/fvu` is at the evaluation capacity factor); `drop_fraction` is what the dispatch
at that factor would drop (0 for a DISPATCH='dropless' run). Without --data it evaluates the
run's own EVAL_DATA (synthetic data is regenerated from the run's seed). When the shards'
manifest names a model the dumper can load, the reconstruction is also spliced into that
model on the held-out text (loss recovered; needs the `dump` extra).

DIR (and OUT) may be a URL (gs://...): the export, config and checkpoints are read from it,
eval.json and the plots written into it.

eval.json's `saebench` holds SAEBench's core metrics under SAEBench's names and sae_lens.evals'
definitions, on the kept (non-outlier) tokens (docs/metrics.md); the table prints them last.
"""

from __future__ import annotations

import argparse
import json
import sys
from itertools import islice
from typing import TYPE_CHECKING

from launch.cli import missing_workdir, peer_out_dir

if TYPE_CHECKING:
    from sae_jax.storage import AnyPath

TABLE = [
    ("tokens", "{:.0f}"), ("mse", "{:.4g}"), ("fvu_dropless", "{:.4f}"),
    ("fvu_dropless_with_outliers", "{:.4f}"), ("outlier_fraction", "{:.4%}"), ("l0", "{:.2f}"),
    ("dead_fraction", "{:.2%}"), ("dense_fraction", "{:.2%}"), ("router_entropy", "{:.3f}"),
    ("router_entropy_max", "{:.3f}"), ("drop_fraction", "{:.2%}"),
    ("feature_duplication", "{:.2%}"), ("feature_recovery", "{:.2%}"), ("ce_clean", "{:.4f}"),
    ("ce_sae", "{:.4f}"), ("ce_zero", "{:.4f}"), ("delta_ce", "{:.4f}"),
    ("loss_recovered", "{:.2%}"), ("ce_sae_with_outliers", "{:.4f}"),
    ("ce_zero_with_outliers", "{:.4f}"), ("delta_ce_with_outliers", "{:.4f}"),
    ("loss_recovered_with_outliers", "{:.2%}"),
]  # fmt: skip


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m launch.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--workdir", help="a training run's directory")
    which.add_argument("--sae", help="an SAE directory (ours, SAELens or sparsify); needs --data")
    p.add_argument("--data", default=None,
                   help="held-out activation shards (default: the run's EVAL_DATA)")  # fmt: skip
    p.add_argument(
        "--out",
        default=None,
        help="with --sae: output directory (default: runs/peer_<SAE dir name>)",
    )
    p.add_argument("--tokens", type=int, default=65536, help="activation tokens to evaluate")
    p.add_argument("--batch_size", type=int, default=4096, help="tokens per dispatch batch")
    p.add_argument("--capacity_factor", type=float, default=None,
                   help="default: the run's EVAL_CAPACITY_FACTOR")  # fmt: skip
    p.add_argument("--outlier_norm_factor", type=float, default=10.0)
    p.add_argument("--lm_sequences", type=int, default=32, help="held-out sequences for the LM")
    p.add_argument("--no_lm", action="store_true", help="skip loss recovered")
    p.add_argument("--no_plots", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.workdir is not None and missing_workdir(args.workdir):
        return 2
    if args.sae is not None and args.data is None:
        print("error: --sae needs --data SHARDS_DIR (activation shards to evaluate on)",
              file=sys.stderr)  # fmt: skip
        return 2
    from sae_jax.config import ConfigError

    if args.workdir is not None and is_set(args.workdir):
        return evaluate_set(args)
    try:
        result = evaluate_run(args)
    except ConfigError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print_result(args, result)
    return 0


def is_set(workdir: str) -> bool:
    """Whether `workdir` holds a launch.train_many set (its saes.json)."""
    from sae_jax import storage
    from sae_jax.training.many import SET_FILE

    return (storage.path(workdir) / SET_FILE).exists()


def evaluate_set(args) -> int:
    """Every SAE of the set in args.workdir in turn, as `--workdir DIR/<name>` with the same
    options; a failure is one line (and exit code 1 at the end), the rest still run. Then the
    set's table (launch/experiments/set_table.py), printed and written to DIR/table.md."""
    import argparse

    from launch.experiments.set_table import TABLE_FILE, write_table
    from sae_jax.sae_set import sae_dirs

    failed = []
    for name, directory in sae_dirs(args.workdir):
        print(f"== {name}: {directory}", flush=True)
        one = argparse.Namespace(**{**vars(args), "workdir": str(directory)})
        try:
            print_result(one, evaluate_run(one))
        except Exception as e:  # noqa: BLE001 - one line each, the rest go on
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"error: {name}: {why}", file=sys.stderr, flush=True)
            failed.append(name)
    print(write_table(args.workdir))
    print(f"wrote {args.workdir.rstrip('/')}/{TABLE_FILE}")
    if failed:
        print(f"error: {len(failed)} of the set's SAEs failed: {', '.join(failed)}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


def print_result(args, result: dict) -> None:
    """The metrics table, SAEBench's metrics and what was written."""
    for name, fmt in TABLE:
        if name in result:
            print(f"{name:>28}  {fmt.format(result[name])}")
    print(f"{'expert_load':>28}  " + " ".join(f"{v:.3f}" for v in result["expert_load"]))
    print_saebench(result["saebench"])
    print(f"wrote {output_dir(args) / 'eval.json'}")
    for path in result.get("plots", []):
        print(f"wrote {path}")


def print_saebench(metrics: dict) -> None:
    """SAEBench's metrics, in SAEBench's order, under a heading that says whose they are."""
    from sae_jax.evaluation.saebench import NAMES

    print("SAEBench core metrics (sae_lens.evals definitions; eval.json's saebench):")
    for name in NAMES:
        if metrics.get(name) is not None:
            print(f"{name:>32}  {metrics[name]:.6g}")


def evaluate_run(args) -> dict:
    from sae_jax.config import ConfigError
    from sae_jax.data import ActivationData
    from sae_jax.evaluation.analysis import EvalAccumulator, decoder_feature_recovery
    from sae_jax.run_data import load_run_sae, load_sae, open_eval_data
    from sae_jax.training.metrics import to_python

    workdir = output_dir(args)
    if args.sae is not None:  # any SAE directory; no capacity limit unless asked for
        sae, capacity = load_sae(args.sae), args.capacity_factor
    else:
        sae = load_run_sae(workdir)
        capacity = args.capacity_factor or _eval_capacity(workdir)
    data = open_eval_data(workdir, args.data, args.outlier_norm_factor)
    real = isinstance(data, ActivationData)
    name = str(data.directory) if real else "synthetic (the run's EVAL_DATA, from its seed)"
    if data.d != sae.cfg.d:
        raise ConfigError(f"{name}: d = {data.d}, but the SAE has d = {sae.cfg.d}")
    batch = min(args.batch_size, args.tokens)
    acc = EvalAccumulator(sae, capacity, sae.meta.get("input_scale", 1.0))
    batches = data.batches("eval", slice(0, batch), batch)
    for b in islice(batches, max(1, min(args.tokens // batch, data.max_batches(batch)))):
        acc.add(b.x / data.input_scale, b.keep)
    batches.close()
    result = acc.finish()
    frequency = result.pop("latent_frequency")
    if real and not args.no_lm:
        lm = _loss_recovered(args, data, sae)
        result["saebench"] |= lm.pop("saebench", {})
        result |= lm
    if not real:  # no outliers in synthetic data; the planted features are known
        for key in ("fvu_dropless_with_outliers", "outlier_fraction"):
            result.pop(key)
        result["feature_recovery"] = decoder_feature_recovery(data.features, sae.params["w_dec"])
    result = {k: to_python(v) for k, v in result.items() if k != "saebench"} | {
        "saebench": {k: to_python(v) for k, v in result["saebench"].items()},
        "data": name,
    }
    _write_result(workdir, result)
    if not args.no_plots:
        result["plots"] = [str(p) for p in write_plots(workdir, result, frequency)]
    return result


def _write_result(workdir: AnyPath, result: dict) -> None:
    """workdir/eval.json (a URL's: one object write)."""
    from sae_jax import storage

    text = json.dumps(result, indent=1) + "\n"
    if storage.is_url(workdir):
        storage.write_atomic(workdir / "eval.json", text)
        return
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "eval.json").write_text(text)


def write_plots(workdir: AnyPath, result: dict, frequency) -> list[AnyPath]:
    """The PNG plots in workdir (a URL's: drawn in a local directory, then uploaded); returns
    where they are."""
    from sae_jax import storage
    from sae_jax.evaluation import plots

    metrics = workdir / "metrics.jsonl"
    names = ["expert_load.png", "latent_frequency.png"]
    with storage.local_dir(workdir) as out:
        if metrics.exists():
            with storage.local_copy(metrics) as rows:
                plots.training_curves(rows, out / "training_curves.png")
            names.insert(0, "training_curves.png")
        plots.expert_load(result["expert_load"], out / "expert_load.png")
        plots.firing_histogram(frequency, result["tokens"], out / "latent_frequency.png")
    return [workdir / name for name in names]


def output_dir(args) -> AnyPath:
    """Where eval.json and the plots go: the run's directory, or for --sae, --out (a local
    Path, or an epath.Path for a URL)."""
    from sae_jax import storage

    if args.sae is None:
        return storage.path(args.workdir)
    return storage.path(args.out) if args.out else peer_out_dir(args.sae)


def _eval_capacity(workdir: AnyPath) -> float | None:
    """The run's evaluation capacity factor, from its latest checkpoint record; None for a
    dropless run (no token is ever dropped)."""
    from sae_jax.config import SAEConfig
    from sae_jax.training.checkpoint import Checkpointer

    ckpt = Checkpointer(str(workdir), create=False)
    try:
        step = ckpt.latest_step()
        if step is None:
            return SAEConfig.eval_capacity_factor
        model = ckpt.record(step)["model"]
        if model.get("dispatch") == "dropless":
            return None
        return float(model["eval_capacity_factor"])
    finally:
        ckpt.close()


def _loss_recovered(args, data, sae) -> dict:
    """LM losses on the held-out text of the shards' manifest, or {} with a note why not."""
    source = data.manifest.get("source", {})
    if not source.get("model") or not source.get("text_files"):
        print("loss recovered: skipped (the manifest names no model and text)")
        return {}
    try:
        from sae_jax.data.dumper import find_blocks, load_model, token_sequences
        from sae_jax.evaluation.lm_loss import loss_recovered

        model, tokenizer, _ = load_model(source["model"], "cpu")
    except (ImportError, ValueError, OSError) as e:
        print(f"loss recovered: skipped ({str(e).splitlines()[0]})")
        return {}
    import numpy as np

    seqs = list(islice(token_sequences(tokenizer, source["text_files"], source["seq_len"]),
                       args.lm_sequences))  # fmt: skip
    limit = data.max_norm

    def inliers(h: np.ndarray) -> np.ndarray:
        return np.linalg.norm(h, axis=1) <= limit

    block = find_blocks(model)[source["layer"]]
    return loss_recovered(model, block, seqs, lambda h: np.asarray(sae(h)), inliers)


if __name__ == "__main__":
    sys.exit(main())
