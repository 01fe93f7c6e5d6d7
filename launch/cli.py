"""Command-line pieces the entry points share (kept free of JAX imports, for fast --help)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

GIN_PREFIX = "--gin."
BASE_GIN = Path(__file__).resolve().parent.parent / "configs" / "base.gin"


def parse_with_bindings(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse argv, setting `.bindings` to the NAME=VALUE of every `--gin.NAME=VALUE` (which
    argparse does not know)."""
    args = parser.parse_args([a for a in argv if not a.startswith(GIN_PREFIX)])
    args.bindings = [a[len(GIN_PREFIX) :] for a in argv if a.startswith(GIN_PREFIX)]
    return args


def macro_help() -> str:
    """The macros of configs/base.gin with their values and comments, for an --help epilog."""
    lines = re.findall(r"^([A-Z][A-Z0-9_]*\s*=.*)$", BASE_GIN.read_text(), flags=re.M)
    head = (
        "macros, with their configs/base.gin values (a config file, such as the default\n"
        "configs/default.gin, sets some of them). Override with --gin.NAME=VALUE; strings and\n"
        "paths need no quotes (--gin.TRAIN_DATA=data/x):\n"
    )
    return head + "\n".join(f"  {line}" for line in lines)


def add_multihost_args(parser: argparse.ArgumentParser) -> None:
    """--coordinator_address, --num_processes, --process_id (see sae_jax.distributed)."""
    multi = parser.add_argument_group(
        "multi-host (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)"
    )
    multi.add_argument("--coordinator_address", default=None, help="host:port, or 'auto'")
    multi.add_argument("--num_processes", type=int, default=None)
    multi.add_argument("--process_id", type=int, default=None)


def initialize_multihost(args: argparse.Namespace) -> None:
    """Join the processes named by the multi-host flags (one process when none is given)."""
    from sae_jax.distributed import initialize

    initialize(args.coordinator_address, args.num_processes, args.process_id)
