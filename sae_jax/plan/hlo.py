"""Collectives and buffer shapes from XLA's optimized (per-device) HLO text and its dumps.

Shapes in the optimized HLO of an SPMD program are per device. A collective's result may be
a tuple (several arrays reduced or exchanged at once); its bytes are the sum of the elements.
Asynchronous collectives appear as `-start`/`-done` pairs: the `-done` carries the result,
the `-start` the replica groups.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
OPS = ("all-reduce", "all-gather", "all-to-all", "reduce-scatter", "collective-permute")
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?(\S+)\s*=\s*(.+?)\s+([a-z][a-z0-9-]*)\((.*)$")
_COMMENT = re.compile(r"/\*.*?\*/")


@dataclasses.dataclass(frozen=True)
class Collective:
    op: str  # e.g. 'all-to-all' (without -start/-done)
    name: str  # the HLO instruction
    shape: str  # result shape, per device, e.g. 'f32[16,3,4096] x 64'
    bytes: int  # result bytes per device (tuple elements summed)
    group_size: int  # devices taking part in one group

    def traffic_bytes(self) -> float:
        """Bytes each device sends (= receives) with the usual algorithms: ring all-reduce
        2(n-1)/n of the buffer; all-gather and all-to-all (n-1)/n of the result; reduce-scatter
        (n-1)/n of its input (n x the result); collective-permute the whole buffer; a
        ragged-all-to-all (`bytes`: the rows it sends) all but the 1/n that stay local."""
        n = self.group_size
        if n <= 1:
            return 0.0
        return self.bytes * {
            "all-reduce": 2 * (n - 1) / n, "all-gather": (n - 1) / n, "all-to-all": (n - 1) / n,
            "reduce-scatter": n - 1, "collective-permute": 1.0, "ragged-all-to-all": (n - 1) / n,
        }[self.op]  # fmt: skip


def arrays(shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """Every (dtype, dims) in an HLO shape string, tuple elements included."""
    out = []
    for dtype, dims in _ARRAY.findall(_COMMENT.sub("", shape_text)):
        if dtype in DTYPE_BYTES:
            out.append((dtype, tuple(int(v) for v in dims.split(",") if v)))
    return out


def nbytes(shape_text: str) -> int:
    return int(sum(DTYPE_BYTES[t] * math.prod(dims) for t, dims in arrays(shape_text)))


def describe(shape_text: str) -> str:
    """'f32[16,3,4096] x 64' for a tuple of 64 equal arrays, else the arrays joined by ', '."""
    parts = [f"{t}[{','.join(map(str, dims))}]" for t, dims in arrays(shape_text)]
    if len(parts) > 1 and len(set(parts)) == 1:
        return f"{parts[0]} x {len(parts)}"
    return ", ".join(parts)


def instructions(hlo_text: str):
    """(name, result shape text, opcode, rest of the line) for every HLO instruction."""
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m:
            yield m.group(1), m.group(2), m.group(3), m.group(4)


def group_size(attrs: str, num_devices: int) -> int:
    """Devices per replica group, from any of XLA's three spellings of replica_groups."""
    m = re.search(r"replica_groups=\{\{([0-9,]*)\}", attrs)
    if m:
        return len([v for v in m.group(1).split(",") if v])
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if m:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", m.group(2)))
    if "source_target_pairs" in attrs:
        return 2
    return num_devices  # replica_groups={} : every device


def collectives(hlo_text: str, num_devices: int) -> list[Collective]:
    """Every collective of a compiled program, in program order."""
    found, starts = [], {}
    for name, shape, opcode, rest in instructions(hlo_text):
        base = opcode.removesuffix("-start").removesuffix("-done")
        if base not in OPS:
            continue
        if opcode.endswith("-start"):
            starts[name] = rest
            continue
        if opcode.endswith("-done"):
            operand = re.match(r"\s*(?:\S+\s+)?%?([^\s,)]+)", rest).group(1)
            rest = starts.get(operand, rest)
        size = group_size(rest, num_devices)
        found.append(Collective(base, name, describe(shape), nbytes(shape), size))
    return found


def largest_buffers(dump_dir: Path | None, hlo_text: str, count: int = 8) -> list[dict]:
    """The largest allocations of a compiled module: from XLA:CPU's memory-usage report when
    `dump_dir` holds one (each allocation with the shapes that share it over time), else the
    largest distinct instruction shapes of the HLO."""
    reports = sorted(Path(dump_dir).glob("*memory-usage-report.txt")) if dump_dir else []
    if reports:
        return _report_buffers(reports[-1].read_text(), count)
    sizes = {}
    for _, shape, _, _ in instructions(hlo_text):
        for t, dims in arrays(shape):
            key = f"{t}[{','.join(map(str, dims))}]"
            sizes[key] = int(DTYPE_BYTES[t] * math.prod(dims))
    ranked = sorted(sizes.items(), key=lambda kv: -kv[1])[:count]
    return [{"bytes": b, "shapes": s, "source": "hlo"} for s, b in ranked]


_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
_ROW = re.compile(r"^\s*[\d.]+\w+\(\s*\d+%\);\s*([\d.]+)(\w+);\s*\d+;\s*\d+;\s*(.*)$")


def _report_buffers(text: str, count: int) -> list[dict]:
    rows = []
    for line in text.split("\n\n", 1)[0].splitlines():  # the first table: the heap
        m = _ROW.match(line)
        if m:
            size = float(m.group(1)) * _UNITS.get(m.group(2), 1)
            rows.append({"bytes": int(size), "shapes": m.group(3).strip(), "source": "xla"})
    return rows[:count]


def shape_instructions(hlo_text: str, dims_set: set[tuple[int, ...]]) -> list[str]:
    """Instructions (name: opcode shape) with an array of one of the given dims."""
    hits = []
    for name, shape, opcode, _ in instructions(hlo_text):
        if any(dims in dims_set for _, dims in arrays(shape)):
            hits.append(f"{name}: {opcode} {describe(shape)}")
    return hits
