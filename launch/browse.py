"""Write a feature browser for a trained run: static HTML pages under DIR/browser/.

    python -m launch.browse --workdir DIR [--data EVAL_DIR] [--tokens 65536]
    python -m launch.browse --sae SAE_DIR --data EVAL_DIR [--out OUT]

--sae browses any directory sae_jax.load_pretrained reads (our export, a peer's SAELens or
sparsify SAE: docs/peer_saes.md) on the shards of --data, writing OUT/browser/ (OUT default:
runs/peer_<name of SAE_DIR>, where launch.eval --sae writes eval.json).

Open DIR/browser/index.html in a browser (from the file system; nothing is fetched from the
network). Without --data it uses the run's own EVAL_DATA (synthetic data regenerated from the
run's seed). Text contexts need a dump with token ids; promoted/suppressed tokens need the
model the shards' manifest names (the `dump` extra).

DIR may be a launch.train_many set (it holds saes.json): each SAE's browser is then written as
for DIR/<name> alone (DIR/<name>/browser/), and DIR/browser/index.html lists the SAEs, with
their layer and settings, each name linking to its browser.

DIR (and OUT) may be a URL (gs://...): the pages are written locally, then uploaded to
DIR/browser/ (its old pages deleted first); copy that to a local directory to open it.
"""

from __future__ import annotations

import argparse
import sys

from launch.cli import is_url, missing_workdir, peer_out_dir


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m launch.browse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--workdir", help="a training run's directory")
    which.add_argument("--sae", help="an SAE directory (ours, SAELens or sparsify); needs --data")
    p.add_argument(
        "--out",
        default=None,
        help="with --sae: output directory (default: runs/peer_<SAE dir name>)",
    )
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
    if args.workdir is not None and missing_workdir(args.workdir):
        return 2
    if args.sae is not None and args.data is None:
        print("error: --sae needs --data SHARDS_DIR (activation shards to browse)",
              file=sys.stderr)  # fmt: skip
        return 2
    from launch.eval import is_set
    from sae_jax.config import ConfigError

    if args.workdir is not None and is_set(args.workdir):
        return browse_set(args)
    out = args.workdir or args.out or peer_out_dir(args.sae)
    try:
        index = browse_one(args, out)
    except ConfigError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print_written(index)
    return 0


def browse_one(args, out):
    """build_browser with the command line's options into out/browser/; its index.html."""
    from sae_jax.browser import build_browser

    index, _ = build_browser(out, args.data, sae=args.sae, tokens=args.tokens,
                             batch_size=args.batch_size, top_k=args.top_k,
                             use_model=not args.no_model,
                             duplicates=not args.no_duplicates)  # fmt: skip
    return index


def browse_set(args) -> int:
    """Each SAE's browser of the set in args.workdir (DIR/<name>/browser/, as --workdir
    DIR/<name> alone), then the set's index page DIR/browser/index.html linking them. A
    failure is one line (exit code 1 at the end); the rest still run."""
    from sae_jax.browser.set_index import write_set_index
    from sae_jax.sae_set import read_sae_set, sae_dirs

    failed = {}
    for name, directory in sae_dirs(args.workdir):
        print(f"== {name}: {directory}", flush=True)
        try:
            print_written(browse_one(args, directory))
        except Exception as e:  # noqa: BLE001 - one line each, the rest go on
            failed[name] = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"error: {name}: {failed[name]}", file=sys.stderr, flush=True)
    print_written(write_set_index(args.workdir, read_sae_set(args.workdir), failed))
    if failed:
        print(f"error: {len(failed)} of the set's SAEs failed: {', '.join(failed)}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


def print_written(index) -> None:
    if is_url(index):
        print(f"wrote {index}  (copy browser/ to a local directory to open it)")
    else:
        print(f"wrote {index}  (open it in a browser: file://{index.resolve()})")


if __name__ == "__main__":
    sys.exit(main())
