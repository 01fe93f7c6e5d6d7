"""Evaluation statistics of a trained SAE: reconstruction, sparsity, latent health, routing.

`EvalAccumulator` sums per-batch statistics of a PretrainedSAE (raw activations, no capacity
limit) so that any number of tokens can be evaluated in bounded memory; `finish()` turns them
into the numbers `launch.eval` reports.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from sae_jax.evaluation.held_out import fvu_from_sums
from sae_jax.evaluation.recovery import feature_recovery
from sae_jax.evaluation.saebench import (
    SAEBENCH_BATCH,
    SaebenchSums,
    latent_coefficients,
    num_latents,
    weight_metrics,
)
from sae_jax.pretrained import PretrainedSAE

DENSE_FREQUENCY = 0.1  # a latent firing on more than this fraction of tokens is "dense"
DUPLICATE_COSINE = 0.9


def dropped_at_capacity(expert: np.ndarray, num_experts: int, capacity_factor: float) -> int:
    """Tokens of one batch that the dispatch would drop: those past C = ceil(cf * T / N) in
    their expert's buffer (slots go to tokens in order)."""
    if num_experts == 1:
        return 0
    capacity = math.ceil(capacity_factor * len(expert) / num_experts)
    counts = np.bincount(expert, minlength=num_experts)
    return int(np.maximum(counts - capacity, 0).sum())


def router_entropy(probs: np.ndarray) -> np.ndarray:
    """[T] entropy (nats) of each token's router distribution [T, N]."""
    p = np.clip(probs, 1e-30, 1.0)
    return -np.sum(probs * np.log(p), axis=-1)


def feature_duplication(w_dec: np.ndarray, threshold: float = DUPLICATE_COSINE) -> float:
    """Fraction of decoder rows whose nearest row in another expert has cosine > threshold.
    w_dec: [N, L, d]. 0 for a single expert."""
    n, lat, d = w_dec.shape
    if n == 1:
        return 0.0
    unit = w_dec / np.maximum(np.linalg.norm(w_dec, axis=-1, keepdims=True), 1e-12)
    flat = jnp.asarray(unit.reshape(n * lat, d))
    owner = jnp.repeat(jnp.arange(n), lat)
    duplicated = 0
    for start in range(0, n * lat, 1024):
        sims = flat[start : start + 1024] @ flat.T
        sims = jnp.where(owner[start : start + 1024, None] == owner[None, :], -jnp.inf, sims)
        duplicated += int(jnp.sum(jnp.max(sims, axis=1) > threshold))
    return duplicated / (n * lat)


def decoder_feature_recovery(features, w_dec, threshold: float = DUPLICATE_COSINE) -> float:
    """feature_recovery of planted features [F, d] by decoder rows [N, L, d] of any norm (an
    export's rows have norm 1 / input_scale)."""
    w = np.asarray(w_dec)
    return feature_recovery(features, w / np.linalg.norm(w, axis=-1, keepdims=True), threshold)


def duplicate_pairs(w_dec: np.ndarray, threshold: float = DUPLICATE_COSINE,
                    max_pairs: int = 5000) -> list[tuple[int, int, float]]:  # fmt: skip
    """Pairs (a, b, cosine) of latents a < b in different experts whose decoder rows [N, L, d]
    have cosine > threshold, highest first (at most max_pairs), computed a chunk at a time."""
    n, lat, d = w_dec.shape
    if n == 1:
        return []
    unit = w_dec / np.maximum(np.linalg.norm(w_dec, axis=-1, keepdims=True), 1e-12)
    flat = jnp.asarray(unit.reshape(n * lat, d))
    pairs = []
    for start in range(0, n * lat, 256):
        sims = np.asarray(flat[start : start + 256] @ flat.T)
        a, b = np.nonzero(sims > threshold)
        a = a + start
        ok = (a // lat != b // lat) & (a < b)
        pairs += zip(a[ok].tolist(), b[ok].tolist(), sims[a[ok] - start, b[ok]].tolist(),
                     strict=True)  # fmt: skip
    pairs.sort(key=lambda p: -p[2])
    return pairs[:max_pairs]


class EvalAccumulator:
    """Running sums over evaluated batches of raw activations x [T, d] with keep [T] (False
    for outlier tokens, which are left out of MSE/FVU but counted in
    `fvu_dropless_with_outliers`). SAEBench's metrics (`saebench`) are over the kept tokens,
    relative_reconstruction_bias per `saebench_batch` tokens (saebench.BatchRatio)."""

    def __init__(self, sae: PretrainedSAE, capacity_factor: float | None, input_scale: float = 1.0,
                 saebench_batch: int = SAEBENCH_BATCH):  # fmt: skip
        self.sae, self.cf, self.scale = sae, capacity_factor, input_scale
        cfg = sae.cfg
        self.fired = np.zeros(cfg.dictionary_size, np.int64)
        self.load = np.zeros(cfg.num_experts, np.int64)
        self.sums = {k: 0.0 for k in ("n", "n_all", "sq", "sq_all", "x2", "x2_all", "l0",
                                      "entropy", "dropped", "tokens")}  # fmt: skip
        self.sum_x = np.zeros(cfg.d)
        self.sum_x_all = np.zeros(cfg.d)
        self.saebench = SaebenchSums(num_latents(sae.cfg), saebench_batch)

    def add(self, x: np.ndarray, keep: np.ndarray | None = None) -> None:
        keep = np.ones(len(x), bool) if keep is None else keep.astype(bool)
        codes = self.sae.encode(x)
        x_hat = np.asarray(self.sae.decode(codes), np.float64)
        x = np.asarray(x, np.float64)
        values, indices = np.asarray(codes.values), np.asarray(codes.indices)
        expert = np.asarray(codes.expert)
        err = np.sum((x - x_hat) ** 2, axis=1)
        x2 = np.sum(x**2, axis=1)
        s = self.sums
        s["n"] += keep.sum()
        s["n_all"] += len(x)
        s["sq"] += err[keep].sum()
        s["sq_all"] += err.sum()
        s["x2"] += x2[keep].sum()
        s["x2_all"] += x2.sum()
        self.sum_x += x[keep].sum(0)
        self.sum_x_all += x.sum(0)
        active = values > 0
        s["l0"] += active.sum()
        # a token's top-k indices are distinct, so this counts tokens on which each latent fired
        self.fired += np.bincount(indices[active], minlength=len(self.fired))
        self.load += np.bincount(expert, minlength=self.sae.cfg.num_experts)
        if self.sae.cfg.num_experts > 1:
            s["entropy"] += router_entropy(np.asarray(self.sae.route(x).probs)).sum()
        if self.cf is not None:  # None: a dropless run, nothing dropped
            s["dropped"] += dropped_at_capacity(expert, self.sae.cfg.num_experts, self.cf)
        s["tokens"] += len(x)
        self.saebench.add(x, x_hat, latent_coefficients(codes), indices, keep)

    def finish(self) -> dict:
        s, cfg = self.sums, self.sae.cfg
        tokens = max(s["tokens"], 1)
        freq = self.fired / tokens
        fvu = fvu_from_sums(s["sq"], s["x2"], self.sum_x, s["n"])
        fvu_all = fvu_from_sums(s["sq_all"], s["x2_all"], self.sum_x_all, s["n_all"])
        return {
            "tokens": int(s["tokens"]),
            "mse": s["sq"] / max(s["n"] * cfg.d, 1) * self.scale**2,
            "mse_raw": s["sq"] / max(s["n"] * cfg.d, 1),
            "fvu_dropless": fvu,  # no capacity: not the training log's eval/fvu
            "fvu_dropless_with_outliers": fvu_all,
            "outlier_fraction": 1 - s["n"] / tokens,
            "l0": s["l0"] / tokens,
            "dead_fraction": float(np.mean(self.fired == 0)),
            "dense_fraction": float(np.mean(freq > DENSE_FREQUENCY)),
            "expert_load": (self.load / tokens).tolist(),
            "router_entropy": s["entropy"] / tokens if cfg.num_experts > 1 else 0.0,
            "router_entropy_max": math.log(cfg.num_experts),
            "drop_fraction": s["dropped"] / tokens,
            "capacity_factor": self.cf,
            "feature_duplication": feature_duplication(np.asarray(self.sae.params["w_dec"])),
            "latent_frequency": freq.tolist(),
            "saebench": self.saebench.finish() | weight_metrics(self.sae),
        }
