"""Check a directory of [tokens, d] .npy arrays and write its manifest.json.

    python -m launch.index_shards DIR [--dtype bfloat16]

DIR may be a URL (gs://bucket/acts): the files are then read by range requests, not downloaded.

Every file's header, size, d and dtype are checked, and sampled rows for NaN/inf; the
manifest then records token counts and norm statistics (including massive-activation
outliers). Pass --dtype bfloat16 for bfloat16 arrays, which numpy saves as raw 2-byte records.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.index_shards",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("directory")
    parser.add_argument("--dtype", default=None, choices=("float16", "bfloat16", "float32"))
    args = parser.parse_args(argv)

    from sae_jax.data.shards import DataError, build_manifest, write_manifest

    try:
        manifest = build_manifest(args.directory, args.dtype, previous_source(args.directory))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = write_manifest(args.directory, manifest)
    stats = manifest["stats"]
    print(
        f"{path}: {manifest['total_tokens']} tokens in {len(manifest['shards'])} shards, "
        f"d={manifest['d']}, {manifest['dtype']}; median norm {stats['median_norm']:.4g}, "
        f"{stats['outlier_fraction']:.3%} of tokens above {stats['outlier_factor']:g}x it"
    )
    return 0


def previous_source(directory: str) -> dict | None:
    """The `source` of a manifest already there (re-indexing keeps the dumper's provenance)."""
    from sae_jax import storage

    path = storage.path(directory) / "manifest.json"
    try:
        return json.loads(path.read_text()).get("source") if path.exists() else None
    except (ValueError, AttributeError):
        return None


if __name__ == "__main__":
    sys.exit(main())
