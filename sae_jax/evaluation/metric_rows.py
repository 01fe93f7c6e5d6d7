"""Reading a run's metrics.jsonl: one JSON row per logged step, the last possibly cut off by
a crash mid-write (it and anything after it are left out, never a JSONDecodeError)."""

from __future__ import annotations

import json
from pathlib import Path


def read_rows(path: str | Path) -> list[dict]:
    """The complete rows of metrics.jsonl at `path`, in order; [] when it does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            break  # a line cut off by a crash
        if not isinstance(row, dict):
            break
        rows.append(row)
    return rows
