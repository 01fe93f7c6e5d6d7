"""A multi-layer dump: one shard directory per layer under one root, with the same tokens.

    ROOT/layers.json      {"layers": [3, 9, 15], ...}
    ROOT/layer_03/        a shard directory like any other (manifest.json, shards)

A layer's directory is read like a one-layer dump; `layer_dir` names it.
"""

from __future__ import annotations

import json

from sae_jax import storage
from sae_jax.data.shards import DataError

LAYERS_FILE = "layers.json"


def layer_dir(root: str | storage.AnyPath, layer: int) -> storage.AnyPath:
    """ROOT/layer_NN: the shard directory of `layer` in a multi-layer dump (two digits at
    least, so that a listing sorts by layer)."""
    return storage.path(root) / f"layer_{layer:02d}"


def dumped_layers(root: str | storage.AnyPath) -> list[int] | None:
    """The layers a multi-layer dump at `root` holds (its layers.json), None where `root` is
    not one."""
    index = storage.path(root) / LAYERS_FILE
    if not index.exists():
        return None
    try:
        return [int(layer) for layer in json.loads(index.read_text())["layers"]]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{index}: not a layers file ({e})") from None
