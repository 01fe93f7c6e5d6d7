"""A plan: the compiled steps' measured figures beside the analytic estimate and a roofline,
as a dict (the --json output) and as text."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import jax

from sae_jax.config import SAEConfig, TrainConfig
from sae_jax.mesh import make_mesh
from sae_jax.plan import build, estimate, hlo, loops, roofline
from sae_jax.plan.hardware import COLLECTIVE_LATENCY_SOURCE, Hardware
from sae_jax.plan.suggest import suggest

GIB = 2**30


def make_plan(cfg: SAEConfig, tcfg: TrainConfig, hw: Hardware, hlo_out: Path | None = None) -> dict:
    """Compile the config's steps on the current devices and plan it for `hw` (per device).
    `hlo_out`: also write each step's optimized HLO there (<step>.hlo.txt)."""
    return plan_for(measure(cfg, tcfg, hlo_out), hw)


def measure(
    cfg: SAEConfig, tcfg: TrainConfig, hlo_out: Path | None = None, devices: list | None = None
) -> dict:
    """What does not depend on the hardware: the compiled steps' figures (the training step
    reported is the variant, with or without AuxK, that needs more memory) and the estimate.
    `devices`: the devices the mesh is laid on (default: all of them)."""
    mesh = make_mesh(tcfg.mesh_shape, devices)
    mesh_shape = (mesh.shape["data"], mesh.shape["expert"])
    shapes = estimate.Shapes.of(cfg, tcfg, mesh_shape, jax.default_backend())
    with tempfile.TemporaryDirectory() as dumps:
        compiled = build.compile_steps(cfg, tcfg, mesh, Path(dumps))
        steps = {name: _step(c, Path(dumps) / name, mesh.size) for name, c in compiled.items()}
    if hlo_out:
        Path(hlo_out).mkdir(parents=True, exist_ok=True)
        for name, c in compiled.items():
            (Path(hlo_out) / f"{name}.hlo.txt").write_text(c.as_text())
    train_name = max(("train", "train_auxk"), key=lambda n: steps[n]["memory"]["total_bytes"])
    train = steps[train_name]
    return {
        "config": _config(cfg, tcfg, mesh_shape, mesh.size),
        "dropless": _dropless(shapes),
        "backend": jax.default_backend(),
        "train_step": train_name,
        "memory": {
            "compiled": train["memory"],
            "estimate": _rename_total(estimate.memory(shapes)),
            "eval_compiled": steps["eval"]["memory"],
            "needed_bytes": max(
                train["memory"]["total_bytes"], steps["eval"]["memory"]["total_bytes"]
            ),
        },
        "largest_buffers": train["largest_buffers"],
        "collectives": train["collectives"],
        "collective_bytes": sum(c["bytes"] for c in train["collectives"]),
        "ragged_estimate": [_collective(c) for c in estimate.ragged_exchanges(shapes)],
        "kind_exchanges": [_collective(c) for c in estimate.kind_exchanges(shapes)],
        "batch_threshold": _threshold(shapes, compiled[train_name], mesh.size),
        "flops_per_token": train["cost"]["flops"] * mesh.size / tcfg.batch_size,
        "flops_per_token_xla_once": train["cost"]["flops_xla"] * mesh.size / tcfg.batch_size,
        "flops_per_token_estimate": estimate.flops_per_token(shapes, train_name == "train_auxk"),
        "replicated_expert_buffers": _replicated(compiled, shapes),
        "steps": steps,
        "_shapes": shapes,
    }


def plan_for(measured: dict, hw: Hardware) -> dict:
    """The measured figures with the roofline, the fit and a suggestion for `hw` (JSON-able)."""
    plan = {k: v for k, v in measured.items() if k not in ("_shapes", "backend")}
    plan["hardware"] = {**dataclasses.asdict(hw), "usable_bytes": hw.usable_bytes,
                        "backend": measured["backend"]}  # fmt: skip
    cost = measured["steps"][measured["train_step"]]["cost"]
    shapes, config = measured["_shapes"], measured["config"]
    collectives = [_from_dict(c) for c in measured["collectives"]]
    if hw.name != "cpu" and shapes.exchanged:
        # The real ragged_all_to_all there, not the CPU emulation's worst-case all_to_alls.
        collectives = [c for c in collectives if c.op != "all-to-all"]
        collectives += [_from_dict(c) for c in measured["ragged_estimate"]]
        real = estimate.memory(dataclasses.replace(shapes, emulated_exchange=False))["total"]
        plan["memory"] = {**plan["memory"], "estimate_on_hardware_bytes": real}
    flops, why = cost["flops"], _analytic_flops_reason(cost, shapes)
    calibration = measured["flops_per_token_estimate"].get("step0_calibration", 0.0)
    if why:
        flops = measured["flops_per_token_estimate"]["total"] * shapes.local_tokens
    elif calibration:  # XLA counts step 0's branch in every step: take out its estimate
        flops -= calibration * shapes.local_tokens
    threshold = measured.get("batch_threshold")
    if threshold:
        each = hw.latency(threshold["group_size"])
        plan["batch_threshold"] = {**threshold, "latency_s": threshold["collectives"] * each,
                                   "latency_each_s": each,
                                   "latency_source": COLLECTIVE_LATENCY_SOURCE}  # fmt: skip
    time = roofline.step_time(
        flops, cost["bytes_accessed"], collectives, hw, config["compute_dtype"],
        config["batch_size"], plan["batch_threshold"]["latency_s"] if threshold else 0.0,
    )  # fmt: skip
    time["flops_from"] = "analytic" if why else "xla"
    time["flops_note"] = why or "XLA's cost analysis, each loop body x its trip count" + (
        ", less step 0's threshold calibration (analytic)" if calibration else ""
    )
    time["collectives_from"] = (
        "hlo + ragged_all_to_all estimate" if hw.name != "cpu" and shapes.exchanged else "hlo"
    )
    fits = measured["memory"]["needed_bytes"] <= hw.usable_bytes
    plan.update(
        estimate=time,
        fits=fits,
        limited_by=time["limit"] if fits else "memory",
        suggestion=None if fits else suggest(measured["_shapes"], hw.usable_bytes),
    )
    return plan


def _analytic_flops_reason(cost: dict, s: estimate.Shapes) -> str:
    """Why the roofline takes the analytic FLOPs rather than the compiled count ('' if not)."""
    if not cost.get("loops_counted", True):
        return "XLA's count could not be scaled by the loops' trip counts (it counts each once)"
    unknown = cost.get("unknown_trip_loops")
    if s.dropless or unknown:
        return ("loops with a trip count known only at run time, counted once by XLA"
                + (" (dropless: one trip per block used)" if s.dropless else "")
                + (": " + ", ".join(unknown[:4]) if unknown else ""))  # fmt: skip
    return ""


def _step(compiled, dump_dir: Path, devices: int) -> dict:
    text = compiled.as_text()
    return {
        "memory": build.memory(compiled),
        "cost": build.cost(compiled),
        "largest_buffers": hlo.largest_buffers(dump_dir, text),
        "collectives": [_collective(c) for c in hlo.collectives(text, devices)],
    }


def _threshold(s: estimate.Shapes, compiled, devices: int) -> dict | None:
    """The batch threshold's psums (estimate.threshold_psums) with the count found in the
    compiled step: scalar int32 all-reduces run once per trip of a loop of THRESHOLD_BITS
    trips (loops.looped_collectives). None for the kinds without one."""
    expected = estimate.threshold_psums(s)
    if expected is None:
        return None
    found = sum(trips for c, trips in loops.looped_collectives(compiled.as_text(), devices)
                if c.op == "all-reduce" and c.shape == "s32[]"
                and trips == estimate.THRESHOLD_BITS)  # fmt: skip
    return {**expected, "compiled_collectives": found}


def _collective(c: hlo.Collective) -> dict:
    return {**dataclasses.asdict(c), "traffic_bytes": c.traffic_bytes()}


def _from_dict(c: dict) -> hlo.Collective:
    return hlo.Collective(**{f.name: c[f.name] for f in dataclasses.fields(hlo.Collective)})


def _replicated(compiled: dict, s: estimate.Shapes) -> list[str]:
    """Instructions holding a whole [N, L] or [N, L, d] expert tensor on one device (none
    should, unless the 'expert' axis is 1 and that is the device's own shard)."""
    if s.expert == 1:
        return []
    dims = {(s.num_experts, s.latents, s.d)}
    if s.slots != s.num_experts:  # else the [slots, L] pre-activations have this shape too
        dims.add((s.num_experts, s.latents))
    return [f"{name}: {hit}" for name, c in compiled.items()
            for hit in hlo.shape_instructions(c.as_text(), dims)]  # fmt: skip


def _dropless(s: estimate.Shapes) -> dict | None:
    """The dropless buffers' sizes per device (None for capacity dispatch)."""
    if not s.dropless:
        return None
    return {
        "block_size": s.block, "received_rows": s.received_rows, "layout_rows": s.layout_rows,
        "computed_rows": s.computed_rows, "local_tokens": s.local_tokens,
        "emulated_exchange": s.emulated_exchange and s.exchanged,
    }  # fmt: skip


def _rename_total(terms: dict) -> dict:
    out = dict(terms)
    out["total_bytes"] = out.pop("total")
    return out


def _config(cfg: SAEConfig, tcfg: TrainConfig, mesh_shape, devices: int) -> dict:
    return {
        "d": cfg.d, "num_latents": cfg.num_latents, "num_experts": cfg.num_experts, "k": cfg.k,
        "batch_size": tcfg.batch_size, "mesh_shape": list(mesh_shape), "devices": devices,
        "capacity_factor": cfg.capacity_factor,
        "compute_dtype": getattr(cfg, "compute_dtype", "float32"), "dispatch": cfg.dispatch,
        "activation": cfg.activation,
        "candidates_per_row": cfg.candidates_per_row if cfg.activation != "topk" else cfg.k,
    }  # fmt: skip


def format_text(plan: dict) -> str:
    """The plan as a few readable blocks of text."""
    c, hw, mem = plan["config"], plan["hardware"], plan["memory"]
    lines = [
        f"config: d={c['d']} NUM_LATENTS={c['num_latents']} NUM_EXPERTS={c['num_experts']} "
        f"K={c['k']} BATCH_SIZE={c['batch_size']} MESH_SHAPE={tuple(c['mesh_shape'])} on "
        f"{c['devices']} devices ({hw['backend']}), compute {c['compute_dtype']}, "
        f"{_activation(c)}",
        "",
        f"memory per device, {plan['train_step']} (measured: XLA's compiled memory analysis):",
    ]
    m = mem["compiled"]
    lines.append("  " + "  ".join(f"{k} {_size(m[k])}" for k in
                                  ("arguments", "outputs", "temporaries", "aliased")))  # fmt: skip
    lines.append(f"  total {_size(m['total_bytes'])}   (eval step: "
                 f"{_size(mem['eval_compiled']['total_bytes'])})")  # fmt: skip
    e = mem["estimate"]
    lines.append("analytic estimate: " + "  ".join(
        f"{k} {_size(v)}" for k, v in e.items() if k != "total_bytes"))  # fmt: skip
    ratio = e["total_bytes"] / max(m["total_bytes"], 1)
    lines.append(f"  total {_size(e['total_bytes'])} ({ratio:.2f} x compiled)")
    lines += _dropless_lines(plan)
    lines += ["", "largest buffers (XLA's buffer assignment; shapes sharing one allocation):"]
    lines += [f"  {_size(b['bytes'])}  {b['shapes'][:110]}" for b in plan["largest_buffers"]]
    lines += ["", "collectives per step, per device (result shape; traffic with the algorithm):"]
    for col in plan["collectives"]:
        shape, size, traffic = col["shape"][:60], _size(col["bytes"]), _size(col["traffic_bytes"])
        lines.append(f"  {col['op']:<18} {shape:<60} {size:>10} "
                     f"group {col['group_size']:>5}  traffic {traffic}")  # fmt: skip
    total_traffic = sum(col["traffic_bytes"] for col in plan["collectives"])
    lines.append(f"  total {_size(plan['collective_bytes'])}, traffic {_size(total_traffic)}")
    lines += _ragged_lines(plan)
    lines += _kind_lines(plan)
    f = plan["flops_per_token_estimate"]
    lines += [
        "",
        f"FLOPs per token: {plan['flops_per_token']:.3g} (XLA's cost analysis, each loop body "
        f"x its trip count, x devices / tokens; {plan['flops_per_token_xla_once']:.3g} with "
        f"each body once); analytic {f['total']:.3g} ("
        + ", ".join(f"{k} {v:.3g}" for k, v in f.items() if k != "total")
        + f"); compiled / analytic {plan['flops_per_token'] / max(f['total'], 1):.2f}",
        "",
        f"hardware: {hw['name']}: {hw['source']}",
    ]
    t = plan["estimate"]
    lines.append(
        f"roofline ({t['dtype']} peak {t['peak_flops'] / 1e12:.3g} TFLOP/s): compute "
        f"{_ms(t['compute_s'])}, memory {_ms(t['memory_s'])}, network {_ms(t['network_s'])} "
        f"-> step {_ms(t['step_s'])}, {t['tokens_per_sec']:.3g} tokens/s (estimate; limited "
        f"by {t['limit']})"
    )
    if t["flops_from"] != "xla" or t["collectives_from"] != "hlo":
        lines.append(f"  (FLOPs: {t['flops_from']}, {t['flops_note']}; collectives: "
                     f"{t['collectives_from']})")  # fmt: skip
    usable = (f"{_size(hw['usable_bytes'])} usable of the card's {_size(hw['memory_bytes'])}: "
              f"{hw['usable_source']}")  # fmt: skip
    if plan["fits"]:
        lines.append(f"fits: needs {_size(mem['needed_bytes'])} per device of {usable}")
    else:
        s = plan["suggestion"]
        lines.append(f"does not fit: needs {_size(mem['needed_bytes'])} per device, the "
                     f"{hw['name']} has {usable}; "
                     f"{s['line'] if s else 'no mesh found that fits'}")  # fmt: skip
    if plan["replicated_expert_buffers"]:
        lines.append("warning: whole expert tensors on one device: "
                     + "; ".join(plan["replicated_expert_buffers"][:4]))  # fmt: skip
    return "\n".join(lines)


def _dropless_lines(plan: dict) -> list[str]:
    dl = plan.get("dropless")
    if not dl:
        return []
    lines = [
        f"dropless: receive buffer R = {dl['received_rows']} rows (E x T_local, the worst "
        f"case), block layout {dl['layout_rows']} rows (B = {dl['block_size']}); rows computed "
        f"<= {dl['computed_rows']} per device for {dl['local_tokens']} tokens (balanced routing)"
    ]
    if "estimate_on_hardware_bytes" in plan["memory"]:
        lines.append(
            f"  on {plan['hardware']['name']} (real ragged_all_to_all, no emulation chunk "
            f"buffers): estimate {_size(plan['memory']['estimate_on_hardware_bytes'])}"
        )
    return lines


def _ragged_lines(plan: dict) -> list[str]:
    ragged = plan.get("ragged_estimate")
    if not ragged:
        return []
    lines = [
        "  (the all-to-alls above are XLA:CPU's emulation of ragged_all_to_all: worst-case "
        "[E, T_local, d] chunks, float32 on CPU)",
        "ragged_all_to_all on GPU/TPU, per step and device (ANALYTIC ESTIMATE: routed rows "
        "only, balanced routing):",
    ]
    for col in ragged:
        lines.append(f"  {col['op']:<18} {col['shape'][:40]:<40} {_size(col['bytes']):>10} "
                     f"group {col['group_size']:>5}  traffic {_size(col['traffic_bytes'])}  "
                     f"{col['name']}")  # fmt: skip
    others = [c for c in plan["collectives"] if c["op"] != "all-to-all"]
    traffic = sum(c["traffic_bytes"] for c in ragged + others)
    emulated = sum(c["traffic_bytes"] for c in plan["collectives"])
    lines.append(f"  with the HLO's other collectives: traffic {_size(traffic)} per step "
                 f"(emulated: {_size(emulated)})")  # fmt: skip
    return lines


def _activation(c: dict) -> str:
    kind = c.get("activation", "topk")
    if kind == "topk":
        return "ACTIVATION=topk"
    return f"ACTIVATION={kind} (k' = {c['candidates_per_row']} candidates per row)"


def _kind_lines(plan: dict) -> list[str]:
    """The batch kinds' extra exchanges and their threshold's psums (none for the others)."""
    lines = []
    exchanges = plan.get("kind_exchanges") or []
    if exchanges:
        lines.append(f"{plan['config']['activation']}'s candidates pass, besides the token "
                     "rows (sent once), ANALYTIC ESTIMATE (in the collectives above):")  # fmt: skip
        for col in exchanges:
            lines.append(f"  {col['op']:<18} {col['shape'][:48]:<48} {_size(col['bytes']):>10} "
                         f"group {col['group_size']:>5}  {col['name']}")  # fmt: skip
    t = plan.get("batch_threshold")
    if t:
        lines.append(
            f"batch threshold: {t['collectives']} x {t['op']} {t['shape']} over "
            f"{t['group_size']} devices ({t['bytes']} B in all), one per bit of the bisection "
            f"after a count over [{t['counted_rows']}, {t['candidates_per_row']}] candidates; "
            f"{t['compiled_collectives']} found in the compiled step"
        )
        if "latency_s" in t:
            lines.append(
                f"  latency {t['latency_s'] * 1e6:.0f} us a step ({t['collectives']} x "
                f"{t['latency_each_s'] * 1e6:.0f} us, an estimate: {t['latency_source']}), "
                "in the roofline's network time"
            )
    return lines


def _size(b: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{b:.0f} B"


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms"
