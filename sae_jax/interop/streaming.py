"""Write one safetensors file of another format's tensors from a native export, expert block
by expert block (`NativeExport.blocks`): each block's latents go straight to their place in
the output file, so memory holds one block, not every expert."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from sae_jax.interop.native_reader import NativeExport
from sae_jax.interop.safetensors_file import FILE_MODE, PiecewiseSafetensors


class Latents(NamedTuple):
    """A target tensor along the global latent axis: the experts' latents in id order, then
    the shared dictionary's (ids from NUM_LATENTS on)."""

    expert: str  # native expert tensor: w_enc, b_enc or w_dec ([N, L, ...])
    shared: str | None  # native shared-dictionary tensor ([S, ...]), or None
    latents_last: bool = False  # stored [d, D] (a column per latent), not [D, ...]


Layout = dict[str, Latents | str]  # target tensor -> its latents, or a native tensor whole


def write_layout(export: NativeExport, layout: Layout, path: str | Path, block_bytes: int,
                 metadata: dict[str, str] | None = None) -> Path:  # fmt: skip
    """Write `path` with the layout's tensors (float32) and return it."""
    meta = export.meta
    experts = meta["num_experts"] * meta["latents_per_expert"]
    shared = meta.get("shared_latents", 0)
    shapes = {}
    for target, source in layout.items():
        if isinstance(source, str):
            shapes[target] = export.shape(source)
            continue
        tail, size = export.shape(source.expert)[2:], experts + shared
        shapes[target] = (*tail, size) if source.latents_last else (size, *tail)
    with PiecewiseSafetensors(path, shapes, metadata) as out:
        for target, source in layout.items():
            if isinstance(source, str):
                out[target][...] = export.tensor(source)
            elif source.shared is not None and shared:
                _place(out[target], experts, export.tensor(source.shared), source.latents_last)
        lat = meta["latents_per_expert"]
        for block in export.blocks(block_bytes):
            first = block.start * lat + block.lo
            for target, source in layout.items():
                if isinstance(source, Latents):
                    rows = export.expert_block(source.expert, block)
                    _place(out[target], first, rows, source.latents_last)
    return Path(path)


def _place(out: np.ndarray, first: int, rows: np.ndarray, latents_last: bool) -> None:
    """Latents [first, first + len(rows)) of `out` from rows [n, ...]."""
    if latents_last:
        out[..., first : first + rows.shape[0]] = rows.T
    else:
        out[first : first + rows.shape[0]] = rows


def begin_directory(out: str | Path, config: str) -> Path:
    """Create `out` and remove its config file: until the config is written again (last, by
    `finish_directory`) the directory is not a complete SAE."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / config).unlink(missing_ok=True)
    return out


def finish_directory(out: Path, config: str, value: dict) -> Path:
    path = out / config
    path.write_text(json.dumps(value, indent=1) + "\n")
    os.chmod(path, FILE_MODE)
    return out
