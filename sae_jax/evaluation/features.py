"""Per-latent and per-expert statistics for the feature browser, a batch of codes at a time.

Memory is bounded by the number of latents times small constants (top-k slots, histogram
bins) plus the distinct (key, latent) pairs seen; nothing holds a [tokens, latents] array.
"""

from __future__ import annotations

import numpy as np

HIST_EDGES = np.linspace(-3.0, 3.0, 121)  # log10 activation; values outside go to the end bins


class StreamingTopK:
    """For each of `groups` groups, the k items of highest score seen so far.

    score, value: [groups, k] float32 (empty slots: score -inf); item: [groups, k] int64 (-1).
    Ties keep the earlier item.
    """

    def __init__(self, groups: int, k: int):
        self.k = k
        self.score = np.full((groups, k), -np.inf, np.float32)
        self.value = np.zeros((groups, k), np.float32)
        self.item = np.full((groups, k), -1, np.int64)

    def add(self, group: np.ndarray, score: np.ndarray, item: np.ndarray, value=None) -> None:
        """Offer entries [E]: group ids, scores, item ids, values (default: the scores)."""
        value = score if value is None else value
        touched, slot = np.unique(group, return_inverse=True)
        k = self.k
        g = np.concatenate([np.repeat(np.arange(len(touched)), k), slot])
        s = np.concatenate([self.score[touched].ravel(), score.astype(np.float32)])
        v = np.concatenate([self.value[touched].ravel(), np.asarray(value, np.float32)])
        it = np.concatenate([self.item[touched].ravel(), item.astype(np.int64)])
        order = np.lexsort((-s, g))  # by group, then score descending; stable on ties
        g, s, v, it = g[order], s[order], v[order], it[order]
        rank = np.arange(len(g)) - np.searchsorted(g, g)
        keep = rank < k
        new = (np.full((len(touched), k), -np.inf, np.float32), np.zeros((len(touched), k),
               np.float32), np.full((len(touched), k), -1, np.int64))  # fmt: skip
        for array, src in zip(new, (s, v, it), strict=True):
            array[g[keep], rank[keep]] = src[keep]
        self.score[touched], self.value[touched], self.item[touched] = new

    def get(self, group: int) -> tuple[np.ndarray, np.ndarray]:
        """(items, values) of one group, best first, empty slots left out."""
        full = self.item[group] >= 0
        return self.item[group][full], self.value[group][full]


class CountTable:
    """Counts of int64 keys, merged a batch at a time (sorted unique keys and their counts)."""

    def __init__(self):
        self.keys = np.zeros(0, np.int64)
        self.counts = np.zeros(0, np.int64)

    def add(self, keys: np.ndarray) -> None:
        new, counts = np.unique(keys.astype(np.int64), return_counts=True)
        merged, inverse = np.unique(np.concatenate([self.keys, new]), return_inverse=True)
        self.counts = np.bincount(inverse, np.concatenate([self.counts, counts]),
                                  len(merged)).astype(np.int64)  # fmt: skip
        self.keys = merged


class FeatureStats:
    """Streaming statistics of an SAE's codes over tokens numbered in reading order.

    Per latent: firing count, max activation, a log10 activation histogram, the `top_k`
    highest activations (token, value) and a uniform random sample of `sample_k` activations
    (bottom-k of random priorities). Per expert: routed token count and the `expert_k` tokens
    of highest router probability. Counts of (expert, expert key) and (latent key, latent)
    pairs, where keys say what a token is (its token id, or its planted features / group).
    """

    def __init__(self, num_latents: int, num_experts: int, top_k: int = 16, sample_k: int = 8,
                 expert_k: int = 12, seed: int = 0):  # fmt: skip
        self.num_latents, self.num_experts = num_latents, num_experts
        self.fired = np.zeros(num_latents, np.int64)
        self.max_act = np.zeros(num_latents, np.float32)
        self.hist = np.zeros((num_latents, len(HIST_EDGES) + 1), np.int32)
        self.top = StreamingTopK(num_latents, top_k)
        self.sample = StreamingTopK(num_latents, sample_k)
        self.load = np.zeros(num_experts, np.int64)
        self.expert_top = StreamingTopK(num_experts, expert_k)
        self.expert_keys = CountTable()
        self.latent_keys = CountTable()
        self.tokens = 0
        self._rng = np.random.default_rng(seed)

    def add(self, token: np.ndarray, values: np.ndarray, indices: np.ndarray,
            expert: np.ndarray, gate: np.ndarray, expert_key: np.ndarray | None = None,
            latent_keys: np.ndarray | None = None) -> None:  # fmt: skip
        """token [T] token numbers; values, indices [T, k] codes (global latent ids); expert,
        gate [T]; expert_key [T] >= 0; latent_keys [T, m] (-1 = none)."""
        self.tokens += len(token)
        active = values > 0
        rows = np.broadcast_to(np.arange(len(token))[:, None], values.shape)[active]
        latent, act = indices[active].astype(np.int64), values[active]
        np.add.at(self.fired, latent, 1)
        np.maximum.at(self.max_act, latent, act)
        bins = np.searchsorted(HIST_EDGES, np.log10(np.maximum(act, 1e-30)))
        np.add.at(self.hist, (latent, bins), 1)
        self.top.add(latent, act, token[rows])
        self.sample.add(latent, -self._rng.random(len(latent)), token[rows], act)
        self.load += np.bincount(expert, minlength=self.num_experts)
        self.expert_top.add(expert, gate, token)
        if expert_key is not None:
            self.expert_keys.add(expert_key.astype(np.int64) * self.num_experts + expert)
        if latent_keys is not None:
            keys = np.repeat(latent_keys[:, :, None], values.shape[1], axis=2)
            lat = np.repeat(indices[:, None, :], latent_keys.shape[1], axis=1)
            ok = (keys >= 0) & (np.repeat(active[:, None, :], latent_keys.shape[1], axis=1))
            self.latent_keys.add(keys[ok].astype(np.int64) * self.num_latents + lat[ok])
