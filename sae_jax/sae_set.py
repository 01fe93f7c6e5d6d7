"""A set of SAEs trained by one job (`launch.train_many`): the gin list that names them, and
the record of a trained set that `launch.eval`, `launch.browse`, `launch.plan` and the set
table read.

A config lists its SAEs in the macro SAES (configs/smollm2_many.gin):

    SAES = [
        {'name': 'w4608_k32', 'NUM_LATENTS': 4608, 'K': 32},
        {'name': 'l09_w4608', 'layer': 9, 'NUM_LATENTS': 4608, 'LR': 1e-3},
        {'name': 'every', 'layer': 'all', 'K': 32},
    ]

Each entry has a `name` (its subdirectory of the job's workdir), and may set any macro of
configs/base.gin but the job-wide ones (JOB_WIDE: they fix the shared data stream and the
step loop), and `layer`: a layer of the multi-layer dump that TRAIN_DATA (and EVAL_DATA, when
it is one too) names; a list of layers, or 'all' (every layer of the dump), makes one SAE per
layer, named <name>_lNN. An entry's settings are bound after the files and the command line's
`--gin.X=...` bindings, which apply to every SAE.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import gin

from sae_jax import storage
from sae_jax.config import FOLLOW, ConfigError
from sae_jax.data.layers import dumped_layers, layer_dir
from sae_jax.gin_setup import macros, parse
from sae_jax.training.many import SET_FILE, SAESpec

# Macros every SAE of a job shares: one data order, one step count, one mesh.
JOB_WIDE = ("SEED", "BATCH_SIZE", "STEPS", "MESH_SHAPE", "CHECKPOINT_EVERY", "LOG_EVERY",
            "EVAL_EVERY", "OUTLIER_NORM_FACTOR", "SAES")  # fmt: skip
ENTRY_KEYS = ("name", "layer")  # besides macros
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def parse_many(gin_files: Sequence[str | Path], bindings: Sequence[str]) -> list[SAESpec]:
    """The SAEs the config's SAES lists, each with its validated configs and the gin text
    that trains it alone (`launch.train --gin_file=DIR/<name>/config.gin`). One-line
    ConfigErrors for an empty list, a bad entry, a repeated name or a missing layer."""
    parse(gin_files, bindings, allow_list=True)
    entries = gin.query_parameter("%SAES")
    if not entries:
        raise ConfigError("SAES is empty: list the SAEs to train, e.g. SAES = [{'name': 'a', "
                          "'K': 32}, ...] (configs/smollm2_many.gin)")  # fmt: skip
    if not isinstance(entries, list | tuple):
        raise ConfigError(f"SAES must be a list of dicts, not {type(entries).__name__}")
    train_root = gin.query_parameter("%TRAIN_DATA")
    eval_root = gin.query_parameter("%EVAL_DATA")
    known = set(macros())
    for i, entry in enumerate(entries):
        check_entry(i, entry, known)
    specs = []
    for entry in expand_layers(entries, train_root):
        extra = entry_bindings(entry, train_root, eval_root)
        sae_cfg, tcfg = parse(gin_files, [*bindings, *extra, "SAES=[]"])
        specs.append(SAESpec(entry["name"], sae_cfg, tcfg, gin.config_str(),
                             layer=entry.get("layer"), settings=settings_of(entry)))  # fmt: skip
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"SAES: the name(s) {', '.join(twice)} appear more than once")
    return specs


def check_entry(i: int, entry: object, known: set[str]) -> None:
    """One-line errors for an entry that is not a dict with a good name and known keys."""
    if not isinstance(entry, dict):
        raise ConfigError(f"SAES[{i}] must be a dict like {{'name': 'a', 'K': 32}}, not {entry!r}")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"SAES[{i}] needs a 'name' of letters, digits, '_', '.', '-' (its "
                          f"subdirectory), not {name!r}")  # fmt: skip
    for key in entry:
        if key in JOB_WIDE:
            raise ConfigError(f"SAES[{i}] ({name}): {key} is job-wide (every SAE of the job "
                              f"shares it); set it outside SAES")  # fmt: skip
        if key not in ENTRY_KEYS and key not in known:
            raise ConfigError(f"SAES[{i}] ({name}): unknown key {key!r}: an entry sets 'name', "
                              "'layer' and macros of configs/base.gin")  # fmt: skip
    layers = entry.get("layer")
    if layers is None or layers == "all":
        return
    for layer in layers if isinstance(layers, list | tuple) and layers else [layers]:
        if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
            raise ConfigError(f"SAES[{i}] ({name}): layer={layers!r} must be a block index >= 0, "
                              "a list of them, or 'all'")  # fmt: skip


def expand_layers(entries: list[dict], train_root: str) -> list[dict]:
    """Entries with 'layer': [3, 9] or 'all' (every layer of TRAIN_DATA's multi-layer dump)
    become one entry per layer, named <name>_lNN; the others stay as they are."""
    out = []
    for entry in entries:
        layers = entry.get("layer")
        if layers != "all" and not isinstance(layers, list | tuple):
            out.append(entry)
            continue
        if layers == "all":
            root = entry.get("TRAIN_DATA", train_root)
            layers = dumped_layers(root) if root else None
            if layers is None:
                raise ConfigError(f"SAES entry {entry['name']!r} has layer 'all', but "
                                  f"TRAIN_DATA={root!r} is not a multi-layer dump (no "
                                  "layers.json)")  # fmt: skip
        out += [entry | {"name": f"{entry['name']}_l{layer:02d}", "layer": layer}
                for layer in layers]  # fmt: skip
    return out


def entry_bindings(entry: dict, train_root: str, eval_root: str) -> list[str]:
    """The entry's NAME=VALUE bindings: its macros, and TRAIN_DATA / EVAL_DATA resolved to
    its layer's directories."""
    out = [f"{k}={v!r}" for k, v in entry.items() if k not in ENTRY_KEYS]
    layer = entry.get("layer")
    if layer is None:
        return out
    root = entry.get("TRAIN_DATA", train_root)
    out.append(f"TRAIN_DATA={str(layer_path(root, layer, entry['name'], 'TRAIN_DATA'))!r}")
    eval_root = entry.get("EVAL_DATA", eval_root)
    if eval_root not in (FOLLOW, "", "synthetic"):
        out.append(f"EVAL_DATA={str(layer_path(eval_root, layer, entry['name'], 'EVAL_DATA'))!r}")
    return out


def layer_path(root: str, layer: int, name: str, macro: str) -> storage.AnyPath:
    """ROOT's directory of `layer`, or a one-line ConfigError when ROOT is no multi-layer dump
    or lacks that layer."""
    layers = dumped_layers(root) if root else None
    if layers is None:
        raise ConfigError(f"SAES entry {name!r} names layer {layer}, but {macro}={root!r} is not "
                          "a multi-layer dump (no layers.json; launch.dump_activations "
                          "--layers writes one)")  # fmt: skip
    if layer not in layers:
        raise ConfigError(f"SAES entry {name!r}: layer {layer} is not in {root} (it holds "
                          f"{', '.join(map(str, layers))})")  # fmt: skip
    return layer_dir(root, layer)


def settings_of(entry: dict) -> dict:
    """The entry's own settings (its macros), as a JSON-able dict."""
    return {k: v for k, v in entry.items() if k not in ENTRY_KEYS}


def read_sae_set(workdir: str | storage.AnyPath) -> list[dict] | None:
    """The SAEs of the train_many job at `workdir` (its saes.json: name, layer, data and
    settings of each, in the config's order), None where `workdir` is not one."""
    record = storage.path(workdir) / SET_FILE
    if not record.exists():
        return None
    return json.loads(record.read_text())["saes"]


def sae_dirs(workdir: str | storage.AnyPath) -> list[tuple[str, storage.AnyPath]]:
    """(name, directory) of every SAE of the job at `workdir`, or a one-line ConfigError."""
    saes = read_sae_set(workdir)
    if saes is None:
        raise ConfigError(f"{workdir} is not a launch.train_many workdir (no {SET_FILE})")
    return [(s["name"], storage.path(workdir) / s["name"]) for s in saes]
