"""Export a checkpoint of a run for inference (format: sae_jax/export.py), or for SAELens or
sparsify (docs/interop.md).

    python -m launch.export --workdir DIR [--step N] [--out OUT] [--max_file_bytes B]
                            [--format native|saelens|sparsify]

Reads only the parameters of the checkpoint (latest, or --step N), straight onto this
machine's devices with the experts split over them, and writes OUT (default DIR/export):
`sae.safetensors` + cfg.json when it fits one file of --max_file_bytes, otherwise sharded
files + `sae.safetensors.index.json`. With several hosts, run it on every host (the same
multi-host flags as launch.train) and each writes only its own experts. Load the result with
`sae_jax.load_pretrained(OUT)`.

--format saelens (default OUT: DIR/export_saelens) or sparsify (DIR/export_sparsify): the
checkpoint is exported natively first, to DIR/export (kept; reused when it already holds
that step) or, when DIR/export holds another step, to a temporary DIR/export.stepN.tmp, then
converted expert block by expert block (sae_jax.interop.formats) by process 0.

DIR and OUT may be URLs (gs://...): the native export is uploaded file by file with cfg.json
last (sae_jax.export); a SAELens or sparsify directory is converted in a local temporary
directory from a local copy of the native export, then uploaded the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
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
    parser.add_argument("--out", default=None, help="default: WORKDIR/export (saelens: "
                        "WORKDIR/export_saelens, sparsify: WORKDIR/export_sparsify)")  # fmt: skip
    parser.add_argument("--max_file_bytes", type=int, default=None,
                        help="largest safetensors file (default 4 GiB); smaller forces "
                        "the sharded form")  # fmt: skip
    parser.add_argument("--format", default="native",
                        help="native (default), saelens or sparsify")  # fmt: skip
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
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    kind = "" if args.format == "native" else f" as {args.format}"
    print(f"exported step {step} to {out}{kind}")
    return 0


def export_run(args: argparse.Namespace) -> tuple[Path, int]:
    """Export (and convert) the checkpoint; returns the output directory and the step."""
    from sae_jax import storage
    from sae_jax.config import SAEConfig
    from sae_jax.interop.formats import FORMATS, format_named

    fmt = format_named(args.format)
    run = storage.path(args.workdir)
    out = storage.path(args.out) if args.out else run / fmt.default_dir
    steps, record = _checkpoint_record(args)
    cfg = SAEConfig.from_record(record["model"])
    fmt.check({"num_experts": cfg.num_experts, "experts_per_token": cfg.experts_per_token,
               "shared_latents": cfg.shared_latents, "activation": cfg.activation})  # fmt: skip
    step, record, params = _restore_params(args, steps, cfg)
    if fmt is FORMATS["native"]:
        return _export_native(args, record, params, out), step
    native = run / FORMATS["native"].default_dir
    exported = _exported_step(native)
    if exported is not None and exported != step:  # keep that export; use a temporary one
        native = run / f"export.step{step}.tmp"
    if exported != step:
        _export_native(args, record, params, native)
    try:
        if jax_process_index() == 0:
            convert_to(native, args.format, out)
    finally:
        if native.name.endswith(".tmp") and jax_process_index() == 0:
            storage.remove_tree(native)
    return out, step


def convert_to(native: Path, name: str, out: Path) -> None:
    """sae_jax.interop.formats.convert, for either directory local or a URL: a URL's native
    export is read from a local copy; a URL's output is written to a local directory, then
    uploaded with its cfg.json deleted first and uploaded last (a failed upload leaves no
    directory that loads)."""
    from sae_jax import storage
    from sae_jax.interop.formats import convert

    if not storage.is_url(out):
        with storage.local_copy(native) as source:
            convert(source, name, out)
        return
    if os.fspath(native).rstrip("/") == os.fspath(out).rstrip("/"):
        raise ValueError(f"{out}: the {name} SAE cannot be written over the native export it "
                         "is converted from; give another directory")  # fmt: skip
    with storage.local_copy(native) as source, tempfile.TemporaryDirectory() as staging:
        convert(source, name, Path(staging) / "out")
        publish(Path(staging) / "out", out)


def publish(local: Path, url: Path, config: str = "cfg.json") -> None:
    """Upload the files of the local directory `local` to `url`: `config` deleted there
    first and uploaded last, so the URL holds a complete directory or none that loads."""
    from sae_jax import storage

    (url / config).unlink(missing_ok=True)
    files = [f for f in sorted(local.rglob("*")) if f.is_file() and f.name != config]
    fs, target = storage.filesystem(url)
    for f in files:
        fs.put_file(str(f), f"{target}/{f.relative_to(local).as_posix()}")
    storage.write_atomic(url / config, (local / config).read_bytes())


def _checkpoint_record(args: argparse.Namespace) -> tuple[list[int], dict]:
    """The steps to try, newest first (--step alone, or every complete checkpoint's), and the
    first one's checkpoint record."""
    from sae_jax.config import ConfigError
    from sae_jax.training.checkpoint import Checkpointer

    ckpt = Checkpointer(args.workdir, create=False)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise ConfigError(f"no complete checkpoint in {ckpt.directory}")
        if args.step is not None and args.step not in steps:
            raise ConfigError(f"no checkpoint of step {args.step} in {ckpt.directory} (steps: "
                              f"{', '.join(map(str, sorted(steps)))})")  # fmt: skip
        tried = [args.step] if args.step is not None else sorted(steps, reverse=True)
        return tried, ckpt.record(tried[0])
    finally:
        ckpt.close()


def _restore_params(args: argparse.Namespace, steps: list[int], cfg) -> tuple[int, dict, dict]:
    """(step, record, parameters) of the newest of `steps` whose files read back. A newest
    checkpoint that does not (truncated, damaged) is passed over in one line, as training
    does; with --step, or several processes (which must agree), it is a one-line error."""
    import jax

    from sae_jax.config import ConfigError
    from sae_jax.export import export_mesh
    from sae_jax.training.checkpoint import Checkpointer, UnreadableCheckpoint

    ckpt = Checkpointer(args.workdir, create=False)
    try:
        for i, step in enumerate(steps):
            try:
                return step, ckpt.record(step), ckpt.restore_params(step, export_mesh(
                    cfg.num_experts))  # fmt: skip
            except UnreadableCheckpoint as e:
                if i + 1 == len(steps) or jax.process_count() > 1:
                    raise ConfigError(f"{e}; nothing exported") from None
                print(f"{e}; exporting step {steps[i + 1]}, the next newest", flush=True)
    finally:
        ckpt.close()
    raise AssertionError("unreachable: steps is never empty")


def _export_native(args: argparse.Namespace, record: dict, params: dict, out: Path) -> Path:
    """Export restored parameters natively to out (every process: a collective)."""
    from sae_jax.config import SAEConfig
    from sae_jax.export import DEFAULT_MAX_FILE_BYTES, export_sae

    cfg = SAEConfig.from_record(record["model"])
    scale = record["data"].get("input_scale", 1.0)
    limit = args.max_file_bytes or DEFAULT_MAX_FILE_BYTES
    return export_sae(params, cfg, out, scale, record["data"], max_file_bytes=limit)


def _exported_step(native: Path) -> int | None:
    """The training step a native export directory holds (None: no complete export)."""
    try:
        step = json.loads((native / "cfg.json").read_text())["source"]["train_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) else None


def jax_process_index() -> int:
    import jax

    return jax.process_index()


if __name__ == "__main__":
    sys.exit(main())
