"""The SAE formats a run exports to, one row each: how to write one from a native export
directory, and its default directory in a run directory.

| format   | files                                          | holds                          |
|----------|------------------------------------------------|--------------------------------|
| native   | cfg.json + sae.safetensors (or sharded parts)  | every SAE (sae_jax.export)     |
| saelens  | cfg.json + sae_weights.safetensors             | every SAE ("topk", "jumprelu"  |
|          |                                                | or "switch")                   |
| sparsify | cfg.json + sae.safetensors                     | TopK, N = 1, e = 1, no shared  |
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from sae_jax.export import CONFIG
from sae_jax.interop.native_reader import DEFAULT_BLOCK_BYTES, NativeExport
from sae_jax.interop.saelens_files import write_saelens
from sae_jax.interop.sparsify_files import check_sparsify, write_sparsify
from sae_jax.interop.streaming import begin_directory


class Format(NamedTuple):
    # (native export dir, out dir, block_bytes) -> out dir
    write: Callable[[Path, Path, int], Path]
    default_dir: str  # its directory in a run directory
    # a one-line ValueError, from the native cfg.json alone, for an SAE it cannot hold
    check: Callable[[dict], None]


def copy_native(native: str | Path, out: str | Path,
                block_bytes: int = DEFAULT_BLOCK_BYTES) -> Path:  # fmt: skip
    """A native export copied file by file (cfg.json last)."""
    del block_bytes  # files are copied whole, streamed by the file system
    source, out = NativeExport(native).path, Path(out)
    if out.resolve() == source.resolve():
        return out
    begin_directory(out, CONFIG)
    for path in sorted(source.iterdir()):
        if path.is_file() and path.name != CONFIG:
            shutil.copyfile(path, out / path.name)
    shutil.copyfile(source / CONFIG, out / CONFIG)
    return out


def _any(meta: dict) -> None:
    del meta


FORMATS = {
    "native": Format(copy_native, "export", _any),
    "saelens": Format(write_saelens, "export_saelens", _any),
    "sparsify": Format(write_sparsify, "export_sparsify", check_sparsify),
}


def format_named(name: str) -> Format:
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r} (known: {', '.join(FORMATS)})")
    return FORMATS[name]


def convert(native: str | Path, name: str, out: str | Path,
            block_bytes: int = DEFAULT_BLOCK_BYTES) -> Path:  # fmt: skip
    """Write the native export directory `native` as format `name` to `out`; returns out."""
    fmt = format_named(name)
    if name != "native" and Path(out).resolve() == Path(native).resolve():
        raise ValueError(f"{out}: the {name} SAE cannot be written over the native export it "
                         "is converted from; give another directory")  # fmt: skip
    return fmt.write(Path(native), Path(out), block_bytes)
