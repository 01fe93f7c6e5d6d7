"""Command-line pieces the entry points share (kept free of JAX imports, for fast --help)."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

GIN_PREFIX = "--gin."
BASE_GIN = Path(__file__).resolve().parent.parent / "configs" / "base.gin"
DEFAULT_GIN = BASE_GIN.parent / "default.gin"  # what a plain `launch.train` runs


def parse_with_bindings(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse argv, setting `.bindings` to the NAME=VALUE of every `--gin.NAME=VALUE` (which
    argparse does not know)."""
    args = parser.parse_args([a for a in argv if not a.startswith(GIN_PREFIX)])
    args.bindings = [a[len(GIN_PREFIX) :] for a in argv if a.startswith(GIN_PREFIX)]
    return args


def macro_help() -> str:
    """The macros with the values a plain run uses (those of configs/default.gin, which
    includes configs/base.gin) and base.gin's comments, for an --help epilog."""
    defaults, others = {}, []
    for name, value in _bindings(DEFAULT_GIN):
        if re.fullmatch(_MACRO, name):
            defaults[name] = value
        else:
            others.append(f"{name} = {value}")
    lines = []
    for name, value, comment in _macro_lines(BASE_GIN):
        if name in defaults and defaults[name] != value:
            comment = (comment + "; " if comment else "") + f"default.gin (base.gin: {value})"
            value = defaults[name]
        line = f"{name} = {value}"
        lines.append(f"  {line:<26} # {comment}" if comment else f"  {line}")
    head = (
        f"macros, with the values a plain run uses: those of {DEFAULT_GIN.name} (configs/"
        f"{DEFAULT_GIN.name},\nwhich includes configs/{BASE_GIN.name}; a --gin_file config "
        "sets its own). Override with\n--gin.NAME=VALUE; strings and paths need no quotes "
        "(--gin.TRAIN_DATA=data/x):\n"
    )
    tail = f"\n{DEFAULT_GIN.name} also binds: {', '.join(others)}" if others else ""
    return head + "\n".join(lines) + tail


_MACRO = r"[A-Z][A-Z0-9_]*"


def _macro_lines(path: Path) -> list[tuple[str, str, str]]:
    """(NAME, value, comment) of each macro defined in a gin file."""
    found = re.findall(rf"^({_MACRO})\s*=\s*(.*?)\s*(?:#\s*(.*))?$", path.read_text(), re.M)
    return [(n, v, c.strip()) for n, v, c in found]


def _bindings(path: Path) -> list[tuple[str, str]]:
    """(name, value) of each one-line binding of a gin file (macros and Class.param)."""
    found = re.findall(r"^([A-Za-z_][\w./]*)\s*=\s*(.*?)\s*(?:#.*)?$", path.read_text(), re.M)
    return list(found)


def missing_workdir(workdir: str | Path) -> bool:
    """Whether --workdir names no directory; if so, print the one-line error (exit code 2).
    A URL (gs://...) names one when any object is under it."""
    if is_url(workdir):
        if _has_objects(workdir):
            return False
        print(f"error: {workdir}: nothing there (no object under it)", file=sys.stderr)
        return True
    if Path(workdir).is_dir():
        return False
    why = "not a directory" if Path(workdir).exists() else "no such directory"
    print(f"error: {workdir}: {why}", file=sys.stderr)
    return True


def is_url(p: str | Path) -> bool:
    from sae_jax import storage

    return storage.is_url(p)


def _has_objects(url: str) -> bool:
    """Whether any object's name starts with the URL's path and a slash (a bucket: any)."""
    from sae_jax import storage

    fs, name = storage.filesystem(url)
    try:
        return bool(fs.ls(name.rstrip("/"), detail=False, refresh=True))
    except (FileNotFoundError, NotADirectoryError):
        return False


def peer_out_dir(sae_dir: str | Path) -> Path:
    """launch.eval / launch.browse --sae's default output directory: runs/peer_<name>
    (local, also for a URL's SAE: its last path component)."""
    if is_url(sae_dir):
        return Path("runs") / f"peer_{os.fspath(sae_dir).rstrip('/').rsplit('/', 1)[-1]}"
    return Path("runs") / f"peer_{Path(sae_dir).resolve().name}"


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


def simulate_cpu_devices(count: int, *, cpu_only: bool = False) -> None:
    """Make XLA:CPU present `count` devices (call before jax is imported); `cpu_only` also
    sets JAX_PLATFORMS=cpu unless it is set."""
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}"
    if cpu_only:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")


def training_exit_code(run) -> int:
    """Run `run()` (a training command's work) and return its exit code: 0; 128 + signal
    after a preemption (checkpoint saved); 2 after a ConfigError or TrainingError, said in
    one line."""
    from sae_jax.config import ConfigError
    from sae_jax.training.loop import TrainingError
    from sae_jax.training.preemption import Preempted

    try:
        run()
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        return 128 + e.signum
    except (ConfigError, TrainingError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)  # gin may append context
        return 2
    return 0


def training_parser(prog: str, doc: str, gin_file: dict) -> argparse.ArgumentParser:
    """The flags launch.train and launch.train_many share (--gin_file with the keywords
    `gin_file`, --workdir, --no_progress, --allow_changes, the multi-host ones), the macros
    listed under --help."""
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog=prog, description=doc, epilog=macro_help(),
                                     formatter_class=raw)  # fmt: skip
    parser.add_argument("--gin_file", action="append", **gin_file)
    parser.add_argument("--workdir", default=None,
                        help="output directory, local or a URL such as gs://bucket/run "
                        "(default runs/<config>)")  # fmt: skip
    parser.add_argument("--no_progress", action="store_true",
                        help="no console progress bar (none either when stdout is not a "
                        "terminal): a metrics line every LOG_EVERY steps")  # fmt: skip
    parser.add_argument(
        "--allow_changes",
        action="store_true",
        help="resume although K, LR, STEPS, ... differ from the checkpoint's",
    )
    add_multihost_args(parser)
    return parser
