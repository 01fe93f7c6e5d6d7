"""Regenerate docs/pod_scale.md: run every plan the page shows and fill its template
(launch/plan_doc_template.md: the prose; every figure comes from the plans' JSON).

    python -m launch.plan_doc [--only NAME,...] [--reuse] [--cache runs/plan_doc]
        [--template launch/plan_doc_template.md] [--out docs/pod_scale.md]

Each plan (PLANS) is compiled once, in a subprocess simulating its device count, planned for
its hardware and cached as CACHE/NAME.json. --reuse keeps cached plans (only the missing ones
run); --only runs just those (the others come from the cache). A plan neither run nor cached
shows as "not planned" on the page, which lists it. All of them take about 56 minutes on 2
CPU cores (the 256-device plans ~6 minutes each, pod_1b.gin's 1024 devices ~12).
"""

from __future__ import annotations

import argparse
import json
import os
import string
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

from launch.cli import simulate_cpu_devices

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
BOTH = ("h100", "tpu-v5p")


class Plan(NamedTuple):
    gin_file: str
    devices: int
    bindings: tuple[str, ...] = ()
    hardware: tuple[str, ...] = BOTH


def _plans() -> dict[str, Plan]:
    plans = {
        "pod_256_dropless": Plan("pod.gin", 256, ("DISPATCH='dropless'",), ("h100",)),
        "pod_1b_1024": Plan("pod_1b.gin", 1024),
        "pod_64_zero1": Plan("pod.gin", 64, ("MESH_SHAPE=(2, 32)",), ("h100",)),
        "pod_256_batchtopk": Plan("pod.gin", 256, ("ACTIVATION='batchtopk'",), ("h100",)),
    }
    for devices in (8, 64, 256):
        for log2 in (24, 27, 30):
            plans[f"pod_{devices}_2e{log2}"] = Plan("pod.gin", devices, (f"NUM_LATENTS={2**log2}",))
    return plans


PLANS = _plans()
TABLE = [f"pod_{n}_2e{m}" for n in (8, 64, 256) for m in (24, 27, 30)]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.plan_doc", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--only", default="", help="comma-separated plan names (default: all)")
    p.add_argument("--reuse", action="store_true", help="keep cached plans, run the missing")
    p.add_argument("--cache", default=str(ROOT / "runs" / "plan_doc"))
    p.add_argument("--template", default=str(ROOT / "launch" / "plan_doc_template.md"))
    p.add_argument("--out", default=str(ROOT / "docs" / "pod_scale.md"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # NAME: plan it, print
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return 0
    names = [n for n in args.only.split(",") if n] or list(PLANS)
    unknown = [n for n in names if n not in PLANS]
    if unknown:
        print(f"error: unknown plan {unknown[0]!r}; plans: {', '.join(PLANS)}", file=sys.stderr)
        return 2
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = cache / f"{name}.json"
        if args.reuse and path.exists():
            continue
        print(f"planning {name} ({PLANS[name].devices} devices)...", file=sys.stderr, flush=True)
        path.write_text(json.dumps(run_worker(name)))
    plans = {n: json.loads((cache / f"{n}.json").read_text()) for n in PLANS
             if (cache / f"{n}.json").exists()}  # fmt: skip
    page = render(Path(args.template).read_text(), plans)
    Path(args.out).write_text(page)
    missing = [n for n in PLANS if n not in plans]
    print(f"wrote {args.out}" + (f" (not planned: {', '.join(missing)})" if missing else ""))
    return 0


def run_worker(name: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, "-m", "launch.plan_doc", "--worker", name]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{name}: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def worker(name: str) -> dict:
    """Compile plan `name` on its simulated devices: {hardware name: the plan as --json has it}."""
    plan = PLANS[name]
    simulate_cpu_devices(plan.devices, cpu_only=True)

    from sae_jax.gin_setup import parse
    from sae_jax.plan import build, hardware
    from sae_jax.plan.report import measure, plan_for

    cfg, tcfg = parse([plan.gin_file], list(plan.bindings))
    # H100 and TPU v5p both resolve COMPUTE_DTYPE 'auto' to bfloat16: one compile serves both.
    cfg = build.for_hardware(cfg, hardware.get(plan.hardware[0]), build.input_dim(tcfg))
    measured = measure(cfg, tcfg)
    return {hw: plan_for(measured, hardware.get(hw)) for hw in plan.hardware}


# ---- the page -------------------------------------------------------------------------------


def render(template: str, plans: dict[str, dict]) -> str:
    """The template with $name placeholders filled from the plans (see `values`)."""
    return string.Template(template).safe_substitute(values(plans))


def values(plans: dict[str, dict]) -> dict[str, str]:
    pod64, pod256 = plans.get("pod_64_2e24"), plans.get("pod_256_2e24")
    dropless = plans.get("pod_256_dropless")
    missing = [n for n in PLANS if n not in plans]
    return {
        "generated_note": _note(missing),
        "hardware_usable": _usable_lines(),
        "pod_memory_table": _pod_memory_table(
            [("64", pod64), ("256", pod256), ("64 as 2 x 32, ZeRO-1", plans.get("pod_64_zero1"))]
        ),
        "flops_table": _flops_table(plans),
        "dropless_table": _dropless_table(pod256, dropless),
        "batchtopk_table": _batchtopk_table(pod256, plans.get("pod_256_batchtopk")),
        "figures_table": _figures_table(plans),
        "pod_1b": _pod_1b(plans.get("pod_1b_1024")),
    }


NOT_PLANNED = "not planned"


def _note(missing: list[str]) -> str:
    line = ("<!-- Generated by `python -m launch.plan_doc` from launch/plan_doc_template.md: "
            "edit the template, not this page. -->")  # fmt: skip
    if missing:
        line += (f"\n\n*This regeneration left out {len(missing)} plans (shown as "
                 f"\"{NOT_PLANNED}\"): {', '.join(missing)}.*")  # fmt: skip
    return line


def _usable_lines() -> str:
    from sae_jax.plan import hardware

    return "\n".join(
        f"  - {hw.name}: {hw.usable_bytes / GIB:.1f} GiB usable of {hw.memory_bytes / GIB:.1f} "
        f"GiB ({hw.usable_source})"
        for hw in (hardware.get(n) for n in BOTH)
    )


def _gib(b: float) -> str:
    return f"{b / GIB:.2f} GiB"


def _h100(plan: dict | None) -> dict | None:
    return None if plan is None else plan.get("h100") or next(iter(plan.values()))


def _pod_memory_table(plans: list[tuple[str, dict | None]]) -> str:
    rows = ["| devices | step | arguments | temporaries | total (compiled) | estimate | eval step "
            "| fits an H100 (usable) |", "|" + "---|" * 8]  # fmt: skip
    for devices, plan in plans:
        p = _h100(plan)
        if p is None:
            rows.append(f"| {devices} | {NOT_PLANNED} |" + " |" * 6)
            continue
        m = p["memory"]
        c, e = m["compiled"], m["estimate"]["total_bytes"]
        rows.append(
            f"| {devices} | {p['train_step']} | {_gib(c['arguments'])} | {_gib(c['temporaries'])} "
            f"| {_gib(c['total_bytes'])} | {_gib(e)} ({e / c['total_bytes']:.2f}x) "
            f"| {_gib(m['eval_compiled']['total_bytes'])} | {'yes' if p['fits'] else 'no'} "
            f"({_gib(p['hardware']['usable_bytes'])}) |"
        )
    return "\n".join(rows)


def _flops_table(plans: dict[str, dict]) -> str:
    rows = ["| plan | step | compiled, loops x trips | XLA, each loop once | analytic "
            "| compiled / analytic | roofline uses |", "|" + "---|" * 7]  # fmt: skip
    for name in ("pod_64_2e24", "pod_256_2e24", "pod_256_dropless", "pod_1b_1024"):
        p = _h100(plans.get(name))
        if p is None:
            rows.append(f"| {name} | {NOT_PLANNED} |" + " |" * 5)
            continue
        f, a = p["flops_per_token"], p["flops_per_token_estimate"]["total"]
        rows.append(
            f"| {name} | {p['train_step']} | {f / 1e9:.3f} G | "
            f"{p['flops_per_token_xla_once'] / 1e9:.3f} G | {a / 1e9:.3f} G | {f / a:.2f} | "
            f"{p['estimate']['flops_from']} |"
        )
    return "\n".join(rows)


def _dropless_table(capacity: dict | None, dropless: dict | None) -> str:
    cap, drop = _h100(capacity), _h100(dropless)
    cells = [("step reported", lambda p: p["train_step"])]
    cells += [
        ("compiled total (XLA:CPU)", lambda p: _gib(p["memory"]["compiled"]["total_bytes"])),
        ("analytic estimate", lambda p: _gib(p["memory"]["estimate"]["total_bytes"])),
        ("estimate on H100/TPU (real `ragged_all_to_all`)",
         lambda p: _gib(p["memory"].get("estimate_on_hardware_bytes",
                                        p["memory"]["estimate"]["total_bytes"]))),
        ("eval step (compiled)", lambda p: _gib(p["memory"]["eval_compiled"]["total_bytes"])),
        ("collectives in the HLO (traffic)", lambda p: (
            f"{p['collective_bytes'] / 2**20:.0f} MiB "
            f"({sum(c['traffic_bytes'] for c in p['collectives']) / 2**20:.0f} MiB)")),
        ("`ragged_all_to_all` rows on GPU/TPU (analytic)", lambda p: (
            " + ".join(f"{c['bytes'] / 2**20:.1f}" for c in p["ragged_estimate"]) + " MiB"
            if p["ragged_estimate"] else "-")),
        ("FLOPs per token (analytic)",
         lambda p: f"{p['flops_per_token_estimate']['total'] / 1e9:.3f} G"),
        ("fits an H100 (usable)", lambda p: "yes" if p["fits"] else "no"),
    ]  # fmt: skip
    return _two_plans("capacity (cf 1.25)", "dropless", cells, cap, drop)


def _batchtopk_table(topk: dict | None, batch: dict | None) -> str:
    """pod.gin on 256 devices, TopK beside BatchTopK (H100)."""
    a, b = _h100(topk), _h100(batch)
    mib = 2**20

    def threshold(p: dict) -> str:
        t = p.get("batch_threshold")
        if not t:
            return "-"
        return (f"{t['collectives']} x {t['shape']} all-reduce over {t['group_size']} "
                f"({t.get('compiled_collectives', 0)} in the HLO), "
                f"{t.get('latency_s', 0.0) * 1e3:.2f} ms latency (estimate)")  # fmt: skip

    cells = [
        ("step reported", lambda p: p["train_step"]),
        ("k (TopK) / k' candidates per row", lambda p: str(p["config"].get(
            "candidates_per_row", p["config"]["k"]))),
        ("compiled total (XLA:CPU)", lambda p: _gib(p["memory"]["compiled"]["total_bytes"])),
        ("analytic estimate", _estimate_cell),
        ("all-to-alls in the HLO (bytes)", lambda p: f"{_all_to_all_bytes(p) / mib:.1f} MiB"),
        ("candidates' exchanges (analytic)", lambda p: " + ".join(
            f"{c['bytes'] / mib:.2f}" for c in p["kind_exchanges"]) + " MiB"
            if p.get("kind_exchanges") else "-"),
        ("batch threshold", threshold),
        ("FLOPs per token: compiled / analytic", lambda p: (
            f"{p['flops_per_token'] / 1e9:.3f} G / "
            f"{p['flops_per_token_estimate']['total'] / 1e9:.3f} G")),
        ("roofline: compute / memory / network", lambda p: (
            f"{p['estimate']['compute_s'] * 1e3:.1f} / {p['estimate']['memory_s'] * 1e3:.1f} / "
            f"{p['estimate']['network_s'] * 1e3:.1f} ms")),
        ("tokens/s (estimate)", lambda p: f"{p['estimate']['tokens_per_sec']:.3g}"),
        ("fits an H100 (usable)", lambda p: "yes" if p["fits"] else "no"),
    ]  # fmt: skip
    return _two_plans("topk", "batchtopk", cells, a, b)


def _two_plans(left: str, right: str, cells, a: dict | None, b: dict | None) -> str:
    """A markdown table of two plans side by side: a row per (label, cell(plan)) of cells."""
    rows = [f"| | {left} | {right} |", "|---|---|---|"]
    for label, cell in cells:
        rows.append(f"| {label} | {cell(a) if a else NOT_PLANNED} | "
                    f"{cell(b) if b else NOT_PLANNED} |")  # fmt: skip
    return "\n".join(rows)


def _estimate_cell(p: dict) -> str:
    m = p["memory"]
    ratio = m["estimate"]["total_bytes"] / m["compiled"]["total_bytes"]
    return f"{_gib(m['estimate']['total_bytes'])} ({ratio:.2f}x)"


def _all_to_all_bytes(p: dict) -> float:
    return sum(c["bytes"] for c in p["collectives"] if c["op"] == "all-to-all")


def _figures_table(plans: dict[str, dict]) -> str:
    from launch.experiments.plan_table import markdown, row

    rows = []
    for name in TABLE:
        if name in plans:
            rows += [row(p) for p in plans[name].values()]
    missing = [n for n in TABLE if n not in plans]
    text = markdown(rows) if rows else ""
    if missing:
        text += f"\n\n({NOT_PLANNED} in this regeneration: {', '.join(missing)})"
    return text


def _pod_1b(plan: dict | None) -> str:
    p = _h100(plan)
    if p is None:
        return f"({NOT_PLANNED} in this regeneration: pod_1b_1024.)"
    m, t = p["memory"], p["estimate"]
    c = m["compiled"]
    traffic = sum(col["traffic_bytes"] for col in p["collectives"]) / 2**20
    fits = {hw: q["fits"] for hw, q in plan.items()}
    return (
        f"the {p['train_step']} step needs {_gib(c['total_bytes'])} per device (arguments "
        f"{_gib(c['arguments'])}, temporaries {_gib(c['temporaries'])}), the analytic estimate "
        f"says {_gib(m['estimate']['total_bytes'])} and the eval step "
        f"{_gib(m['eval_compiled']['total_bytes'])}; it "
        + " and ".join(
            f"{'fits' if ok else 'does not fit'} the usable memory of a {hw} device"
            for hw, ok in fits.items()
        )  # fmt: skip
        + f". Collectives: {traffic:.0f} MiB of traffic per device and step. FLOPs per token "
        f"{p['flops_per_token']:.3g} (compiled, loops x trips; analytic "
        f"{p['flops_per_token_estimate']['total']:.3g}); roofline on H100 (estimate): "
        f"{t['compute_s'] * 1e3:.1f} ms of compute, {t['memory_s'] * 1e3:.0f} ms of memory "
        f"traffic, {t['network_s'] * 1e3:.1f} ms of network: ~{t['tokens_per_sec']:.2g} tokens/s, "
        f"limited by {t['limit']}"
    )


if __name__ == "__main__":
    sys.exit(main())
