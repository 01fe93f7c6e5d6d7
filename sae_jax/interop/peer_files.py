"""A peer's files without torch: its cfg.json, and its safetensors weights, bfloat16 included
(numpy has no bfloat16, so safetensors' own numpy reader refuses it; `ml_dtypes`, which JAX
ships, supplies it).

A safetensors file is an 8-byte little-endian header length, a JSON header {name: {"dtype",
"shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the tensors' bytes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}  # fmt: skip


def read_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file; floating tensors as float32 (a peer's bf16/f16/f64
    weights), others in their own dtype. A damaged file is a one-line ValueError."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (struct.error, ValueError, MemoryError, OverflowError):
        raise ValueError(f"{path}: not a safetensors file (unreadable header)") from None
    header.pop("__metadata__", None)
    raw = np.memmap(path, np.uint8, mode="r")  # each tensor is copied once, as float32
    tensors = {}
    for name, entry in header.items():
        dtype = DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has dtype {entry['dtype']}, which sae_jax "
                             f"does not read (it reads {', '.join(DTYPES)})")  # fmt: skip
        begin, end = (8 + size + offset for offset in entry["data_offsets"])
        count = int(np.prod(entry["shape"]))
        if end - begin != count * np.dtype(dtype).itemsize or end > len(raw):
            raise ValueError(f"{path}: tensor {name} does not fit its shape {entry['shape']} "
                             "(a truncated or damaged file)")  # fmt: skip
        a = raw[begin:end].view(dtype).reshape(entry["shape"])
        floating = np.issubdtype(a.dtype, np.floating) or a.dtype == ml_dtypes.bfloat16
        tensors[name] = np.array(a, np.float32 if floating else a.dtype)
    return tensors


def read_config(path: Path, required: tuple[str, ...] = ()) -> dict:
    """A cfg.json as a dict holding the `required` keys, or a one-line ValueError naming it."""
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    missing = [key for key in required if key not in cfg]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)} (the peer's config keys)")
    return cfg
