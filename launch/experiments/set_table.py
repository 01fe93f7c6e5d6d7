"""One markdown table of a launch.train_many set: every SAE with its layer, settings and results.

    python -m launch.experiments.compare --set DIR
    python -m launch.eval --workdir DIR          (evaluates every SAE, then writes the table)

Writes DIR/table.md and prints it. Columns: the SAE's name, layer (of a multi-layer dump; '-'
for a plain data directory), training data, the entry's own settings (its macros in SAES),
NUM_LATENTS, K, NUM_EXPERTS, experts per token (e), the experts' peak LR as used (LR, or the
width rule BASE_LR / sqrt(NUM_LATENTS / 2^14)); then the results: FVU (eval.json's
`fvu_dropless` when launch.eval has run, else the final `eval/fvu` of metrics.jsonl, marked
'(log)'), L0 and dead fraction (likewise), loss recovered (eval.json, when the LM was run),
the median logged training tokens/s and the training seconds (metrics.jsonl). '-': missing.
"""

from __future__ import annotations

import json
import math

from launch.experiments.compare import cell, markdown, training_record

TABLE_FILE = "table.md"
EVAL_KEYS = ("fvu_dropless", "l0", "dead_fraction", "loss_recovered")


def set_results(workdir) -> list[dict]:
    """One record per SAE of the set at `workdir` (saes.json's entry, the LR as used and the
    results), in the set's order; a one-line ConfigError where `workdir` is no set."""
    from sae_jax.sae_set import read_sae_set, sae_dirs

    dirs = dict(sae_dirs(workdir))
    return [sae_result(entry, dirs[entry["name"]]) for entry in read_sae_set(workdir)]


def lr_used(entry: dict) -> float:
    """The experts' peak LR: LR, or BASE_LR / sqrt(NUM_LATENTS / 2^14) (TrainConfig's rule,
    applied to saes.json's values without building a TrainConfig, which gin would bind)."""
    from types import SimpleNamespace

    from sae_jax.config import TrainConfig

    values = SimpleNamespace(lr=entry.get("lr"), base_lr=entry["base_lr"])
    return TrainConfig.learning_rate(values, entry["num_latents"])


def sae_result(entry: dict, directory) -> dict:
    """saes.json's entry with `lr_used` and the results of the SAE in `directory`: eval.json's
    where launch.eval wrote one, else the training log's last ones."""
    result = dict(entry, lr_used=lr_used(entry)) | log_results(directory)
    evaluated = directory / "eval.json"
    if evaluated.exists():
        found = json.loads(evaluated.read_text())
        result |= {k: found.get(k) for k in EVAL_KEYS} | {"fvu_source": "eval"}
    return result


def log_results(directory) -> dict:
    """From DIR/metrics.jsonl: the final held-out FVU and L0, the last dead fraction, the
    median logged tokens/s and the training seconds ({} without a log)."""
    from sae_jax import storage
    from sae_jax.evaluation.metric_rows import read_rows

    path = directory / "metrics.jsonl"
    if not path.exists():
        return {}
    with storage.local_copy(path) as local:
        rows = read_rows(local)
        speed = training_record(local, math.nan)
    evals = [r for r in rows if r.get("eval/fvu") is not None]
    dead = [r["dead_fraction"] for r in rows if r.get("dead_fraction") is not None]
    out = {"tokens_per_sec": speed["tokens_per_sec"], "train_seconds": speed["train_seconds"]}
    if evals:
        out |= {"fvu_dropless": evals[-1]["eval/fvu"], "l0": evals[-1].get("eval/l0"),
                "fvu_source": "log"}  # fmt: skip
    if dead:
        out["dead_fraction"] = dead[-1]
    return out


def fvu_cell(r: dict) -> str:
    """The FVU, '(log)' after it when it is the training log's, not launch.eval's."""
    text = cell(r.get("fvu_dropless"), "{:.4f}")
    return f"{text} (log)" if r.get("fvu_source") == "log" else text


def settings_cell(r: dict) -> str:
    """The entry's own settings, NAME=VALUE, in its order ('-' for none)."""
    settings = r.get("settings") or {}
    text = ", ".join(f"{k}={v}" for k, v in settings.items()) or "-"
    return text.replace("|", "\\|")


COLUMNS = [  # (header, function of a record -> cell), as compare.COLUMNS
    ("SAE", lambda r: r["name"]),
    ("layer", lambda r: "-" if r.get("layer") is None else str(r["layer"])),
    ("train data", lambda r: str(r.get("train_data")).replace("|", "\\|")),
    ("settings", settings_cell),
    ("NUM_LATENTS", lambda r: str(r["num_latents"])),
    ("K", lambda r: str(r["k"])),
    ("NUM_EXPERTS", lambda r: str(r["num_experts"])),
    ("e", lambda r: str(r["experts_per_token"])),
    ("LR", lambda r: cell(r.get("lr_used"), "{:.3g}")),
    ("FVU", fvu_cell),
    ("L0", lambda r: cell(r.get("l0"), "{:.1f}")),
    ("dead", lambda r: cell(r.get("dead_fraction"), "{:.1%}")),
    ("loss recovered", lambda r: cell(r.get("loss_recovered"), "{:.1%}")),
    ("train tokens/s", lambda r: cell(r.get("tokens_per_sec"), "{:.0f}")),
    ("training s", lambda r: cell(r.get("train_seconds"), "{:.0f}")),
]


def write_table(workdir) -> str:
    """The set's table, written to DIR/table.md; returns it."""
    from sae_jax import storage

    table = markdown(set_results(workdir), columns=COLUMNS)
    storage.write_atomic(storage.path(workdir) / TABLE_FILE, table)
    return table
