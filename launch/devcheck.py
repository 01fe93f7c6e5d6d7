"""Check the hardware: what only a GPU or TPU can answer, in a few minutes.

    python -m launch.devcheck [--json devcheck.json] [--checks a,b] [--devices N]

Checks (launch/device_checks.py; rules in docs/devcheck.md): the runtime peak memory of
steps run as the loop runs them, against usable memory and the planner; the real
`ragged_all_to_all` (and the emulation) against a numpy model of the op, values and
gradients (bf16, int32, all rows to one device); whether ragged_dot lowers densely (a fail
on GPU/TPU); the dropless ragged_dot path against the block path in bfloat16; the compiled
memory against `launch.plan`'s estimate; the top-2 step; ZeRO-1; the time to compile every
AuxK bucket ahead; default.gin's bf16 eval FVU; a short `launch.bench`. What a backend
cannot run is a skip with the reason; on CPU `auxk_compile_ahead` and `default_fvu` run only
when named in --checks. Exits 1 when a check fails.
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
