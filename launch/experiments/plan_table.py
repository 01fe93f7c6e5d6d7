"""The pod-scale table of docs/pod_scale.md: launch.plan's figures for configs/pod.gin at
8, 64 and 256 devices and 2^24, 2^27 and 2^30 latents, on H100 and TPU v5p.

    python -m launch.experiments.plan_table [--devices 8,64,256] [--log2_latents 24,27,30]
        [--gin_file pod.gin] [--out plan_table.json]

Each (devices, latents) pair is compiled once, in a subprocess that simulates that many CPU
devices, and planned for both kinds of hardware. Prints a Markdown table; takes a while
(about a minute per pair on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HARDWARE = ("h100", "tpu-v5p")
GIB = 2**30


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.experiments.plan_table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--devices", default="8,64,256")
    p.add_argument("--log2_latents", default="24,27,30")
    p.add_argument("--gin_file", default="pod.gin")
    p.add_argument("--out", default="plan_table.json")
    p.add_argument("--worker", nargs=2, type=int, help=argparse.SUPPRESS)  # devices log2_latents
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        print(json.dumps(worker(args.gin_file, *args.worker)))
        return 0
    rows = []
    for devices in [int(v) for v in args.devices.split(",")]:
        for log2 in [int(v) for v in args.log2_latents.split(",")]:
            rows += run_worker(args.gin_file, devices, log2)
            print(f"done: {devices} devices, 2^{log2} latents", file=sys.stderr, flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(markdown(rows))
    return 0


def run_worker(gin_file: str, devices: int, log2: int) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, "-m", "launch.experiments.plan_table", f"--gin_file={gin_file}",
           "--worker", str(devices), str(log2)]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{devices} devices, 2^{log2}: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def worker(gin_file: str, devices: int, log2: int) -> list[dict]:
    """Compile pod.gin with NUM_LATENTS = 2^log2 on `devices` simulated devices; one row per
    kind of hardware."""
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from sae_jax.gin_setup import parse
    from sae_jax.plan import build, hardware
    from sae_jax.plan.report import measure, plan_for

    cfg, tcfg = parse([gin_file], [f"NUM_LATENTS={2**log2}"])
    # H100 and TPU v5p both resolve COMPUTE_DTYPE 'auto' to bfloat16.
    cfg = build.for_hardware(cfg, hardware.get(HARDWARE[0]), build.input_dim(tcfg))
    measured = measure(cfg, tcfg)
    return [row(plan_for(measured, hardware.get(name))) for name in HARDWARE]


def row(plan: dict) -> dict:
    m, t = plan["memory"], plan["estimate"]
    return {
        "devices": plan["config"]["devices"],
        "num_latents": plan["config"]["num_latents"],
        "mesh_shape": plan["config"]["mesh_shape"],
        "hardware": plan["hardware"]["name"],
        "compiled_bytes": m["compiled"]["total_bytes"],
        "estimate_bytes": m["estimate"]["total_bytes"],
        "eval_bytes": m["eval_compiled"]["total_bytes"],
        "collective_bytes": plan["collective_bytes"],
        "collective_traffic_bytes": sum(c["traffic_bytes"] for c in plan["collectives"]),
        "flops_per_token": plan["flops_per_token"],
        "compute_s": t["compute_s"], "memory_s": t["memory_s"], "network_s": t["network_s"],
        "tokens_per_sec": t["tokens_per_sec"],
        "fits": plan["fits"],
        "limited_by": plan["limited_by"],
        "suggestion": (plan["suggestion"] or {}).get("line"),
    }  # fmt: skip


def markdown(rows: list[dict]) -> str:
    head = ("| devices | latents | hardware | GiB/device compiled | estimate | collectives MiB "
            "(traffic) | GFLOP/token | compute / memory / network ms | tokens/s "
            "| limited by |")  # fmt: skip
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        tps = f"{r['tokens_per_sec']:.3g}" if r["fits"] else f"({r['tokens_per_sec']:.3g})"
        lines.append(
            f"| {r['devices']} | 2^{r['num_latents'].bit_length() - 1} | {r['hardware']} | "
            f"{r['compiled_bytes'] / GIB:.1f} | {r['estimate_bytes'] / GIB:.1f} | "
            f"{r['collective_bytes'] / 2**20:.0f} ({r['collective_traffic_bytes'] / 2**20:.0f}) | "
            f"{r['flops_per_token'] / 1e9:.2f} | {r['compute_s'] * 1e3:.0f} / "
            f"{r['memory_s'] * 1e3:.0f} / {r['network_s'] * 1e3:.0f} | {tps} | "
            f"{r['limited_by']} |"
        )
    misfits = [r for r in rows if not r["fits"] and r["suggestion"]]
    if misfits:
        lines.append("")
        lines += [f"- {r['devices']} devices, 2^{r['num_latents'].bit_length() - 1} latents, "
                  f"{r['hardware']}: {r['suggestion']}" for r in misfits]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
