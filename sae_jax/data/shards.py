"""The activation-shard format: a directory of `.npy` arrays [tokens, d] plus `manifest.json`.

Shards are float16, bfloat16 or float32 (numpy writes bfloat16 as raw 2-byte `V2` records; the
manifest says what they are). Everything here reads headers and memory-maps; no function loads
a whole shard into RAM. The directory may be a URL (gs://...): headers and rows are then read
by range requests (sae_jax.storage.RangeArray), the per-shard checks run concurrently.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import BinaryIO

import ml_dtypes
import numpy as np
from numpy.lib import format as npy_format

from sae_jax import storage
from sae_jax.config import ConfigError

FORMAT = "sae_jax.activations"
VERSION = 2  # 2: shards may list their token ids; version 1 manifests are still read
READ_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
TOKEN_IDS = "token_ids"  # subdirectory: token_ids/<shard name>, int32 [tokens], one per shard
DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
STATS_TOKENS = 2**20  # tokens sampled for the manifest's norm statistics
CHECK_ROWS = 256  # rows per shard checked for NaN/inf when a dataset is opened
STATS_BLOCK = 16384  # tokens read at a time for them
OUTLIER_FACTOR = 10.0  # the manifest's outlier statistics use norm > 10 x median
HEADER_BYTES = 4096  # first range read of a .npy in a store (numpy's headers are ~128 bytes)
SPARSE_GAP_BYTES = 1 << 16  # sampled rows further apart than this: one range request each
IO_THREADS = 16  # shards checked at once in a store (each check waits on requests)


class DataError(ConfigError):
    """A dataset file is missing, broken or disagrees with its manifest (one line, names it)."""


@dataclass(frozen=True)
class Shard:
    path: storage.AnyPath
    tokens: int
    d: int
    dtype: str  # a DTYPES key, or 'V2' for an unlabelled 2-byte type (bfloat16 as numpy saves it)
    offset: int  # bytes before the data

    def open(self, dtype: str | None = None) -> np.ndarray:
        """The [tokens, d] array, read-only: memory-mapped, or a RangeArray for a URL."""
        return storage.open_array(
            self.path, DTYPES[dtype or self.dtype], self.offset, (self.tokens, self.d)
        )


def concurrently(fn: Callable, items: Iterable, store: bool) -> list:
    """[fn(item) for item in items], run on IO_THREADS threads when `store` (each call waits
    on range requests); the first item's error (in order) is raised, as in a loop."""
    if not store:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(IO_THREADS) as pool:
        return list(pool.map(fn, items))


def npy_header(path: storage.AnyPath) -> tuple[tuple, bool, np.dtype, int, int]:
    """(shape, fortran order, dtype, bytes before the data, file size) of a .npy file."""
    try:
        size = storage.file_size(path)
        with _header_stream(path, size) as f:
            version = npy_format.read_magic(f)
            read = (
                npy_format.read_array_header_1_0
                if version == (1, 0)
                else npy_format.read_array_header_2_0
            )
            shape, fortran, dtype = read(f)
            offset = f.tell()
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: not a readable .npy file ({e})") from None
    return shape, fortran, dtype, offset, size


def _header_stream(path: storage.AnyPath, size: int) -> BinaryIO:
    """The file (local), or its header bytes fetched by one or two range requests (URL)."""
    if not storage.is_url(path):
        return open(path, "rb")
    head = storage.read_ranges(path, [(0, min(size, HEADER_BYTES))])[0]
    if len(head) >= 10 and head[6] == 1:  # magic (6), version (2), header length (2 or 4)
        extent = 10 + int.from_bytes(head[8:10], "little")
    else:
        extent = 12 + int.from_bytes(head[8:12], "little") if len(head) >= 12 else 0
    if len(head) < extent <= size:
        head = storage.read_ranges(path, [(0, extent)])[0]
    return io.BytesIO(head)


def read_header(path: str | os.PathLike) -> Shard:
    """Parse and check a .npy header against the file's size (truncation shows here)."""
    path = storage.path(path)
    shape, fortran, dtype, offset, size = npy_header(path)
    if len(shape) != 2 or fortran:
        raise DataError(f"{path}: array of shape {shape}; expected a C-ordered [tokens, d] array")
    name = "V2" if dtype == np.dtype("V2") else dtype.name
    if name not in DTYPES and name != "V2":
        raise DataError(f"{path}: dtype {dtype}; expected one of {', '.join(DTYPES)}")
    expected = offset + shape[0] * shape[1] * dtype.itemsize
    if size < expected:
        raise DataError(f"{path}: truncated: {size} bytes, its header promises {expected}")
    if size > expected:
        raise DataError(f"{path}: {size - expected} bytes past the end of the array")
    if shape[0] == 0:
        raise DataError(f"{path}: holds no tokens")
    return Shard(path, int(shape[0]), int(shape[1]), name, offset)


def open_token_ids(path: storage.AnyPath, tokens: int):
    """The [tokens, 1] token ids of a shard (a 1-D integer .npy array), read-only: memory-mapped,
    or a RangeArray for a URL; DataError unless it is readable and holds `tokens` ids."""
    shape, fortran, dtype, offset, size = npy_header(path)
    if len(shape) != 1 or dtype.kind not in "iu" or shape[0] != tokens:
        raise DataError(f"{path}: {dtype} array of shape {shape}; expected {tokens} "
                        "integer token ids")  # fmt: skip
    if size < offset + tokens * dtype.itemsize:
        raise DataError(f"{path}: truncated: {size} bytes, its header promises "
                        f"{offset + tokens * dtype.itemsize}")  # fmt: skip
    return storage.open_array(path, dtype, offset, (tokens, 1))


def check_token_ids(path: storage.AnyPath, tokens: int) -> None:
    """Raise DataError unless path is a 1-D integer .npy array of `tokens` token ids."""
    open_token_ids(path, tokens)


def take_rows(array, rows: np.ndarray) -> np.ndarray:
    """[len(rows), d] array[rows]. A RangeArray fetches rows further apart than
    SPARSE_GAP_BYTES by one request each, all concurrently (its default merging would fetch
    everything between rows up to 1 MiB apart: a whole shard for a sparse sample)."""
    if not isinstance(array, storage.RangeArray):
        return np.asarray(array[rows])
    return array.take(rows, gap_bytes=SPARSE_GAP_BYTES)


def spaced(array, start: int, stop: int, step: int) -> np.ndarray:
    """array[start:stop:step] ([rows, d]), a sparse sample of a RangeArray by take_rows."""
    if not isinstance(array, storage.RangeArray):
        return array[start:stop:step]
    return take_rows(array, np.arange(start, min(stop, len(array)), step))


def check_finite(shard: Shard, dtype: str, rows: int = CHECK_ROWS) -> None:
    """Raise DataError if evenly spaced sample rows of the shard hold NaN or inf."""
    data = shard.open(dtype)
    idx = np.unique(np.linspace(0, shard.tokens - 1, min(rows, shard.tokens)).astype(np.int64))
    sample = np.asarray(take_rows(data, idx), np.float32)
    bad = ~np.isfinite(sample).all(axis=1)
    if bad.any():
        raise DataError(f"{shard.path}: NaN or inf values (row {int(idx[bad.argmax()])})")


def resolve_dtype(shards: list[Shard], dtype: str | None) -> str:
    """The dataset's dtype: what the headers say, or `dtype` for bfloat16 stored as V2."""
    names = {s.dtype for s in shards}
    if len(names) > 1:
        first = {n: next(s.path for s in shards if s.dtype == n) for n in sorted(names)}
        raise DataError(f"shards disagree on dtype: {first}")
    (name,) = names
    if name == "V2":
        if dtype != "bfloat16":
            raise DataError(
                f"{shards[0].path}: raw 2-byte records (how numpy saves bfloat16); "
                "pass --dtype bfloat16 if that is what they are"
            )
        return "bfloat16"
    if dtype is not None and dtype != name:
        raise DataError(f"{shards[0].path}: dtype {name}, but {dtype} was asked for")
    return name


def norm_stats(arrays: list[np.ndarray], max_tokens: int = STATS_TOKENS) -> dict:
    """Norm and scale statistics from an evenly spaced sample of at most max_tokens tokens,
    read in blocks (memory: one block plus a float per sampled token)."""
    total = sum(len(a) for a in arrays)
    step = max(1, -(-total // max_tokens))

    def blocks():
        for a in arrays:
            for start in range(0, len(a), STATS_BLOCK * step):
                yield np.asarray(spaced(a, start, start + STATS_BLOCK * step, step), np.float32)

    sum_x, norms = 0.0, []
    for x in blocks():
        sum_x = sum_x + x.sum(axis=0, dtype=np.float64)
        norms.append(np.linalg.norm(x, axis=1))
    norms = np.concatenate(norms)
    mean = sum_x / len(norms)
    centred = np.concatenate([np.sum((x - mean) ** 2, axis=1) for x in blocks()])
    median = float(np.median(norms))
    outlier = norms > OUTLIER_FACTOR * median
    q = np.quantile(norms, [0.9, 0.99, 0.999])
    return {
        "tokens_measured": int(len(norms)),
        "median_norm": median,
        "mean_norm": float(norms.mean()),
        "norm_quantiles": {"0.9": float(q[0]), "0.99": float(q[1]), "0.999": float(q[2])},
        "max_norm": float(norms.max()),
        "mean_sq_norm": float(np.mean(norms.astype(np.float64) ** 2)),
        "mean_sq_norm_inliers": float(np.mean(norms[~outlier].astype(np.float64) ** 2)),
        "outlier_factor": OUTLIER_FACTOR,
        "outlier_fraction": float(outlier.mean()),
        "outlier_variance_share": float(centred[outlier].sum() / max(centred.sum(), 1e-30)),
    }


def shard_files(directory: storage.AnyPath) -> list[storage.AnyPath]:
    if not directory.is_dir():
        raise DataError(f"{directory}: no such directory")
    files = sorted(directory.glob("*.npy"), key=lambda p: p.name)
    if not files:
        raise DataError(f"{directory}: no .npy files")
    return files


def build_manifest(
    directory: str | os.PathLike, dtype: str | None = None, source: dict | None = None
) -> dict:
    """Check every .npy file in directory and describe them (does not write anything)."""
    directory = storage.path(directory)
    store = storage.is_url(directory)
    shards = concurrently(read_header, shard_files(directory), store)
    dims = {s.d for s in shards}
    if len(dims) > 1:
        odd = next(s for s in shards if s.d != shards[0].d)
        raise DataError(f"{odd.path}: d = {odd.d}, but {shards[0].path.name} has d = {shards[0].d}")
    dtype = resolve_dtype(shards, dtype)
    concurrently(lambda s: check_finite(s, dtype), shards, store)
    entries = concurrently(lambda s: _entry(directory, s), shards, store)
    return {
        "format": FORMAT,
        "version": VERSION,
        "d": shards[0].d,
        "dtype": dtype,
        "total_tokens": sum(s.tokens for s in shards),
        "shards": entries,
        "source": source or {},
        "stats": norm_stats([s.open(dtype) for s in shards]),
    }


def _entry(directory: storage.AnyPath, shard: Shard) -> dict:
    """The manifest's entry for a shard, with its token ids if token_ids/ holds them."""
    entry = {"file": shard.path.name, "tokens": shard.tokens}
    ids = directory / TOKEN_IDS / shard.path.name
    if ids.exists():
        check_token_ids(ids, shard.tokens)
        entry["token_ids"] = f"{TOKEN_IDS}/{shard.path.name}"
    return entry


def write_manifest(directory: str | os.PathLike, manifest: dict) -> storage.AnyPath:
    """Write directory/manifest.json atomically (a crash leaves the old one or none)."""
    path = storage.path(directory) / MANIFEST
    storage.write_atomic(path, json.dumps(manifest, indent=1) + "\n")
    return path


def open_dataset(directory: str | os.PathLike) -> tuple[dict, list[Shard]]:
    """Read the manifest and check every shard it lists against it: existence, header, size,
    d, dtype, token count, and NaN/inf in sampled rows."""
    directory = storage.path(directory)
    manifest = read_manifest(directory)
    store = storage.is_url(directory)
    entries = [(e["file"], int(e["tokens"])) for e in manifest["shards"]]
    shards = concurrently(lambda e: _check_shard(directory, manifest, *e), entries, store)
    with_ids = [e for e in manifest["shards"] if "token_ids" in e]
    concurrently(lambda e: check_token_ids(directory / e["token_ids"], int(e["tokens"])),
                 with_ids, store)  # fmt: skip
    return manifest, shards


def read_manifest(directory: storage.AnyPath) -> dict:
    """directory/manifest.json, checked for format, version, d, dtype and a shard list."""
    path = directory / MANIFEST
    if not path.exists():
        shard_files(directory)  # names an empty or missing directory first
        raise DataError(f"{path}: missing; run `python -m launch.index_shards {directory}`")
    try:
        manifest = json.loads(path.read_text())
        version, dtype = manifest["version"], manifest["dtype"]
        int(manifest["d"])
        entries = [(e["file"], int(e["tokens"])) for e in manifest["shards"]]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a valid manifest ({e!r})") from None
    if manifest.get("format") != FORMAT or version not in READ_VERSIONS:
        raise DataError(f"{path}: format {manifest.get('format')} v{version}; expected "
                        f"{FORMAT} v{' or v'.join(map(str, READ_VERSIONS))}")  # fmt: skip
    if dtype not in DTYPES:
        raise DataError(f"{path}: dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    if not entries:
        raise DataError(f"{path}: lists no shards")
    return manifest


def _check_shard(directory: storage.AnyPath, manifest: dict, name: str, tokens: int) -> Shard:
    """The shard `name`, checked against the manifest (d, dtype, tokens) and for NaN/inf."""
    d, dtype = int(manifest["d"]), manifest["dtype"]
    if not (directory / name).exists():
        raise DataError(f"{directory / name}: listed in {MANIFEST} but missing")
    shard = read_header(directory / name)
    if shard.d != d:
        raise DataError(f"{shard.path}: d = {shard.d}, but {MANIFEST} says {d}")
    if shard.dtype != dtype and not (shard.dtype == "V2" and dtype == "bfloat16"):
        raise DataError(f"{shard.path}: dtype {shard.dtype}, but {MANIFEST} says {dtype}")
    if shard.tokens != tokens:
        raise DataError(f"{shard.path}: {shard.tokens} tokens, but {MANIFEST} says {tokens}")
    shard = replace(shard, dtype=dtype)  # V2 records are the manifest's bfloat16
    check_finite(shard, dtype)
    return shard
