"""Check the hardware: what only a GPU or TPU can answer, in a few minutes.

    python -m launch.devcheck [--json devcheck.json] [--checks a,b] [--devices N]

Checks (launch/device_checks.py): the real `ragged_all_to_all` against the CPU emulation on
the same rows; the dropless ragged_dot path against the block path in bfloat16 (loss,
gradients, step time: the faster one is what `grouped_matmul='auto'` should pick there); the
capacity and dropless training steps' compiled memory against `launch.plan`'s estimate; a
short `launch.bench` (TopK and Switch tokens/s). On CPU the checks CPU can run run at small
sizes and the rest are marked skip with the reason. Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys

from launch.cli import simulate_cpu_devices


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.devcheck", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--json", default="devcheck.json", help="where the report is written")
    p.add_argument("--checks", default="", help="comma-separated check names (default: all)")
    p.add_argument("--devices", type=int, default=0, help="simulate this many CPU devices")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.devices:
        simulate_cpu_devices(args.devices)
    from launch.device_checks import CHECKS, run_checks

    names = [n for n in args.checks.split(",") if n]
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        print(f"error: unknown check(s) {unknown}: use {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    report = run_checks(names or None)
    print(f"backend: {report['backend']} ({report['device']}, {report['devices']} devices)")
    for c in report["checks"]:
        why = f"  ({c['reason']})" if "reason" in c else ""
        print(f"  {c['status']:<4}  {c['name']:<22} {c['seconds']:6.1f} s{why}")
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.json}")
    return 1 if any(c["status"] == "fail" for c in report["checks"]) else 0


if __name__ == "__main__":
    sys.exit(main())
