"""Train a Switch SAE.

    python -m launch.train [--gin_file=F ...] [--gin.NAME=VALUE ...] [--workdir=DIR]

With no arguments it runs configs/default.gin (synthetic data with planted features).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launch.cli import parse_with_bindings
from sae_jax.config import ConfigError


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m launch.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--gin_file", action="append", default=[], help="gin config (repeatable)")
    parser.add_argument("--workdir", default=None, help="output directory (default runs/<config>)")
    parser.add_argument("--no_progress", action="store_true", help="no console progress bar")
    multi = parser.add_argument_group(
        "multi-host (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)"
    )
    multi.add_argument("--coordinator_address", default=None, help="host:port, or 'auto'")
    multi.add_argument("--num_processes", type=int, default=None)
    multi.add_argument("--process_id", type=int, default=None)
    return parse_with_bindings(parser, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # Imported here so that --help answers without loading JAX.
    import gin

    from sae_jax.distributed import initialize
    from sae_jax.gin_setup import DEFAULT_CONFIG, parse
    from sae_jax.preemption import Preempted
    from sae_jax.trainer import TrainingError, train

    initialize(args.coordinator_address, args.num_processes, args.process_id)
    try:
        sae_cfg, train_cfg = parse(args.gin_file, args.bindings)
        stem = Path(args.gin_file[-1]).stem if args.gin_file else DEFAULT_CONFIG.stem
        workdir = Path(args.workdir or Path("runs") / stem)
        train(
            sae_cfg, train_cfg, workdir, progress=not args.no_progress,
            config_text=gin.config_str(),
        )  # fmt: skip
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        return 128 + e.signum
    except (ConfigError, TrainingError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)  # gin may append context
        return 2
    print(f"metrics: {workdir / 'metrics.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
