"""A float32 safetensors file written piece by piece: the header first, then each tensor's
data filled in place through a memory map, so no tensor need be whole in memory.

The layout is the safetensors library's own (8-byte little-endian header length, compact
JSON header with `__metadata__` first and the tensors in name order, padded with spaces to
a multiple of 8, then the tensors' bytes in the same order), so the file is byte for byte
what `safetensors.numpy.save_file` writes for the same tensors.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np

FILE_MODE = 0o644
ALIGN = 8


class PiecewiseSafetensors:
    """Open with the tensors' shapes; fill `file[name][...]` (a float32 memmap view of that
    tensor) piece by piece; `close()` flushes and renames the file into place (until then it
    is `path` + ".partial"). Used as a context manager it closes on success and removes the
    partial file on an error."""

    def __init__(self, path: str | Path, shapes: dict[str, tuple[int, ...]],
                 metadata: dict[str, str] | None = None):  # fmt: skip
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        header, offsets = _header(shapes, metadata)
        size = len(header) + max([end for _, end in offsets.values()], default=0)
        with open(self.partial, "wb") as f:
            f.write(header)
            f.truncate(size)
        data = size - len(header)
        self._data = None if not data else np.memmap(self.partial, np.uint8, "r+",
                                                     offset=len(header), shape=(data,))  # fmt: skip
        self._views = {
            name: self._data[start:end].view(np.float32).reshape(shapes[name])
            if end > start else np.zeros(shapes[name], np.float32)
            for name, (start, end) in offsets.items()
        }  # fmt: skip

    def __getitem__(self, name: str) -> np.ndarray:
        return self._views[name]

    def close(self) -> Path:
        if self._data is not None:
            self._data.flush()
        self._views, self._data = {}, None
        os.chmod(self.partial, FILE_MODE)
        os.replace(self.partial, self.path)
        return self.path

    def __enter__(self) -> PiecewiseSafetensors:
        return self

    def __exit__(self, kind, value, trace) -> None:
        if kind is None:
            self.close()
        else:
            self._views, self._data = {}, None
            self.partial.unlink(missing_ok=True)


def _header(shapes: dict[str, tuple[int, ...]], metadata: dict[str, str] | None):
    """The header bytes (length prefix included) and each tensor's [start, end) in the data."""
    entries: dict[str, object] = {} if metadata is None else {"__metadata__": metadata}
    offsets, position = {}, 0
    for name in sorted(shapes):
        end = position + 4 * math.prod(shapes[name])
        entries[name] = {"dtype": "F32", "shape": list(shapes[name]),
                         "data_offsets": [position, end]}  # fmt: skip
        offsets[name], position = (position, end), end
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % ALIGN)
    return struct.pack("<Q", len(text)) + text, offsets
