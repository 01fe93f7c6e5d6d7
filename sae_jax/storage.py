"""Every path the project reads or writes: a local path, or an object-store URL (gs://, s3://,
any fsspec protocol whose package is installed: gcsfs for gs://, s3fs for s3://).

`path(p)` gives a pathlib.Path for a local path and an etils `epath.Path` for a URL (the one
orbax writes checkpoints through); both have pathlib's methods. What an object store does not
have is here: an atomic replace (`write_atomic`: one object write is atomic), moving a tree,
and reading byte ranges of an array without downloading the file (`open_array`).

An emulator (fake-gcs-server, gcp-storage-emulator) is used by setting STORAGE_EMULATOR_HOST,
as for gcsfs and google-cloud-storage; `use_emulator` points tensorstore (orbax's arrays) at
it too and turns off gcsfs's bucket-type probe, which an emulator answers only after minutes
of gRPC time-outs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from etils import epath

AnyPath = Path | epath.Path
MERGE_GAP_BYTES = 1 << 20  # rows closer than this are fetched in one range request
EMULATOR_TOKEN = "emulator"  # tensorstore's bearer token for an emulator (it checks none)


def is_url(p: str | os.PathLike) -> bool:
    """Whether `p` names an object in a store (scheme://...) rather than a local file."""
    text = os.fspath(p)
    return "://" in text and not text.startswith("file://")


def path(p: str | os.PathLike) -> AnyPath:
    """A pathlib.Path for a local path, an epath.Path for a URL."""
    if isinstance(p, epath.Path) and is_url(p):
        return p
    return epath.Path(os.fspath(p)) if is_url(p) else Path(p)


def filesystem(p: str | os.PathLike):
    """(fsspec filesystem, path within it) for a URL."""
    import fsspec

    return fsspec.core.url_to_fs(os.fspath(p))


def make_bucket(url: str) -> None:
    """Create the bucket of a URL (gs://name/...); an existing one is no error."""
    fs, name = filesystem(url)
    bucket = name.split("/")[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)


def write_atomic(p: str | os.PathLike, data: bytes | str) -> None:
    """Write a whole file so that a reader sees the old content or the new, never a part: a
    local file through a temporary file and os.replace, an object in one write (which an
    object store commits atomically)."""
    raw = data.encode() if isinstance(data, str) else data
    if is_url(p):
        path(p).write_bytes(raw)
        return
    target = Path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(raw)
    os.replace(tmp, target)


def remove_tree(p: str | os.PathLike) -> None:
    """Delete a directory (or prefix) and everything under it; nothing there is no error."""
    if is_url(p):
        target = path(p)
        if target.exists():
            target.rmtree()
        return
    shutil.rmtree(p, ignore_errors=True)


def move(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move a file or directory tree (in a store: copy, then delete; not atomic)."""
    if not is_url(src) and not is_url(dst):
        shutil.move(os.fspath(src), os.fspath(dst))
        return
    fs, source = filesystem(src)
    _, target = filesystem(dst)
    with quiet_fsspec():
        fs.mv(source, target, recursive=True)


def upload_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the local directory `src` to `dst` (a URL or a local path), file by file."""
    if not is_url(dst):
        shutil.copytree(src, dst, dirs_exist_ok=True)
        return
    fs, target = filesystem(dst)
    files = [f for f in sorted(Path(src).rglob("*")) if f.is_file()]
    fs.put([str(f) for f in files], [f"{target}/{f.relative_to(src).as_posix()}" for f in files])


@contextlib.contextmanager
def local_dir(p: str | os.PathLike) -> Iterator[Path]:
    """A local directory to write into, uploaded to `p` when the block ends without error;
    for a local `p`, `p` itself (made if missing)."""
    if not is_url(p):
        Path(p).mkdir(parents=True, exist_ok=True)
        yield Path(p)
        return
    with tempfile.TemporaryDirectory(prefix="sae_jax-upload-") as tmp:
        yield Path(tmp)
        upload_tree(tmp, p)


@contextlib.contextmanager
def local_copy(p: str | os.PathLike) -> Iterator[Path]:
    """A local copy of the file or directory `p` for the block (a local `p`: itself)."""
    if not is_url(p):
        yield Path(p)
        return
    fs, source = filesystem(p)
    with tempfile.TemporaryDirectory(prefix="sae_jax-download-") as tmp:
        target = Path(tmp) / Path(source).name
        if fs.isdir(source):
            fs.get(f"{source}/", f"{target}/", recursive=True)
        else:
            fs.get(source, str(target))
        yield target


def file_size(p: str | os.PathLike) -> int:
    if is_url(p):
        fs, name = filesystem(p)
        return int(fs.size(name))
    return os.path.getsize(p)


def read_ranges(p: str | os.PathLike, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    """The bytes [start, stop) of `p` for each range, fetched concurrently from a store (one
    range request each), read with pread from a local file."""
    if not ranges:
        return []
    if is_url(p):
        fs, name = filesystem(p)
        starts, stops = zip(*ranges, strict=True)
        return fs.cat_ranges([name] * len(ranges), list(starts), list(stops), on_error="raise")
    with open(p, "rb") as f:
        return [os.pread(f.fileno(), b - a, a) for a, b in ranges]


class RangeArray:
    """A read-only [rows, cols] array in a file at byte `offset` (C order), read by range
    requests: indexing with a slice or an integer array fetches only the rows it names (runs
    of rows closer than MERGE_GAP_BYTES in one request), so a shard is never downloaded whole.
    What np.memmap is for a local file, for an object in a store."""

    def __init__(self, url: str, dtype, offset: int, shape: tuple[int, int]):
        self.url, self.dtype, self.offset = url, np.dtype(dtype), offset
        self.shape = (int(shape[0]), int(shape[1]))
        self.row_bytes = self.shape[1] * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return 2

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return self.take(np.arange(start, stop, step))
            if stop <= start:
                return np.empty((0, self.shape[1]), self.dtype)
            return self.read_runs([(start, stop)])[0]
        if isinstance(index, int | np.integer):
            return self.take(np.asarray([index]))[0]
        return self.take(np.asarray(index))

    def take(self, rows: np.ndarray, gap_bytes: int = MERGE_GAP_BYTES) -> np.ndarray:
        """[len(rows), cols] the given rows (any order, repeats allowed); rows at most
        `gap_bytes` apart are fetched in one request (with what lies between them)."""
        rows = np.asarray(rows, np.int64)
        if rows.ndim != 1:
            raise IndexError("RangeArray takes a slice or a 1-D array of row numbers")
        if not len(rows):
            return np.empty((0, self.shape[1]), self.dtype)
        rows = np.where(rows < 0, rows + len(self), rows)
        if rows.min() < 0 or rows.max() >= len(self):
            raise IndexError(f"row index out of range for {len(self)} rows")
        wanted = np.unique(rows)
        gap = max(1, gap_bytes // max(self.row_bytes, 1))
        breaks = np.flatnonzero(np.diff(wanted) > gap) + 1
        runs = [(int(r[0]), int(r[-1]) + 1) for r in np.split(wanted, breaks) if len(r)]
        blocks = self.read_runs(runs)
        where = np.concatenate([[0], np.cumsum([b - a for a, b in runs])]).astype(np.int64)
        out = np.concatenate(blocks)
        run = np.searchsorted([a for a, _ in runs], rows, side="right") - 1
        return out[where[run] + rows - np.asarray([a for a, _ in runs])[run]]

    def read_runs(self, runs: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """[stop - start, cols] for each (start, stop) run of rows, fetched concurrently."""
        ranges = [(self.offset + a * self.row_bytes, self.offset + b * self.row_bytes)
                  for a, b in runs]  # fmt: skip
        return [
            np.frombuffer(raw, self.dtype).reshape(b - a, self.shape[1])
            for raw, (a, b) in zip(read_ranges(self.url, ranges), runs, strict=True)
        ]


def open_array(p: str | os.PathLike, dtype, offset: int, shape: tuple[int, int]):
    """The [rows, cols] array at byte `offset` of `p`: np.memmap for a local file, a
    RangeArray (range requests) for a URL."""
    if is_url(p):
        return RangeArray(os.fspath(p), dtype, offset, shape)
    return np.memmap(p, dtype, "r", offset, shape)


def read_blocks(requests: Sequence[tuple]) -> list[np.ndarray]:
    """array[a:b] for each (array, a, b): the rows of every RangeArray among them (any objects
    of one store) fetched concurrently in one batch of range requests; other arrays sliced."""
    out: list = [None] * len(requests)
    remote = []
    for i, (array, a, b) in enumerate(requests):
        if isinstance(array, RangeArray) and b > a:
            remote.append(i)
        else:
            out[i] = array[a:b]  # a local array, or an empty run (no request)
    if not remote:
        return out
    fs, _ = filesystem(requests[remote[0]][0].url)
    within = {url: filesystem(url)[1] for url in {requests[i][0].url for i in remote}}
    names, starts, stops = [], [], []
    for i in remote:
        array, a, b = requests[i]
        names.append(within[array.url])
        starts.append(array.offset + a * array.row_bytes)
        stops.append(array.offset + b * array.row_bytes)
    raws = fs.cat_ranges(names, starts, stops, on_error="raise")
    for i, raw in zip(remote, raws, strict=True):
        array, a, b = requests[i]
        out[i] = np.frombuffer(raw, array.dtype).reshape(b - a, array.shape[1])
    return out


def forget_listings(p: str | os.PathLike) -> None:
    """Drop the directory listings cached for the store of URL `p` (nothing for a local
    path). gcsfs caches listings per filesystem object, and epath (hence orbax) holds
    another object than `filesystem`: after a change made through one, or by another
    process or client (tensorstore), the other can still list what was there before."""
    if not is_url(p):
        return
    from etils.epath import backend

    for fs in (backend.fsspec_backend.fs(os.fspath(p)), filesystem(p)[0]):
        fs.invalidate_cache()


@contextlib.contextmanager
def quiet_fsspec() -> Iterator[None]:
    """Silence gcsfs's warning-with-traceback when an emulator lacks the move API (it then
    copies and deletes, which is what we want)."""
    logger = logging.getLogger("gcsfs")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def use_emulator(url: str | None = None) -> None:
    """Point every client at a GCS emulator at `url` (default: $STORAGE_EMULATOR_HOST): gcsfs
    and google-cloud-storage read STORAGE_EMULATOR_HOST; tensorstore reads
    TENSORSTORE_GCS_HTTP_URL and, for its bearer token, GOOGLE_AUTH_TOKEN_FOR_TESTING; gcsfs's
    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false skips its bucket-type probe (gRPC over TLS, which
    an emulator answers with two time-outs: minutes) and must be set before gcsfs is imported."""
    url = url or os.environ.get("STORAGE_EMULATOR_HOST")
    if not url:
        return
    os.environ["STORAGE_EMULATOR_HOST"] = url
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = url
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", EMULATOR_TOKEN)
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    forget_filesystems()


def forget_filesystems() -> None:
    """Drop fsspec's cached gs:// filesystem objects: each holds the endpoint it was made
    with, so after the endpoint changes the next call makes a new one."""
    if "gcsfs" in sys.modules:
        import fsspec

        fsspec.get_filesystem_class("gs").clear_instance_cache()


use_emulator()
