"""Export the latest checkpoint of a run as sae.safetensors + cfg.json.

    python -m launch.export --workdir DIR [--step N] [--out OUT]

OUT defaults to DIR/export. Load it with `sae_jax.load_pretrained(OUT)`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--step", type=int, default=None, help="default: the latest")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    from sae_jax.checkpoint import Checkpointer
    from sae_jax.config import SAEConfig
    from sae_jax.export import export_sae

    ckpt = Checkpointer(args.workdir)
    step = args.step if args.step is not None else ckpt.latest_step()
    if step is None:
        print(f"error: no complete checkpoint in {ckpt.directory}", file=sys.stderr)
        return 2
    record = ckpt.record(step)
    cfg = SAEConfig(**record["model"])
    params = ckpt.restore_params(step)
    out = args.out or Path(args.workdir) / "export"
    scale = record["data"].get("input_scale", 1.0)
    print(f"exported step {step} to {export_sae(params, cfg, out, scale, record['data'])}")
    ckpt.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
