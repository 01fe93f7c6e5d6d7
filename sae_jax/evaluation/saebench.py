"""SAEBench's core metrics, under SAEBench's names, with sae_lens.evals' definitions
(sae_lens 6: `get_sparsity_and_variance_metrics`, `ExplainedVarianceCalculator`; SAEBench's
`calculate_misc_metrics` and max cosine similarities). Formulas: docs/metrics.md.

`SaebenchSums` streams per-batch sums (bounded memory, any number of tokens) and `finish`
turns them into the named metrics; `weight_metrics` gives the two average max cosines over
every latent of an SAE (all experts' and the shared dictionary's), a block of rows at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from contextlib import closing
from itertools import islice

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax.config import SAEConfig
from sae_jax.pretrained import Codes, PretrainedSAE

# Every SAEBench metric reported, in the order tables print them (kl_div_score and
# ce_loss_score only where a language model runs: sae_jax/evaluation/lm_loss.py).
NAMES = (
    "explained_variance", "mse", "cossim", "l2_norm_in", "l2_norm_out", "l2_ratio",
    "relative_reconstruction_bias", "l0", "l1", "frac_alive", "freq_over_1_percent",
    "freq_over_10_percent", "average_max_encoder_cosine_sim", "average_max_decoder_cosine_sim",
    "kl_div_score", "ce_loss_score",
)  # fmt: skip
PREFIX = "saebench/"  # of these metrics' keys in a training log's rows and TensorBoard
NORM_FLOOR = 1e-4  # l2_ratio divides by ||x||, or by 1 where ||x|| is below this (as SAELens)
ROW_CHUNK = 1024  # max-cosine rows per block: 2 * 1024 FLOPs per weight read, compute-bound
COL_TILE = 1 << 16  # columns per block: a [ROW_CHUNK, COL_TILE] block is 256 MiB of float32
SAEBENCH_BATCH = 16 * 128  # tokens of SAEBench's default eval batch: 16 prompts of 128
# What a training run's final evaluation takes on at most (launch.eval takes on any SAE):
HOST_BYTES = 64 << 30  # float32 weights loaded on the lead host
WEIGHT_FLOPS = 1e14  # the max cosines' FLOPs (seconds on an accelerator, an hour on 2 cores)

# name: per-token value [T] of (x [T, d], x_hat [T, d], acts [T, k]); the metric is its mean
# over all evaluated tokens.
PER_TOKEN: dict[str, Callable[..., np.ndarray]] = {
    "mse": lambda x, x_hat, a: np.sum((x - x_hat) ** 2, axis=1),
    "cossim": lambda x, x_hat, a: _cosine(x, x_hat),
    "l2_norm_in": lambda x, x_hat, a: np.linalg.norm(x, axis=1),
    "l2_norm_out": lambda x, x_hat, a: np.linalg.norm(x_hat, axis=1),
    "l2_ratio": lambda x, x_hat, a: np.linalg.norm(x_hat, axis=1) / _floored_norm(x),
    "l0": lambda x, x_hat, a: np.sum(a != 0, axis=1).astype(np.float64),
    "l1": lambda x, x_hat, a: np.sum(np.abs(a), axis=1),
}

# name: which latents count, given each latent's firing frequency [M] over the tokens
FREQUENCY: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "frac_alive": lambda f: f > 0,
    "freq_over_1_percent": lambda f: f > 0.01,
    "freq_over_10_percent": lambda f: f > 0.1,
}


def _cosine(x: np.ndarray, x_hat: np.ndarray) -> np.ndarray:
    """[T] cos(x, x_hat); 0 where either is the zero vector (SAELens: NaN, and a NaN mean)."""
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(x_hat, axis=1)
    return np.sum(x * x_hat, axis=1) / np.where(norms > 0, norms, 1.0)


def _floored_norm(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1)
    return np.where(np.abs(norm) < NORM_FLOOR, 1.0, norm)


def latent_coefficients(codes: Codes) -> np.ndarray:
    """[..., k] each code's coefficient on its decoder row (x_hat = sum coefficient * row +
    b_dec): the value times its gate (1 for N = 1 and for shared latents)."""
    gate = codes.latent_gate if codes.latent_gate is not None else codes.gate[..., None]
    return np.asarray(codes.values, np.float64) * np.asarray(gate, np.float64)


class BatchRatio:
    """relative_reconstruction_bias as SAELens computes it: in each batch of `size` tokens
    (kept and left-out ones alike, in the order added), mean ||x_hat||^2 / mean x.x_hat over
    its kept tokens; then the mean over batches (a last partial batch counts as one)."""

    def __init__(self, size: int):
        self.size = size
        self.rows, self.kept, self.num, self.den = 0, 0, 0.0, 0.0  # the open batch's
        self.total, self.count = 0.0, 0  # the closed batches'

    def add(self, out2: np.ndarray, dot: np.ndarray, keep: np.ndarray) -> None:
        """Per-token ||x_hat||^2 [T], x.x_hat [T] and keep [T] bool."""
        start = 0
        while start < len(keep):
            part = slice(start, start + min(self.size - self.rows, len(keep) - start))
            k = keep[part]
            self.num += float(out2[part][k].sum())
            self.den += float(dot[part][k].sum())
            self.kept += int(k.sum())
            self.rows += part.stop - start
            start = part.stop
            if self.rows == self.size:
                self._close()

    def _close(self) -> None:
        if self.kept:
            self.total, self.count = self.total + self.num / self.den, self.count + 1
        self.rows, self.kept, self.num, self.den = 0, 0, 0.0, 0.0

    def value(self) -> float:
        total, count = self.total, self.count
        if self.kept:  # the open, partial batch
            total, count = total + self.num / self.den, count + 1
        return total / count if count else float("nan")


class SaebenchSums:
    """Running sums over batches for the per-token SAEBench metrics, over the kept tokens;
    `num_latents`: M, the SAE's latents with the shared dictionary's (firing counts [M]);
    `batch_tokens`: the batch of relative_reconstruction_bias (SAEBench's default)."""

    def __init__(self, num_latents: int, batch_tokens: int = SAEBENCH_BATCH):
        self.sums = dict.fromkeys(PER_TOKEN, 0.0)
        self.tokens = 0
        self.sum_x: np.ndarray | None = None  # [d] float64
        self.sum_x2 = 0.0
        self.bias = BatchRatio(batch_tokens)
        self.fired = np.zeros(num_latents, np.int64)

    def add(self, x: np.ndarray, x_hat: np.ndarray, acts: np.ndarray, ids: np.ndarray,
            keep: np.ndarray | None = None) -> None:  # fmt: skip
        """One batch: inputs x [T, d] and reconstructions x_hat [T, d] in raw units, latent
        coefficients acts [T, k] and their global latent ids [T, k]; keep [T] bool (None:
        all), False for tokens left out (outliers, as SAELens leaves out special tokens)."""
        x, x_hat = np.asarray(x, np.float64), np.asarray(x_hat, np.float64)
        keep = np.ones(len(x), bool) if keep is None else np.asarray(keep).astype(bool)
        self.bias.add(np.sum(x_hat**2, 1), np.sum(x * x_hat, 1), keep)
        x, x_hat = x[keep], x_hat[keep]
        acts, ids = np.asarray(acts, np.float64)[keep], np.asarray(ids)[keep]
        if len(x) == 0:
            return
        for name, per_token in PER_TOKEN.items():
            self.sums[name] += float(np.sum(per_token(x, x_hat, acts)))
        self.sum_x = x.sum(0) if self.sum_x is None else self.sum_x + x.sum(0)
        self.sum_x2 += float(np.sum(x**2))
        # a token's ids are distinct, so this counts the tokens each latent fired on
        self.fired += np.bincount(ids[acts != 0], minlength=len(self.fired))
        self.tokens += len(x)

    def finish(self) -> dict[str, float]:
        """The per-token metrics, explained_variance and the firing-frequency fractions."""
        n = max(self.tokens, 1)
        result = {name: total / n for name, total in self.sums.items()}
        result["explained_variance"] = self._explained_variance()
        result["relative_reconstruction_bias"] = self.bias.value()
        frequency = self.fired / n
        result |= {name: float(np.mean(test(frequency))) for name, test in FREQUENCY.items()}
        return result

    def _explained_variance(self) -> float:
        """1 - mean ||x - x_hat||^2 / (mean ||x||^2 - ||mean x||^2), pooled over every token
        (ExplainedVarianceCalculator): 1 - FVU."""
        if self.tokens == 0:
            return 0.0
        total_var = self.sum_x2 / self.tokens - float(np.sum((self.sum_x / self.tokens) ** 2))
        mse = self.sums["mse"] / self.tokens
        if total_var < 1e-10:
            return 1.0 if mse < 1e-10 else 0.0
        return 1.0 - mse / total_var


def max_cosines(
    rows: np.ndarray | jax.Array, chunk: int | None = None, tile: int | None = None
) -> np.ndarray:
    """[M] each row's largest cosine with any other row of rows [M, d] (itself left out; a
    zero row has cosine 0 with all): `chunk` rows against all M at a time, the M columns a
    `tile` at a time with a running max, so memory holds one [chunk, tile] block, never
    [M, M]."""
    unit = jnp.asarray(rows, jnp.float32)
    unit = unit / jnp.maximum(jnp.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
    m, d = unit.shape
    if m == 0:
        return np.zeros(0, np.float32)
    chunk, tile = min(chunk or ROW_CHUNK, m), min(tile or COL_TILE, m)
    tiles = -(-m // tile)
    cols = jnp.pad(unit, ((0, tiles * tile - m), (0, 0))).reshape(tiles, tile, d)
    out = [_chunk_max(unit, cols, jnp.int32(start), min(chunk, m - start))
           for start in range(0, m, chunk)]  # fmt: skip
    return np.asarray(jnp.concatenate(out))


@functools.partial(jax.jit, static_argnums=3)
def _chunk_max(unit: jax.Array, cols: jax.Array, start: jax.Array, size: int) -> jax.Array:
    """[size] max cosine of rows start.. of unit [M, d] with the other rows, cols [tiles,
    tile, d] being unit's rows zero-padded to whole tiles."""
    block = jax.lax.dynamic_slice_in_dim(unit, start, size)
    own = start + jnp.arange(size)
    tile = cols.shape[1]

    def step(best, tile_cols):
        t, w = tile_cols
        ids = t * tile + jnp.arange(tile)
        sims = block @ w.T  # [size, tile]
        left_out = (ids[None, :] == own[:, None]) | (ids[None, :] >= unit.shape[0])
        return jnp.maximum(best, jnp.max(jnp.where(left_out, -jnp.inf, sims), axis=1)), None

    init = jnp.full(size, -jnp.inf, jnp.float32)
    return jax.lax.scan(step, init, (jnp.arange(cols.shape[0]), cols))[0]


def all_latent_rows(sae: PretrainedSAE, name: str) -> jax.Array:
    """[M, d] the SAE's encoder (name 'w_enc') or decoder ('w_dec') rows in global latent id
    order: expert e's latent j at e * L + j, then the shared dictionary's."""
    rows = sae.params[name].reshape(-1, sae.cfg.d)
    shared = sae.params.get("shared_" + name)
    return rows if shared is None else jnp.concatenate([rows, shared])


def weight_metrics(
    sae: PretrainedSAE, chunk: int | None = None, tile: int | None = None
) -> dict[str, float]:
    """average_max_encoder_cosine_sim and average_max_decoder_cosine_sim over all latents."""
    return {
        f"average_max_{part}_cosine_sim": float(
            np.mean(max_cosines(all_latent_rows(sae, name), chunk, tile))
        )
        for part, name in (("encoder", "w_enc"), ("decoder", "w_dec"))
    }


def num_latents(cfg: SAEConfig) -> int:
    """M: every latent of the SAE, the shared dictionary's included."""
    return cfg.num_latents + cfg.shared_latents


def weight_flops(cfg: SAEConfig) -> float:
    """FLOPs of the two max-cosine passes (encoder, decoder): 2 M^2 d each."""
    return 4.0 * num_latents(cfg) ** 2 * cfg.d


def evaluate_batches(sae: PretrainedSAE, batches: Iterable, weights: bool = True) -> dict:
    """The SAEBench metrics of `sae` on batches of (x [T, d] raw activations, keep [T] bool or
    None), kept tokens only; with the weight metrics unless `weights` is False."""
    sums = SaebenchSums(num_latents(sae.cfg))
    for x, keep in batches:
        add_batch(sums, sae, np.asarray(x), keep)
    return sums.finish() | (weight_metrics(sae) if weights else {})


def add_batch(sums: SaebenchSums, sae: PretrainedSAE, x: np.ndarray, keep=None) -> None:
    """Encode and decode x [T, d] and add it to `sums` (keep [T] bool or None)."""
    codes = sae.encode(x)
    sums.add(x, np.asarray(sae.decode(codes)), latent_coefficients(codes),
             np.asarray(codes.indices), keep)  # fmt: skip


def evaluate_source(
    sae: PretrainedSAE, source, batch_size: int, max_batches: int, weights: bool = True
) -> dict:
    """evaluate_batches on a data source's first `max_batches` eval batches of `batch_size`
    tokens (every row; raw units: the source's batches are at its input scale)."""
    with closing(source.batches("eval", slice(0, batch_size), batch_size)) as batches:
        pairs = ((b.x / source.input_scale, b.keep) for b in islice(batches, max_batches))
        return evaluate_batches(sae, pairs, weights)
