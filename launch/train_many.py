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
    add_multihost_args,
    initialize_multihost,
    macro_help,
    parse_with_bindings,
    training_exit_code,
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m launch.train_many",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=macro_help(),
    )
    parser.add_argument("--gin_file", action="append", required=True,
                        help="gin config listing the SAEs in SAES (repeatable)")  # fmt: skip
    parser.add_argument("--workdir", default=None,
                        help="output directory, local or a URL such as gs://bucket/runs "
                        "(default runs/<config>)")  # fmt: skip
    parser.add_argument(
        "--no_progress",
        action="store_true",
        help="no progress bars: a metrics line per SAE every LOG_EVERY steps",
    )
    parser.add_argument(
        "--allow_changes",
        action="store_true",
        help="resume SAEs although their settings differ from the checkpoints'",
    )
    add_multihost_args(parser)
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
