"""Train several SAEs from one read of their data.

    python -m launch.train_many --gin_file=F [--gin.NAME=VALUE ...] [--workdir=DIR]

F lists the SAEs in its SAES macro (configs/smollm2_many.gin); `--gin.X=...` bindings apply to
every SAE, before each entry's own settings. Each SAE trains in DIR/<name>/ (checkpoints,
metrics.jsonl, export, config.gin: `python -m launch.train --gin_file=DIR/<name>/config.gin`
trains the same SAE alone), and DIR/saes.json lists them. Each distinct TRAIN_DATA is read
once, every batch going to each SAE on it in turn. The same command again resumes every SAE
from its last checkpoint.
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
    gin_file = {"required": True, "help": "gin config listing the SAEs in SAES (repeatable)"}
    parser = training_parser("python -m launch.train_many", __doc__, gin_file)
    return parse_with_bindings(parser, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from sae_jax import storage  # here, so that --help answers without loading JAX
    from sae_jax.sae_set import parse_many
    from sae_jax.training.many import train_many

    initialize_multihost(args)
    workdir = storage.path(args.workdir or Path("runs") / Path(args.gin_file[-1]).stem)

    def run() -> None:
        specs = parse_many(args.gin_file, args.bindings)
        train_many(specs, workdir, progress=not args.no_progress and sys.stdout.isatty(),
                   allow_changes=args.allow_changes)  # fmt: skip

    code = training_exit_code(run)
    if code == 0:
        print(f"next: python -m launch.eval --workdir {workdir}")
    return code


if __name__ == "__main__":
    sys.exit(main())
