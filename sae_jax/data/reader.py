"""Shuffled, memory-mapped reading of activation shards: one deterministic stream per process.

The shard directory may be a URL (gs://...): each window's chunks are then fetched by range
requests, all at once (storage.read_blocks), and a background thread reads the next
`prefetch_windows` windows while the current one is served, locally as in a store. Either way
the batches are the same, bit for bit.

Process p of P reads only shards p, p + P, ... Its stream visits every one of its tokens once
per epoch (see TokenOrder); the stream's position (raw tokens consumed) is all a checkpoint
needs to resume it. The order depends on the seed and the process count, never on the mesh.
Batches keep the shards' dtype (float16 / bfloat16 / float32): the training step casts them
on the device, and the host never holds a float32 copy of a batch or shuffle window.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import gin
import jax
import numpy as np

from sae_jax import storage
from sae_jax.data.shards import DataError, concurrently, open_dataset, open_token_ids, spaced
from sae_jax.data.stream import Batch, prefetch, read_ahead

EVAL_SEED = 0  # evaluation sees the same tokens whatever the training seed
BLOCK_ROWS = 4096  # rows converted to float32 at a time for the outlier norms


class TokenOrder:
    """The order in which one stream reads the concatenation of its shards.

    The tokens are cut into chunks of `chunk_tokens` consecutive tokens (a few sequences). Each
    epoch permutes the chunks; each run of `window_tokens / chunk_tokens` chunks in that order
    forms a window (the shuffle buffer) whose tokens are permuted again, so a batch mixes
    tokens of many sequences from all over the shards.
    """

    def __init__(self, lengths: list[int], chunk_tokens: int, window_tokens: int, seed: list[int]):
        starts = [np.arange(0, n, chunk_tokens) for n in lengths]
        self.shard = np.concatenate([np.full(len(s), i) for i, s in enumerate(starts)])
        self.start = np.concatenate(starts)
        self.stop = np.minimum(self.start + chunk_tokens, np.asarray(lengths)[self.shard])
        self.total = int(sum(lengths))
        self.per_window = max(1, window_tokens // chunk_tokens)
        self.seed = list(seed)
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(chunk order, token offset where each window starts, with the total appended)."""
        cached = self._cached  # one read: the window thread and the batch thread share it
        if cached is None or cached[0] != epoch:
            order = np.random.default_rng([*self.seed, epoch]).permutation(len(self.shard))
            ends = np.concatenate([[0], np.cumsum((self.stop - self.start)[order])])
            bounds = np.r_[0 : len(order) : self.per_window, len(order)]
            cached = self._cached = (epoch, order, ends[bounds])
        return cached[1], cached[2]

    def locate(self, position: int) -> tuple[int, int, int]:
        """(epoch, window, tokens of that window already consumed) at a stream position."""
        epoch, within = divmod(position, self.total)
        _, offsets = self.epoch(epoch)
        window = int(np.searchsorted(offsets, within, side="right")) - 1
        return epoch, window, int(within - offsets[window])

    def window(self, epoch: int, window: int) -> tuple[list[tuple[int, int, int]], np.ndarray]:
        """The window's chunks as (shard, start, stop) and the permutation of its tokens."""
        order, offsets = self.epoch(epoch)
        ids = order[window * self.per_window : (window + 1) * self.per_window]
        chunks = [(int(self.shard[i]), int(self.start[i]), int(self.stop[i])) for i in ids]
        size = int(offsets[window + 1] - offsets[window])
        return chunks, np.random.default_rng([*self.seed, epoch, window, 1]).permutation(size)

    def windows_per_epoch(self, epoch: int) -> int:
        return len(self.epoch(epoch)[1]) - 1


@gin.configurable
def prefetch_windows(windows: int = 1) -> int:
    """Shuffle windows a reader reads ahead in a background thread while serving the current
    one (0: none): a store's latency hides behind a window's batches; memory holds 1 + windows
    windows. Bind with `prefetch_windows.windows = 2`."""
    if windows < 0:
        raise DataError(f"prefetch_windows.windows = {windows}; expected >= 0")
    return windows


@gin.configurable
class ActivationData:
    """Activations from a shard directory, local or a URL (see sae_jax/data/shards.py).

    outlier_norm_factor: training skips tokens whose norm exceeds this times the dataset's
        median norm (massive activations); 0 keeps every token.
    shuffle_buffer: tokens per shuffle window; chunk_tokens: consecutive tokens read together.
    scale_tokens: sample size that measures the input scale s (E||s x||^2 = d on inliers).
    prefetch_batches: batches read ahead (windows read ahead: `prefetch_windows`).
    process: (index, count): read the stream of process `index` of `count` (default: this
        JAX process's).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        seed: int = 0,
        outlier_norm_factor: float = 10.0,
        shuffle_buffer: int = 65536,
        chunk_tokens: int = 256,
        scale_tokens: int = 65536,
        prefetch_batches: int = 4,
        process: tuple[int, int] | None = None,
    ):
        if outlier_norm_factor < 0 or shuffle_buffer <= 0 or chunk_tokens <= 0:
            raise DataError("outlier_norm_factor must be >= 0; shuffle_buffer, chunk_tokens > 0")
        self.directory = storage.path(directory)
        self.store = storage.is_url(self.directory)
        self.manifest, shards = open_dataset(directory)
        self.d = int(self.manifest["d"])
        self.dtype = self.manifest["dtype"]
        if process is None:
            process = (jax.process_index(), jax.process_count())
        self.process_index, self.process_count = process
        if len(shards) < self.process_count:
            raise DataError(
                f"{self.directory}: {len(shards)} shard(s) for {self.process_count} processes; "
                "each process reads its own shards (dump with a smaller --shard_tokens)"
            )
        self._all = [s.open(self.dtype) for s in shards]
        self.offsets = np.cumsum([0] + [len(a) for a in self._all])  # storage-order starts
        self.total_tokens = int(self.offsets[-1])
        self._ids = self._open_token_ids()
        self._local = self._all[self.process_index :: self.process_count]
        self.local_tokens = [
            sum(len(a) for a in self._all[p :: self.process_count])
            for p in range(self.process_count)
        ]
        stream = [self.process_count, self.process_index]
        self._orders = {
            "train": TokenOrder([len(a) for a in self._local], chunk_tokens, shuffle_buffer,
                                [seed, *stream]),
            "eval": TokenOrder([len(a) for a in self._local], chunk_tokens, shuffle_buffer,
                               [EVAL_SEED, *stream]),
        }  # fmt: skip
        self.max_norm = self._median_norm() * outlier_norm_factor or np.inf
        self.prefetch_batches, self.prefetch_windows = prefetch_batches, prefetch_windows()
        raw = self._spread(scale_tokens)
        inliers = raw[np.linalg.norm(raw, axis=1) <= self.max_norm]
        if not len(inliers):
            raise DataError(f"{self.directory}: every sampled token is an outlier")
        self.input_scale = float(np.sqrt(self.d / np.mean(np.sum(inliers**2, axis=1))))

    def _open_token_ids(self) -> list | None:
        """Each shard's [tokens, 1] token ids (memory-mapped, or RangeArrays for a URL)."""
        entries = self.manifest["shards"]
        if not all("token_ids" in e for e in entries):
            return None
        return concurrently(
            lambda e: open_token_ids(self.directory / e["token_ids"], int(e["tokens"])),
            entries,
            self.store,
        )

    @property
    def has_token_ids(self) -> bool:
        """Whether the dump stored each token's id (manifest version 2 dumps do)."""
        return self._ids is not None

    def in_order(self, start: int, stop: int) -> np.ndarray:
        """[stop - start, d] unscaled tokens start..stop of all shards in storage order (shard
        by shard, as dumped), in the shards' dtype."""
        return self._storage_slice(self._all, start, stop)

    def token_ids(self, start: int, stop: int) -> np.ndarray:
        """[stop - start] int64 ids of the tokens in_order(start, stop) returns."""
        if self._ids is None:
            raise DataError(f"{self.directory}: the dump has no token ids (re-dump it)")
        return self._storage_slice(self._ids, start, stop).reshape(-1).astype(np.int64)

    def _storage_slice(self, arrays: list, start: int, stop: int) -> np.ndarray:
        """[stop - start, cols] rows start..stop of the arrays concatenated (one batch of
        concurrent range requests in a store)."""
        runs = []
        for i, a in enumerate(arrays):
            lo, hi = max(start - self.offsets[i], 0), min(stop - self.offsets[i], len(a))
            if lo < hi:
                runs.append((a, int(lo), int(hi)))
        return np.concatenate([np.asarray(p) for p in storage.read_blocks(runs)])

    def _median_norm(self) -> float:
        try:
            return float(self.manifest["stats"]["median_norm"])
        except (KeyError, TypeError, ValueError):
            raise DataError(
                f"{self.directory}: manifest has no stats.median_norm; re-run launch.index_shards"
            ) from None

    def _spread(self, n: int) -> np.ndarray:
        """[<= n, d] float32 unscaled tokens evenly spaced over all shards (same on every
        process)."""
        step = max(1, -(-sum(len(a) for a in self._all) // n))
        parts = concurrently(lambda a: np.asarray(spaced(a, 0, len(a), step), np.float32),
                             self._all, self.store)  # fmt: skip
        return np.concatenate(parts)[:n]

    def sample(self, n: int) -> np.ndarray:
        """[<= n, d] scaled inlier tokens from all shards, for data-dependent initialisation."""
        raw = self._spread(n)
        return raw[np.linalg.norm(raw, axis=1) <= self.max_norm] * self.input_scale

    def max_batches(self, batch_size: int) -> int:
        """Whole batches of batch_size global tokens before the smallest stream repeats."""
        rows = batch_size // self.process_count
        return min(self.local_tokens) // rows

    def batches(self, split: str, rows: slice, batch_size: int, start: int = 0) -> Iterator[Batch]:
        """This process's `rows` of consecutive global batches of batch_size tokens, read ahead
        in a background thread.

        split 'train': outliers skipped, order from the training seed, starting at stream
        position `start`. split 'eval': every token, with Batch.keep marking the inliers.
        """
        count = rows.stop - rows.start
        return prefetch(self._batches(split, count, start), self.prefetch_batches)

    def _batches(self, split: str, rows: int, start: int) -> Iterator[Batch]:
        order, train = self._orders[split], split == "train"
        epoch, window, skip = order.locate(start)
        position = start - skip
        xs, keeps, have = [], [], 0
        windows = self._windows(order, epoch, window)
        if self.prefetch_windows:
            windows = read_ahead(windows, self.prefetch_windows)
        try:
            for x, keep in windows:
                idx = np.flatnonzero(keep[skip:]) + skip if train else np.arange(skip, len(x))
                while len(idx):
                    part, idx = idx[: rows - have], idx[rows - have :]
                    xs.append(x[part])
                    keeps.append(keep[part])
                    have += len(part)
                    if have == rows:
                        yield Batch(
                            scaled(np.concatenate(xs), self.input_scale),
                            position + int(part[-1]) + 1,
                            None if train else np.concatenate(keeps),
                        )
                        xs, keeps, have = [], [], 0
                position += len(x)
                skip = 0
        finally:
            windows.close()

    def _windows(
        self, order: TokenOrder, epoch: int, window: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Endless (x [window tokens, d], inlier mask [window tokens]) of consecutive windows
        from (epoch, window) on."""
        while True:
            x = self._load(order, epoch, window)
            yield x, row_norms(x) <= self.max_norm
            window += 1
            if window == order.windows_per_epoch(epoch):
                epoch, window = epoch + 1, 0

    def _load(self, order: TokenOrder, epoch: int, window: int) -> np.ndarray:
        """[window tokens, d] in the shards' dtype, unscaled, in the window's shuffled order
        (its chunks fetched concurrently from a store)."""
        chunks, perm = order.window(epoch, window)
        parts = storage.read_blocks([(self._local[s], a, b) for s, a, b in chunks])
        return np.concatenate(parts)[perm]


def row_norms(x: np.ndarray) -> np.ndarray:
    """[T] float32 L2 norms of the rows of x [T, d] (any float dtype), computed in float32 a
    block of rows at a time: no float32 copy of x, and no float16 overflow of the squares."""
    norms = np.empty(len(x), np.float32)
    for i in range(0, len(x), BLOCK_ROWS):
        norms[i : i + BLOCK_ROWS] = np.linalg.norm(x[i : i + BLOCK_ROWS].astype(np.float32), axis=1)
    return norms


def scaled(x: np.ndarray, scale: float) -> np.ndarray:
    """x * scale in x's own dtype: each product is formed in float32 (numpy casts in small
    buffered blocks, so no float32 copy of x exists) and rounded once to x's dtype."""
    out = np.empty_like(x)
    return np.multiply(x, np.float32(scale), out=out, dtype=np.float32, casting="unsafe")
