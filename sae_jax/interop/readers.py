"""Which peer's directory is this, and how to read it: one row per directory kind.

`sae_jax.load_pretrained` reads our own export itself (cfg.json with a format_version) and
consults this table for anything else; each row detects its kind from the files and reads it
into (native tensors of `sae_jax.export`, meta with the keys of our cfg.json plus
"activation" and "format").
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from sae_jax.interop.saelens_read import is_saelens_dir, read_saelens
from sae_jax.interop.sparsify_read import hookpoint_dirs, is_sparsify_dir, read_sparsify

Read = Callable[[Path], tuple[dict[str, np.ndarray], dict]]


class Reader(NamedTuple):
    detect: Callable[[Path], bool]  # from the directory's files
    read: Read


def _read_hookpoints(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """A sparsify trainer's save: its one hookpoint's SAE, or a one-line error listing them."""
    found = hookpoint_dirs(path)
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ValueError(f"{path} holds sparsify SAEs for {len(found)} hookpoints ({names}); "
                         f"load one of them, e.g. {found[0]}")  # fmt: skip
    return read_sparsify(found[0])


READERS: dict[str, Reader] = {
    "saelens": Reader(is_saelens_dir, read_saelens),
    "sparsify": Reader(is_sparsify_dir, read_sparsify),
    "sparsify hookpoints": Reader(lambda p: bool(hookpoint_dirs(p)), _read_hookpoints),
}


def find_kind(path: str | Path) -> str | None:
    """The kind (a key of READERS) of a peer's SAE directory, or None."""
    path = Path(path)
    return next((kind for kind, row in READERS.items() if row.detect(path)), None)


def read_peer(path: str | Path) -> tuple[dict[str, np.ndarray], dict] | None:
    """(native tensors, meta) of a peer's SAE directory, or None if it is none of READERS."""
    kind = find_kind(path)
    return None if kind is None else READERS[kind].read(Path(path))
