"""Write a feature browser for a trained run: static HTML pages under DIR/browser/.

    python -m launch.browse --workdir DIR [--data EVAL_DIR] [--tokens 65536]

Open DIR/browser/index.html in a browser (from the file system; nothing is fetched from the
network). Without --data it uses the run's own EVAL_DATA (synthetic data regenerated from the
run's seed). Text contexts need a dump with token ids; promoted/suppressed tokens need the
model the shards' manifest names (the `dump` extra).
"""

from __future__ import annotations

import argparse
import sys

from launch.cli import missing_workdir


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m launch.browse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--workdir", required=True, help="a training run's directory")
    p.add_argument("--data", default=None, help="activation shards (default: the run's EVAL_DATA)")
    p.add_argument("--tokens", type=int, default=65536, help="tokens to encode")
    p.add_argument("--batch_size", type=int, default=4096, help="tokens per encode batch")
    p.add_argument("--top_k", type=int, default=16, help="top contexts kept per latent")
    p.add_argument("--no_model", action="store_true",
                   help="do not load the LM (no promoted/suppressed tokens)")  # fmt: skip
    p.add_argument("--no_duplicates", action="store_true",
                   help="skip the all-pairs decoder cosine search (M^2 d work)")  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if missing_workdir(args.workdir):
        return 2
    from sae_jax.browser import build_browser
    from sae_jax.config import ConfigError

    try:
        index, _ = build_browser(args.workdir, args.data, tokens=args.tokens,
                                 batch_size=args.batch_size, top_k=args.top_k,
                                 use_model=not args.no_model,
                                 duplicates=not args.no_duplicates)  # fmt: skip
    except ConfigError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"wrote {index}  (open it in a browser: file://{index.resolve()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
