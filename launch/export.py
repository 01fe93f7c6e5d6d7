"""Export a checkpoint of a run for inference (format: sae_jax/export.py).

    python -m launch.export --workdir DIR [--step N] [--out OUT] [--max_file_bytes B]

Reads only the parameters of the checkpoint (latest, or --step N), straight onto this
machine's devices with the experts split over them, and writes OUT (default DIR/export):
`sae.safetensors` + cfg.json when it fits one file of --max_file_bytes, otherwise sharded
files + `sae.safetensors.index.json`. With several hosts, run it on every host (the same
multi-host flags as launch.train) and each writes only its own experts. Load the result with
`sae_jax.load_pretrained(OUT)`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launch.cli import add_multihost_args, initialize_multihost, missing_workdir


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m launch.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--step", type=int, default=None, help="default: the latest")
    parser.add_argument("--out", default=None, help="default: WORKDIR/export")
    parser.add_argument("--max_file_bytes", type=int, default=None,
                        help="largest safetensors file (default 4 GiB); smaller forces "
                        "the sharded form")  # fmt: skip
    add_multihost_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if missing_workdir(args.workdir):
        return 2
    from sae_jax.config import ConfigError

    initialize_multihost(args)
    try:
        out, step = export_run(args)
    except ConfigError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"exported step {step} to {out}")
    return 0


def export_run(args: argparse.Namespace) -> tuple[Path, int]:
    from sae_jax.config import ConfigError, SAEConfig
    from sae_jax.export import DEFAULT_MAX_FILE_BYTES, export_mesh, export_sae
    from sae_jax.training.checkpoint import Checkpointer

    ckpt = Checkpointer(args.workdir, create=False)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise ConfigError(f"no complete checkpoint in {ckpt.directory}")
        step = max(steps) if args.step is None else args.step
        if step not in steps:
            raise ConfigError(f"no checkpoint of step {step} in {ckpt.directory} (steps: "
                              f"{', '.join(map(str, sorted(steps)))})")  # fmt: skip
        record = ckpt.record(step)
        cfg = SAEConfig.from_record(record["model"])
        params = ckpt.restore_params(step, export_mesh(cfg.num_experts))
    finally:
        ckpt.close()
    out = Path(args.out) if args.out else Path(args.workdir) / "export"
    scale = record["data"].get("input_scale", 1.0)
    limit = args.max_file_bytes or DEFAULT_MAX_FILE_BYTES
    return export_sae(params, cfg, out, scale, record["data"], max_file_bytes=limit), step


if __name__ == "__main__":
    sys.exit(main())
