"""XLA's cost analysis with every while loop's body counted once per trip.

XLA's HloCostAnalysis counts a while loop's body (and condition) once, whatever its trip count,
so a step whose matmuls run in loops (the gather kernel's chunks, the chunked optimizer update,
the k-slot decode) reports a fraction of its FLOPs and bytes. Here each loop body is cut out of
the optimized HLO text as a module of its own (its callees kept, the body as ENTRY), costed by
XLA's same analysis, and scaled by the trip count XLA proved for it (`known_trip_count` in the
while's backend config), nested loops multiplied through:

    full(c) = once(c) - excess(c)
              + sum over loops w in c of  trips(w) x full(body(w)) - once(body(w))

once(c) is XLA's count with loop bodies once (what `compiled.cost_analysis()` reports for the
entry), excess(c) what it over-charges c's own fusions (below). A loop with no known trip
count (a dynamic bound) stays counted once and is listed in `LoopCost.unknown`, so callers
know the figure is a lower bound.

Fusions XLA over-charges: the whole of an operand it only gathers rows from, the whole of the
buffer a scatter-rooted fusion updates in place, and the whole buffer (read, converted and
written) of an in-place dynamic-update-slice wrapped in converts. Inside a loop that is a
whole weight (or its gradient, or the bfloat16 copy of every local expert) once per trip
where a trip moves k rows or one expert, so those fusions are charged the rows they move
(`_Fusion`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections.abc import Callable

from sae_jax.plan import hlo

_HEADER = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*\(")
_WHILE = re.compile(
    r"^\s*(?:ROOT\s+)?%?(\S+)\s*=.*?\swhile\(.*?condition=%?([^\s,]+),\s*body=%?([^\s,]+)"
)
_CALLEE = re.compile(r"%([\w.\-]+)")
_CONFIG = re.compile(r"backend_config=(\{.*\})\s*$")

Cost = dict[str, float]  # {'flops': ., 'bytes accessed': ., ...}


@dataclasses.dataclass(frozen=True)
class Loop:
    name: str  # the while instruction
    computation: str  # where it is
    body: str
    condition: str
    trips: int | None  # None: not known at compile time


@dataclasses.dataclass(frozen=True)
class LoopCost:
    flops: float
    bytes_accessed: float
    flops_once: float  # XLA's own figures, loop bodies once (and bytes uncorrected)
    bytes_once: float
    loops: list[dict]  # {'name', 'trips', 'flops', 'bytes_accessed': one trip's, nested scaled}
    unknown: list[str]  # loops whose trip count XLA did not prove (counted once)


@dataclasses.dataclass
class Module:
    """An HLO module's text cut into its computations (name -> lines, header first)."""

    prelude: list[str]  # what precedes the first computation, without the HloModule line
    computations: dict[str, list[str]]
    entry: str

    @classmethod
    def parse(cls, text: str) -> Module:
        lines = text.splitlines()
        prelude, comps, entry, current = [], {}, "", None
        for line in lines[1:]:  # lines[0]: 'HloModule name, ...'
            if current is None:
                m = _HEADER.match(line) if line and not line[0].isspace() else None
                if m and line.rstrip().endswith("{"):
                    current = m.group(2)
                    comps[current] = [line]
                    entry = current if m.group(1) else entry
                elif not comps:
                    prelude.append(line)
                continue
            comps[current].append(line)
            if line.startswith("}"):
                current = None
        return cls(prelude, comps, entry)

    def loops(self, computation: str) -> list[Loop]:
        out = []
        for line in self.computations[computation][1:]:
            m = _WHILE.match(line)
            if m:
                out.append(Loop(m.group(1), computation, m.group(3), m.group(2), _trips(line)))
        return out

    def callees(self, computation: str) -> set[str]:
        """Computations `computation` calls (fusions, reducers, branches, loop bodies)."""
        body = "\n".join(self.computations[computation][1:])
        return {n for n in _CALLEE.findall(body) if n in self.computations and n != computation}

    def reachable(self, computation: str, through_loops: bool = True) -> list[str]:
        """`computation` and what it calls, transitively, in the module's order (callees first).
        Without `through_loops`, loop bodies and conditions are not entered."""
        seen, stack = set(), [computation]
        while stack:
            c = stack.pop()
            if c in seen:
                continue
            seen.add(c)
            callees = self.callees(c)
            if not through_loops:
                for loop in self.loops(c):
                    callees -= {loop.body, loop.condition}
            stack.extend(callees)
        return [c for c in self.computations if c in seen]

    def as_entry(self, computation: str) -> str:
        """A module of `computation` (the new ENTRY) and its callees, as HLO text."""
        out = ["HloModule loop_body", *self.prelude]
        for name in self.reachable(computation):
            lines = list(self.computations[name])
            header = lines[0].removeprefix("ENTRY ")
            lines[0] = f"ENTRY {header}" if name == computation else header
            out += lines + [""]
        return "\n".join(out)


def _trips(line: str) -> int | None:
    m = _CONFIG.search(line)
    if not m:
        return None
    try:
        n = json.loads(m.group(1)).get("known_trip_count", {}).get("n")
    except ValueError:
        return None
    return int(n) if n is not None else None


def xla_cost(hlo_text: str) -> Cost:
    """XLA's cost analysis (this process's default backend) of a module given as HLO text."""
    import jax
    from jax._src.lib import xla_client
    from jaxlib import _hlo

    module = _hlo.hlo_module_from_text(hlo_text)
    client = jax.devices()[0].client
    return dict(xla_client._xla.hlo_module_cost_analysis(client, module))


def loop_cost(hlo_text: str, cost_of: Callable[[str], Cost] = xla_cost) -> LoopCost:
    """FLOPs and bytes accessed of a compiled module (its optimized, per-device HLO text) with
    each loop body counted once per trip. `cost_of`: the per-module cost analysis."""
    mod = Module.parse(hlo_text)
    loops, unknown = [], []

    @functools.cache
    def once(comp: str) -> tuple[float, float]:
        c = cost_of(mod.as_entry(comp))
        return float(c.get("flops", 0.0)), float(c.get("bytes accessed", 0.0))

    @functools.cache
    def full(comp: str) -> tuple[float, float]:
        flops, nbytes = once(comp)
        for c in mod.reachable(comp, through_loops=False):
            excess = _excess(mod, c)
            flops, nbytes = flops - excess[0], nbytes - excess[1]
            for loop in mod.loops(c):
                body_once, body_full = once(loop.body), full(loop.body)
                trips = loop.trips if loop.trips is not None else 1
                if loop.trips is None:
                    unknown.append(loop.name)
                loops.append({"name": loop.name, "trips": loop.trips, "flops": body_full[0],
                              "bytes_accessed": body_full[1]})  # fmt: skip
                flops += trips * body_full[0] - body_once[0]
                nbytes += trips * body_full[1] - body_once[1]
        return flops, nbytes

    flops_once, bytes_once = once(mod.entry)
    flops, nbytes = full(mod.entry)
    return LoopCost(flops, nbytes, flops_once, bytes_once, loops, sorted(set(unknown)))


def looped_collectives(hlo_text: str, num_devices: int) -> list[tuple[hlo.Collective, int]]:
    """Every collective of a compiled module with the times one step runs it: the product of
    the trip counts of the loops around it (1 outside loops; a loop of unknown trip count
    counts 1). `hlo.collectives` lists each instruction once, wherever it runs."""
    mod = Module.parse(hlo_text)
    found = []

    def visit(comp: str, trips: int, seen: frozenset[str]) -> None:
        text = "\n".join(mod.computations[comp][1:])
        found.extend((c, trips) for c in hlo.collectives(text, num_devices))
        bodies = {loop.body: loop.trips or 1 for loop in mod.loops(comp)}
        conditions = {loop.condition for loop in mod.loops(comp)}
        for callee in sorted(mod.callees(comp) - conditions - seen):
            visit(callee, trips * bodies.get(callee, 1), seen | {comp})

    visit(mod.entry, 1, frozenset())
    return found


def _operands(rest: str) -> list[str]:
    return re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])


def _excess(mod: Module, computation: str) -> tuple[float, float]:
    """(FLOPs, bytes) XLA over-charges the fusions of `computation` (see `_Fusion`)."""
    flops = nbytes = 0.0
    for _, shape, opcode, rest in hlo.instructions("\n".join(mod.computations[computation][1:])):
        m = re.search(r"calls=%?([^\s,]+)", rest)
        if opcode == "fusion" and m and m.group(1) in mod.computations:
            fusion = _Fusion(mod.computations[m.group(1)][1:], hlo.nbytes(shape))
            f, b = fusion.in_place_update_excess()
            flops, nbytes = flops + f, nbytes + b + fusion.gather_scatter_excess()
    return flops, nbytes


class _Fusion:
    """A fused computation's instructions, for what XLA's cost analysis charges it beyond the
    rows it moves:
    - an operand only gathered from is charged whole (it reads the gathered rows);
    - a root scatter into an operand, in place, is charged that operand and its whole result
      (it reads and writes the updates);
    - an in-place dynamic-update-slice wrapped in converts (convert(DUS(convert(buffer),
      update))) is charged the whole buffer, read, converted twice (1 FLOP an element each)
      and written, where it converts and writes the update."""

    _CHAIN = ("convert", "bitcast", "copy")

    def __init__(self, lines: list[str], out_bytes: int):
        self.instrs = {n: (shape, op, rest) for n, shape, op, rest in hlo.instructions(
            "\n".join(lines))}  # fmt: skip
        self.params = {n: hlo.nbytes(sh) for n, (sh, op, _) in self.instrs.items()
                       if op == "parameter"}  # fmt: skip
        self.users: dict[str, list[tuple[str, str, int]]] = {}
        for name, (_, op, rest) in self.instrs.items():
            for i, operand in enumerate(_operands(rest)):
                self.users.setdefault(operand, []).append((name, op, i))
        root = next((ln for ln in lines if ln.lstrip().startswith("ROOT")), "")
        self.root = next((n for n, *_ in hlo.instructions(root)), "")
        self.out_bytes = out_bytes

    def _bytes(self, name: str) -> int:
        return hlo.nbytes(self.instrs[name][0]) if name in self.instrs else 0

    def _elements(self, name: str) -> int:
        arrays = hlo.arrays(self.instrs[name][0]) if name in self.instrs else []
        return sum(math.prod(dims) for _, dims in arrays)

    def gather_scatter_excess(self) -> float:
        excess = 0.0
        for name, size in self.params.items():
            uses = self.users.get(name, [])
            if uses and all(op == "gather" and i == 0 for _, op, i in uses):
                excess += max(size - sum(self._bytes(u) for u, _, _ in uses), 0)
        if self.root in self.instrs and self.instrs[self.root][1] == "scatter":
            operands = _operands(self.instrs[self.root][2])
            target, updates = operands[0], self._bytes(operands[-1])
            if target in self.params and len(self.users.get(target, [])) == 1:
                excess += max(self.params[target] + self.out_bytes - 2 * updates, 0)
        return excess

    def in_place_update_excess(self) -> tuple[float, float]:
        """(FLOPs, bytes) of the convert-wrapped in-place update; (0, 0) for any other
        fusion (XLA counts a bare DUS of a parameter in place already)."""
        dus = [n for n, (_, op, _) in self.instrs.items() if op == "dynamic-update-slice"]
        if len(dus) != 1 or self.root == dus[0]:
            return 0.0, 0.0
        buffer, update = _operands(self.instrs[dus[0]][2])[:2]
        before = self._chain_up(buffer)
        after = self._chain_down(dus[0])
        if before is None or after != self.root:
            return 0.0, 0.0
        full, rows = self._elements(dus[0]), self._elements(update)
        converts = [n for n in self._chain_names(buffer) + self._chain_names(self.root, dus[0])
                    if self.instrs[n][1] == "convert"]  # fmt: skip
        flops = len(converts) * (full - rows)
        itemsizes = self.params[before] / full + self.out_bytes / full
        nbytes = self.params[before] + self.out_bytes - rows * itemsizes
        return float(max(flops, 0)), float(max(nbytes, 0))

    def _chain_up(self, name: str) -> str | None:
        """The parameter `name` is a convert/bitcast/copy chain of (None if it is not)."""
        while name in self.instrs and self.instrs[name][1] in self._CHAIN:
            name = _operands(self.instrs[name][2])[0]
        return name if name in self.params else None

    def _chain_down(self, name: str) -> str:
        """Where a single-user convert/bitcast/copy chain from `name` ends."""
        while len(users := self.users.get(name, [])) == 1 and users[0][1] in self._CHAIN:
            name = users[0][0]
        return name

    def _chain_names(self, end: str, stop: str | None = None) -> list[str]:
        """The chain's instructions up from `end` (to a parameter, or to `stop`)."""
        names = []
        while end in self.instrs and end != stop and self.instrs[end][1] in self._CHAIN:
            names.append(end)
            end = _operands(self.instrs[end][2])[0]
        return names
