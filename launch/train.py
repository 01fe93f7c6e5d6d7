"""Train a Switch SAE.

    python -m launch.train [--gin_file=F ...] [--gin.NAME=VALUE ...] [--workdir=DIR]

With no arguments it runs configs/default.gin (synthetic data with planted features). The same
command again resumes DIR from its last checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launch.cli import (
    initialize_multihost,
    parse_with_bindings,
    training_exit_code,
    training_parser,
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    gin_file = {"default": [], "help": "gin config (repeatable)"}
    parser = training_parser("python -m launch.train", __doc__, gin_file)
    parser.add_argument("--wandb", action="store_true",
                        help="also log to Weights & Biases (needs `pip install wandb`; "
                        "WANDB_MODE=offline works with no network)")  # fmt: skip
    return parse_with_bindings(parser, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # Imported here so that --help answers without loading JAX.
    import gin

    from sae_jax import storage
    from sae_jax.gin_setup import DEFAULT_CONFIG, parse
    from sae_jax.training.loop import train

    initialize_multihost(args)

    def run() -> None:
        sae_cfg, train_cfg = parse(args.gin_file, args.bindings)
        stem = Path(args.gin_file[-1]).stem if args.gin_file else DEFAULT_CONFIG.stem
        workdir = storage.path(args.workdir or Path("runs") / stem)  # local, or a URL
        train(
            sae_cfg, train_cfg, workdir, progress=not args.no_progress and sys.stdout.isatty(),
            config_text=gin.config_str(), allow_changes=args.allow_changes, wandb=args.wandb,
        )  # fmt: skip

    return training_exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
