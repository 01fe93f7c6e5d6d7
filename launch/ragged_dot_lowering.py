"""Whether the backend lowers `jax.lax.ragged_dot` densely, from the compiled FLOP count.

A grouped matmul of R rows [R, a] with N groups' weights [N, a, b] is 2 R a b FLOPs done
ragged; a dense masked lowering (every row times every group's weights, the other groups'
products masked off) is N times that. XLA's cost analysis of the compiled computation
(or, where it gives none, the dot products of the optimized HLO: `hlo_dot_flops`) counts what
the lowering does, so the verdict is whichever count it is nearer to on a log
scale: "dense" above the geometric mean of the two, sqrt(N) times the ragged count. The
forward and the gradient (the forward and two products of the same size) are compiled from
abstract shapes, so nothing is allocated. XLA:CPU lowers it densely (a forward of N times
the ragged count): tests/test_devcheck.py checks that the detector says so there.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp

from sae_jax import precision

# A ragged_dot's gradient runs two more products of the forward's size (for lhs and rhs).
PRODUCTS = {"forward": 1, "gradient": 3}


def compiled_flops(compiled) -> tuple[float | None, str]:
    """(FLOPs, where from) of a compiled computation: XLA's cost analysis, else the dot
    products of its optimized HLO (`hlo_dot_flops`), else (None, 'none')."""
    flops = _cost_analysis_flops(compiled)
    if flops:
        return flops, "cost_analysis"
    flops = hlo_dot_flops(compiled.as_text())
    return (flops, "hlo") if flops else (None, "none")


def _cost_analysis_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports costs
        return None
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    if not cost:
        return None
    return float(cost.get("flops", 0.0)) or None


# An HLO instruction: %name = type[dims]{layout} opcode(operands), attributes
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = \w+\[([\d,]*)\]\S* ([\w-]+)\((.*)$")
_LHS_CONTRACTING = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")


def hlo_dot_flops(hlo: str) -> float:
    """2 x output elements x contracting size, summed over the `dot` instructions of an HLO
    module's text (each once: a loop body's dot is not multiplied by its trip count)."""
    shapes, total = {}, 0.0
    dots = []
    for line in hlo.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, dims, opcode, rest = match.groups()
        shapes[name] = [int(v) for v in dims.split(",") if v]
        if opcode == "dot":
            dots.append((shapes[name], rest))
    for out, rest in dots:
        lhs = shapes.get(re.search(r"%([\w.\-]+)", rest).group(1))
        contracting = _LHS_CONTRACTING.search(rest)
        if lhs is None or contracting is None:
            continue
        size = math.prod(lhs[int(i)] for i in contracting.group(1).split(",") if i)
        total += 2.0 * math.prod(out) * size
    return total


def classify(flops: float | None, ragged: float, groups: int) -> str:
    """'ragged', 'dense' (nearer N x `ragged` than `ragged`, log scale) or 'unknown'."""
    if flops is None:
        return "unknown"
    return "dense" if flops > ragged * math.sqrt(groups) else "ragged"


def measure(rows: int, a: int, b: int, groups: int, dtype: str = "bfloat16") -> dict:
    """The lowering of `precision.ragged_dot` (as the dropless experts run it) at these shapes:
    per computation ('forward', 'gradient') its FLOPs, the ragged count, their ratio and the
    finding; 'lowering' is 'dense' if either is, 'unknown' if a count is missing."""
    args = (
        jax.ShapeDtypeStruct((rows, a), jnp.float32),
        jax.ShapeDtypeStruct((groups, a, b), jnp.float32),
        jax.ShapeDtypeStruct((groups,), jnp.int32),
    )

    def forward(lhs, rhs, sizes):
        return precision.ragged_dot(lhs, rhs, sizes, dtype)

    def gradient(lhs, rhs, sizes):
        return jax.grad(lambda lh, rh: jnp.sum(forward(lh, rh, sizes)), argnums=(0, 1))(lhs, rhs)

    found = {}
    for name, fn in (("forward", forward), ("gradient", gradient)):
        flops, source = compiled_flops(jax.jit(fn).lower(*args).compile())
        ragged = PRODUCTS[name] * 2.0 * rows * a * b
        found[name] = {
            "flops": flops,
            "flops_from": source,
            "ragged_flops": ragged,
            "over_ragged": flops / ragged if flops else None,
            "lowering": classify(flops, ragged, groups),
        }
    kinds = {f["lowering"] for f in found.values()}
    lowering = next((k for k in ("dense", "unknown") if k in kinds), "ragged")
    return {"groups": groups, **found, "lowering": lowering}
