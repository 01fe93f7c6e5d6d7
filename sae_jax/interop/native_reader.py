"""Read a native export (either form of `sae_jax.export`) a piece at a time: the expert
tensors by expert range (and by latent range within one expert), never every expert at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
from safetensors import safe_open

from sae_jax.export import (
    CONFIG,
    EXPERT_TENSORS,
    INDEX,
    SHARDED_VERSION,
    SINGLE_FILE_VERSION,
    WEIGHTS,
)

DEFAULT_BLOCK_BYTES = 256 * 2**20  # expert tensor bytes read at once (at most; one latent at least)


class Block(NamedTuple):
    """Experts [start, stop) and, within each, latents [lo, hi): global latent ids
    [start * L + lo, (stop - 1) * L + hi), contiguous (a block of several experts has all L)."""

    file: str
    start: int
    stop: int
    lo: int
    hi: int


class NativeExport:
    """An export directory: `meta` (its cfg.json), `blocks()` to walk its experts part by
    part, `expert_block(name, block)` to read them and `tensor(name)` for the rest."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / CONFIG).is_file():
            raise FileNotFoundError(f"{self.path / CONFIG}: no such file; {self.path} is "
                                    "not a native export (launch.export writes one)")  # fmt: skip
        self.meta = _json(self.path / CONFIG)
        version = self.meta.get("format_version")
        if version == SINGLE_FILE_VERSION:
            names = _names(self.path / WEIGHTS)
            self.places = {n: [(WEIGHTS, 0, self.meta["num_experts"])] for n in names}
        elif version == SHARDED_VERSION:
            entries = _json(self.path / INDEX)["tensors"]
            self.places = {n: [(p["file"], *p.get("experts", (0, e["shape"][0])))
                               for p in e["parts"]] for n, e in entries.items()}  # fmt: skip
        else:
            raise ValueError(f"{self.path / CONFIG}: unsupported format_version {version}")

    def __contains__(self, name: str) -> bool:
        return name in self.places

    def blocks(self, block_bytes: int = DEFAULT_BLOCK_BYTES) -> Iterator[Block]:
        """The expert blocks in order, file by file: each at most block_bytes of w_enc + b_enc
        + w_dec (+ threshold) (whole experts where they fit, else latent ranges of one expert)."""
        lat, d = self.meta["latents_per_expert"], self.meta["d"]
        per_latent = 4 * (2 * d + 1 + ("threshold" in self))  # w_enc, w_dec, b_enc, threshold
        rows = max(1, block_bytes // per_latent)
        for file, first, stop in self.places["w_enc"]:
            if rows >= lat:
                step = rows // lat
                for a in range(first, stop, step):
                    yield Block(file, a, min(a + step, stop), 0, lat)
            else:
                for a in range(first, stop):
                    for lo in range(0, lat, rows):
                        yield Block(file, a, a + 1, lo, min(lo + rows, lat))

    def expert_block(self, name: str, block: Block) -> np.ndarray:
        """Rows of one of w_enc, b_enc, w_dec, threshold for the block: [latents, ...]
        float32, latents = (stop - start) * (hi - lo) in global id order."""
        offset = next(a for f, a, _ in self.places[name] if f == block.file)
        with _open(self.path / block.file) as f:
            part = f.get_slice(name)
            rows = part[block.start - offset : block.stop - offset, block.lo : block.hi]
        return np.asarray(rows, np.float32).reshape(-1, *rows.shape[2:])

    def tensor(self, name: str) -> np.ndarray:
        """A tensor other than the expert ones (b_dec, the router's, the shared dictionary's),
        whole."""
        (file, *_), *_ = self.places[name]
        with _open(self.path / file) as f:
            return np.asarray(f.get_tensor(name), np.float32)

    def shape(self, name: str) -> tuple[int, ...]:
        file = self.places[name][0][0]
        with _open(self.path / file) as f:
            shape = tuple(f.get_slice(name).get_shape())
        if name in EXPERT_TENSORS:
            return (self.meta["num_experts"], *shape[1:])
        return shape


def _names(path: Path) -> list[str]:
    with _open(path) as f:
        return list(f.keys())


def _open(path: Path):
    """safe_open(path), or a one-line FileNotFoundError naming the missing file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (the export is incomplete)")
    return safe_open(str(path), framework="numpy")


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (the export is incomplete)") from None
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: not a JSON object")
    return value
