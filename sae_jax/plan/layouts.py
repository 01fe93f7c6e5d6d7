"""A list of SAEs trained by one job (`launch.train_many`), planned together: each SAE's own
plan, and the memory per device of two ways to lay the SAEs on the mesh.

in turn  what train_many runs: every SAE on the whole mesh, the parameters, optimizer state
         and counters of all of them resident on every device at once, their steps run one
         after another on each batch. Per device: the sum over the SAEs of their resident
         state + the largest transient memory of one SAE's step.
groups   the mesh split into G groups of devices / G devices, one SAE per group (G = the
         number of SAEs, or the largest divisor of the device count below it: a group then
         trains its SAEs one after another). Each SAE is planned on a group's devices: the
         'data' axis shrinks (an expert axis given as -1 takes the group's devices), the
         expert axis must still divide NUM_EXPERTS. Per device: the largest SAE's plan.
         Today each group is a `launch.train --gin_file=DIR/<name>/config.gin` job.

Resident and transient. Estimate: the terms parameters, optimizer_state and counters
(`estimate.memory`) are resident; batch, gradients and other temporaries are transient.
Compiled: resident = the bytes per device of the training state's shards
(`build.state_bytes`, the training step's arguments less its batch); transient = the plan's
needed bytes (the larger of the train and eval steps' compiled totals) less it: the batch, the
metrics and XLA's temporaries. So the in-turn compiled figure is the compiled peak of the SAE
with the largest transient plus the other SAEs' resident state (XLA compiles each SAE's step
on its own; while it runs, the others' state is only held).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax

from sae_jax import precision
from sae_jax.config import ConfigError, SAEConfig, TrainConfig
from sae_jax.mesh import make_mesh, resolve_shape
from sae_jax.model.switch import check_mesh
from sae_jax.plan import build, estimate, report
from sae_jax.plan.hardware import Hardware

RESIDENT_TERMS = ("parameters", "optimizer_state", "counters")
KINDS = ("compiled", "estimate")


def plan_list(
    saes: list[tuple[str, SAEConfig, TrainConfig]], hw: Hardware, hlo_out: Path | None = None
) -> dict:
    """The list plan (JSON-able): 'saes' (each SAE's name, plan and resident / transient
    bytes on the whole mesh), 'in_turn', 'groups' (each with total bytes per device, compiled
    and estimated, and whether it fits `hw`) and 'recommended' ('in_turn', 'groups' or None).
    One-line ConfigErrors name the SAE."""
    full = [_entry(name, cfg, tcfg, hw, None, hlo_out) for name, cfg, tcfg in saes]
    devices = full[0]["plan"]["config"]["devices"]
    lp = {"devices": devices, "saes": full, "in_turn": in_turn(full),
          "groups": group_layout(saes, full, devices, hw)}  # fmt: skip
    return judge(lp, hw)


def judge(lp: dict, hw: Hardware) -> dict:
    """The list plan with each layout's fit on `hw` (its compiled bytes per device against
    the usable memory) and the recommended layout: in turn where it fits, else groups where
    they fit, else None."""
    usable = hw.usable_bytes
    lp["hardware"] = {"name": hw.name, "usable_bytes": usable, "memory_bytes": hw.memory_bytes}
    for layout in (lp["in_turn"], lp["groups"]):
        layout["fits"] = "error" not in layout and layout["compiled"]["total_bytes"] <= usable
    lp["recommended"] = next(
        (name for name in ("in_turn", "groups") if lp[name]["fits"]), None
    )  # fmt: skip
    return lp


def _entry(name, cfg, tcfg, hw, devices, hlo_out) -> dict:
    """One SAE's plan on `devices` (None: all) with its resident and transient bytes."""
    try:
        measured = report.measure(cfg, tcfg, hlo_out and Path(hlo_out) / name, devices)
        state = build.state_bytes(cfg, tcfg, make_mesh(tcfg.mesh_shape, devices))
    except ConfigError as e:
        raise ConfigError(f"SAE {name}: {str(e).splitlines()[0]}") from None
    plan = report.plan_for(measured, hw)
    return {"name": name, "plan": plan, **split(plan, state)}


def split(plan: dict, state_bytes: int) -> dict:
    """{'resident': {kind: bytes}, 'transient': {kind: bytes}} of a single SAE's plan, kind
    'compiled' (state_bytes; the needed bytes less it) and 'estimate' (RESIDENT_TERMS)."""
    mem = plan["memory"]
    est = mem["estimate"]
    resident = {"compiled": state_bytes, "estimate": sum(est[t] for t in RESIDENT_TERMS)}
    totals = {"compiled": mem["needed_bytes"], "estimate": est["total_bytes"]}
    return {"resident": resident, "transient": {k: totals[k] - resident[k] for k in KINDS}}


def in_turn(entries: list[dict]) -> dict:
    """Per device: the SAEs' resident bytes summed + the largest transient, each kind."""
    out = {}
    for kind in KINDS:
        big = max(entries, key=lambda e: e["transient"][kind])
        resident = sum(e["resident"][kind] for e in entries)
        out[kind] = {"resident_bytes": resident, "transient_bytes": big["transient"][kind],
                     "transient_of": big["name"],
                     "total_bytes": resident + big["transient"][kind]}  # fmt: skip
    return out


def in_turn_estimate(
    saes: list[tuple[SAEConfig, TrainConfig]], mesh_shape: tuple[int, int], backend: str = ""
) -> dict:
    """The analytic estimate of `in_turn` (no compile): {'resident_bytes', 'transient_bytes',
    'total_bytes'} per device of (cfg, tcfg) pairs (d set) on one resolved mesh; `backend`:
    as estimate.Shapes.of (default: JAX's)."""
    backend = backend or jax.default_backend()
    resident, transient = [], []
    for cfg, tcfg in saes:
        cfg = dataclasses.replace(cfg, compute_dtype=precision.resolve(cfg.compute_dtype))
        terms = estimate.memory(estimate.Shapes.of(cfg, tcfg, mesh_shape, backend))
        resident.append(sum(terms[t] for t in RESIDENT_TERMS))
        transient.append(terms["total"] - resident[-1])
    return {"resident_bytes": sum(resident), "transient_bytes": max(transient),
            "total_bytes": sum(resident) + max(transient)}  # fmt: skip


def check_in_turn_fits(
    saes: list[tuple[SAEConfig, TrainConfig]], mesh_shape: tuple[int, int], memory_bytes: float
) -> None:
    """A one-line ConfigError where the SAEs, trained in turn on this mesh (launch.train_many),
    need more than `memory_bytes` per device by the analytic estimate (suggest.check_fits's
    judgement for a list)."""
    need = in_turn_estimate(saes, mesh_shape)
    if need["total_bytes"] <= memory_bytes:
        return
    gib = 2**30
    raise ConfigError(
        f"{len(saes)} SAEs in turn on MESH_SHAPE={tuple(mesh_shape)} need about "
        f"{need['total_bytes'] / gib:.1f} GiB per device (estimate: their states "
        f"{need['resident_bytes'] / gib:.1f} GiB + the largest step's "
        f"{need['transient_bytes'] / gib:.1f} GiB), the devices have {memory_bytes / gib:.1f} "
        "GiB; see python -m launch.plan on the config (groups of devices, or fewer SAEs a job)"
    )


def group_count(saes: int, devices: int) -> int:
    """G: the number of SAEs, or the largest divisor of the device count below it."""
    return max(g for g in range(1, min(saes, devices) + 1) if devices % g == 0)


def group_mesh(mesh_shape: tuple[int, int], devices: int, groups: int) -> tuple[int, int]:
    """The ('data', 'expert') mesh of one of `groups` groups of a `devices`-device mesh: an
    axis given as -1 takes what the group's devices leave; else the 'data' axis shrinks,
    which must split into the groups. One-line ConfigErrors."""
    size = devices // groups
    if -1 in tuple(mesh_shape):
        return resolve_shape(mesh_shape, size)
    data, expert = resolve_shape(mesh_shape, devices)
    if data % groups:
        raise ConfigError(
            f"MESH_SHAPE={tuple(mesh_shape)}: groups of {size} devices cannot hold the expert "
            f"axis of {expert} (its data axis of {data} does not split into {groups} groups); "
            "give the expert axis as -1 to plan groups"
        )
    return data // groups, expert


def group_layout(saes: list, full: list[dict], devices: int, hw: Hardware) -> dict:
    """Each SAE on its own group of devices / G devices: per device the largest plan. An
    'error' (and no figures) where the groups' mesh cannot hold an SAE."""
    g = group_count(len(saes), devices)
    out = {"groups": g, "group_devices": devices // g, "saes_per_group": -(-len(saes) // g)}
    if g == 1:
        entries, shape = full, full[0]["plan"]["config"]["mesh_shape"]
    else:
        try:
            shape = group_mesh(saes[0][2].mesh_shape, devices, g)
            for name, cfg, tcfg in saes:
                _check(name, cfg, shape, tcfg.batch_size)
        except ConfigError as e:
            return {**out, "error": str(e).splitlines()[0]}
        used = jax.devices()[: devices // g]
        entries = [
            _entry(name, cfg, dataclasses.replace(tcfg, mesh_shape=shape), hw, used, None)
            for name, cfg, tcfg in saes
        ]  # fmt: skip
    out["mesh_shape"] = list(shape)
    for kind in KINDS:
        big = max(entries, key=lambda e, k=kind: total(e, k))
        out[kind] = {"total_bytes": total(big, kind), "of": big["name"]}
    out["saes"] = entries
    return out


def total(entry: dict, kind: str) -> int:
    """An SAE's bytes per device alone: the needed (compiled) or estimated total."""
    return entry["resident"][kind] + entry["transient"][kind]


def _check(name: str, cfg: SAEConfig, shape: tuple[int, int], batch: int) -> None:
    try:
        check_mesh(cfg, {"data": shape[0], "expert": shape[1]}, batch)
    except ConfigError as e:
        raise ConfigError(f"groups of {shape[0] * shape[1]} devices as MESH_SHAPE={shape}: "
                          f"SAE {name}: {e}") from None  # fmt: skip


def format_text(lp: dict) -> str:
    """Each SAE's plan as launch.plan prints one, then the layouts and the recommendation."""
    lines = []
    for i, e in enumerate(lp["saes"]):
        lines += [f"=== SAE {e['name']} ({i + 1} of {len(lp['saes'])}) ===",
                  report.format_text(e["plan"]), ""]  # fmt: skip
    return "\n".join(lines + summary_lines(lp))


def summary_lines(lp: dict) -> list[str]:
    """The list's table of resident / transient bytes, the layouts and the verdict."""
    hw, n = lp["hardware"], len(lp["saes"])
    lines = [f"=== {n} SAEs on {lp['devices']} devices, {hw['name']}: memory per device "
             "(compiled / estimate) ===",
             f"  {'SAE':<20} {'resident':>21} {'transient':>21} {'total':>21}"]  # fmt: skip
    for e in lp["saes"]:
        alone = {k: total(e, k) for k in KINDS}
        lines.append(f"  {e['name']:<20} {_pair(e['resident'])} {_pair(e['transient'])} "
                     f"{_pair(alone)}".rstrip())  # fmt: skip
    t, usable = lp["in_turn"], _size(hw["usable_bytes"])
    c, est = t["compiled"], t["estimate"]
    lines += [
        f"in turn (launch.train_many: every SAE on all {lp['devices']} devices, stepped one "
        "after another on each batch):",
        f"  {_size(c['total_bytes'])} = resident {_size(c['resident_bytes'])} (sum of {n}) + "
        f"transient {_size(c['transient_bytes'])} (max: {c['transient_of']}); estimate "
        f"{_size(est['total_bytes'])} = {_size(est['resident_bytes'])} + "
        f"{_size(est['transient_bytes'])} ({est['transient_of']})  -> {_fits(t)} ({usable})",
    ]
    lines += _group_lines(lp["groups"], n, lp["devices"], usable)
    return lines + [_verdict(lp)]


def _group_lines(g: dict, n: int, devices: int, usable: str) -> list[str]:
    why = (
        "one per SAE"
        if g["groups"] == n
        else f"the largest divisor of {devices} devices "
        f"not above {n} SAEs: a group trains {g['saes_per_group']} one after another"
    )
    head = f"groups ({g['groups']} groups of {g['group_devices']} devices, {why}):"
    if "error" in g:
        return [head, f"  not possible: {g['error']}"]
    c, est = g["compiled"], g["estimate"]
    lines = [head, f"  MESH_SHAPE={tuple(g['mesh_shape'])} per group: {_size(c['total_bytes'])} "
             f"(max: {c['of']}); estimate {_size(est['total_bytes'])} ({est['of']})  -> "
             f"{_fits(g)} ({usable})"]  # fmt: skip
    if g["groups"] > 1:
        lines += [f"    {e['name']:<20} {_size(e['plan']['memory']['needed_bytes']):>10} / "
                  f"{_size(e['plan']['memory']['estimate']['total_bytes'])}"
                  for e in g["saes"]]  # fmt: skip
    return lines


def _verdict(lp: dict) -> str:
    if lp["recommended"] == "in_turn":
        return (
            "recommended: in turn (it fits; one read of the data, no idle groups): "
            "python -m launch.train_many --gin_file=... --workdir=DIR"
        )
    if lp["recommended"] == "groups":
        g = lp["groups"]
        return (f"recommended: groups (in turn does not fit): one python -m launch.train "
                f"--gin_file=DIR/<name>/config.gin --gin.MESH_SHAPE=\"{tuple(g['mesh_shape'])}\" "
                f"job per group of {g['group_devices']} devices (config.gin: what "
                "launch.train_many writes for each SAE)")  # fmt: skip
    return "recommended: neither layout fits; see each SAE's suggestion above"


def _pair(d: dict) -> str:
    return f"{_size(d['compiled']):>10} / {_size(d['estimate']):<10}"


def _fits(layout: dict) -> str:
    return "fits" if layout["fits"] else "does not fit"


def _size(b: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{b:.0f} B"
