"""Plan a run: compile its steps from abstract shapes on simulated devices and report memory,
collectives, FLOPs and an estimated speed on named hardware. Nothing is allocated.

    python -m launch.plan --gin_file=pod.gin --devices 64 --hardware h100 [--json plan.json]

Takes the same --gin_file / --gin.NAME=VALUE bindings as launch.train. A config that lists
SAEs (SAES, for launch.train_many) is planned as a list: each SAE's plan, then the memory per
device of training them in turn on the whole mesh (what train_many runs) or in groups of
devices, one SAE per group (sae_jax/plan/layouts.py), and which of those fits.
"""

from __future__ import annotations

import argparse
import json
import sys

from launch.cli import macro_help, parse_with_bindings, simulate_cpu_devices

HARDWARE = ("h100", "tpu-v5p", "cpu")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=macro_help())  # fmt: skip
    p.add_argument("--gin_file", action="append", default=[], help="gin config (repeatable)")
    p.add_argument("--devices", type=int, default=0, help="simulate this many CPU devices")
    p.add_argument("--hardware", choices=HARDWARE, default="h100")
    p.add_argument("--d", type=int, default=None, help="input dimension (default: the data's)")
    p.add_argument("--mem_fraction", type=float, default=None,
                   help="GPU: XLA's memory pool as this fraction of the card (default: "
                   "XLA_PYTHON_CLIENT_MEM_FRACTION if set, else JAX's 0.75)")  # fmt: skip
    p.add_argument("--json", default=None, help="also write the plan as JSON here")
    p.add_argument("--hlo_out", default=None, help="write each step's optimized HLO here")
    return parse_with_bindings(p, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.devices:  # before jax is imported
        simulate_cpu_devices(args.devices, cpu_only=True)

    from sae_jax.config import ConfigError

    try:
        if args.mem_fraction is not None and not 0 < args.mem_fraction <= 1:
            raise ConfigError(f"--mem_fraction={args.mem_fraction}: must be in (0, 1]")
        plan, text = plan_config(args)
    except ConfigError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(plan, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def plan_config(args: argparse.Namespace) -> tuple[dict, str]:
    """The plan of the config (a list plan where it lists SAEs) and its text."""
    from sae_jax.gin_setup import listed_saes, parse
    from sae_jax.plan import build, hardware, layouts
    from sae_jax.plan.report import format_text, make_plan

    hw = hardware.get(args.hardware, args.mem_fraction)
    cfg, tcfg = parse(args.gin_file, args.bindings, allow_list=True)
    if listed_saes():
        plan = layouts.plan_list(list_configs(args, hw), hw, args.hlo_out)
        return plan, layouts.format_text(plan)
    cfg = build.for_hardware(cfg, hw, build.input_dim(tcfg, args.d))
    plan = make_plan(cfg, tcfg, hw, args.hlo_out)
    return plan, format_text(plan)


def list_configs(args: argparse.Namespace, hw) -> list[tuple]:
    """(name, SAEConfig for `hw`, TrainConfig) of each SAE the config lists."""
    from sae_jax.plan import build
    from sae_jax.sae_set import parse_many

    specs = parse_many(args.gin_file, args.bindings)
    return [(s.name, build.for_hardware(s.sae_cfg, hw, build.input_dim(s.tcfg, args.d)), s.tcfg)
            for s in specs]  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
