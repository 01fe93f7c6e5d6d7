"""Command-line pieces the entry points share (kept free of JAX imports, for fast --help)."""

from __future__ import annotations

import argparse

GIN_PREFIX = "--gin."


def parse_with_bindings(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse argv, setting `.bindings` to the NAME=VALUE of every `--gin.NAME=VALUE` (which
    argparse does not know)."""
    args = parser.parse_args([a for a in argv if not a.startswith(GIN_PREFIX)])
    args.bindings = [a[len(GIN_PREFIX) :] for a in argv if a.startswith(GIN_PREFIX)]
    return args
