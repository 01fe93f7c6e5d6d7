"""Run an SAE over evaluation tokens in reading order and gather what the browser shows.

Real activations are read in storage order (shard by shard, as dumped), so a token's
neighbours in its sequence are the tokens beside it; synthetic tokens are the run's eval
batches, each with the planted features it was made of. Codes [tokens, k] of every token read
are kept (to shade context tokens), never a [tokens, latents] array.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sae_jax.data import ActivationData, SyntheticData
from sae_jax.data.reader import row_norms
from sae_jax.evaluation.features import FeatureStats
from sae_jax.pretrained import PretrainedSAE


@dataclass
class Collected:
    """stats: the streaming statistics; values, indices [T, k]: codes of every token read;
    keep [T]: False for outlier tokens (left out of the statistics); expert [T]: routed
    expert. Real data: token_ids [T] (None for dumps without ids) and sequence_start [T]
    (first token of each one's sequence).
    Synthetic: planted [T, m] feature ids (-1 = none), magnitudes [T, m], group [T]."""

    stats: FeatureStats
    values: np.ndarray
    indices: np.ndarray
    keep: np.ndarray
    expert: np.ndarray
    token_ids: np.ndarray | None = None
    sequence_start: np.ndarray | None = None
    planted: np.ndarray | None = None
    magnitude: np.ndarray | None = None
    group: np.ndarray | None = None

    def latent_acts(self, latent: int, tokens: np.ndarray) -> np.ndarray:
        """[len(tokens)] activation of `latent` on each of the given tokens (0 if not in its
        top k)."""
        hit = self.indices[tokens] == latent
        return np.sum(np.where(hit, self.values[tokens], 0.0), axis=-1)


def collect(sae: PretrainedSAE, data, tokens: int, batch_size: int = 4096, top_k: int = 16,
            sample_k: int = 8) -> Collected:  # fmt: skip
    """Encode up to `tokens` tokens of `data` (ActivationData or SyntheticData) a batch at a
    time and accumulate FeatureStats."""
    cfg = sae.cfg
    stats = FeatureStats(cfg.dictionary_size, cfg.num_experts, top_k, sample_k)
    parts: dict[str, list[np.ndarray]] = {}
    real = isinstance(data, ActivationData)
    total = tokens_to_encode(data, tokens, batch_size)
    for start in range(0, total, batch_size):
        stop = min(start + batch_size, total)
        got = _read_real(data, start, stop) if real else _read_synthetic(data, start, stop)
        x = got.pop("x")
        codes = sae.encode(x)
        values, indices = np.asarray(codes.values), np.asarray(codes.indices)
        expert, gate = np.asarray(codes.expert), np.asarray(codes.gate)
        keep = got["keep"]
        token = np.arange(start, stop)[keep]
        expert_key = got["token_ids"] if real else got["group"]
        latent_keys = got["planted"] if not real else (
            None if got["token_ids"] is None else got["token_ids"][:, None])  # fmt: skip
        stats.add(token, values[keep], indices[keep], expert[keep], gate[keep],
                  None if expert_key is None else expert_key[keep],
                  None if latent_keys is None else latent_keys[keep])  # fmt: skip
        for name, value in {"values": values, "indices": indices, "expert": expert, **got}.items():
            if value is not None:
                parts.setdefault(name, []).append(value)
    for name in ("values", "indices"):  # relu / jumprelu codes: a width per batch
        parts[name] = _same_width(parts[name])
    joined = {name: np.concatenate(value) for name, value in parts.items()}
    return Collected(stats, **joined)


def _same_width(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Batches of codes [T_i, k_i] padded with zeros (inactive) to the widest k."""
    k = max(a.shape[1] for a in arrays)
    return [np.pad(a, [(0, 0), (0, k - a.shape[1])]) for a in arrays]


def tokens_to_encode(data, tokens: int, batch_size: int) -> int:
    """How many tokens `collect` encodes when asked for `tokens`: at most all the data holds;
    synthetic eval batches are numbered by size, so whole batches of them."""
    if isinstance(data, ActivationData):
        return min(tokens, data.total_tokens)
    return max(1, tokens // batch_size) * batch_size


def _read_real(data: ActivationData, start: int, stop: int) -> dict:
    x = data.in_order(start, stop)
    seq = data.manifest.get("source", {}).get("seq_len")
    tokens = np.arange(start, stop)
    shard = np.searchsorted(data.offsets, tokens, side="right") - 1
    first = data.offsets[shard]
    if seq and seq > 1:  # the dumper stores whole sequences of seq_len - 1 tokens per shard
        first = first + (tokens - first) // (seq - 1) * (seq - 1)
    return {
        "x": np.asarray(x, np.float32),
        "keep": row_norms(x) <= data.max_norm,
        "token_ids": data.token_ids(start, stop) if data.has_token_ids else None,
        "sequence_start": first,
    }


def _read_synthetic(data: SyntheticData, start: int, stop: int) -> dict:
    """Synthetic eval batches of (stop - start) tokens, numbered as batch start / size."""
    size = stop - start
    step = start // size
    planted, magnitude, group = data.planted("eval", step, size)
    return {
        "x": np.asarray(data.batch("eval", step, size)),
        "keep": np.ones(size, bool),
        "planted": planted,
        "magnitude": magnitude,
        "group": group,
    }
