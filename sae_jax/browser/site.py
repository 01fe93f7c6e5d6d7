"""Write the feature browser: static HTML pages plus data scripts, under DIR/browser/.

Pages (index.html, expert.html#EXPERT, latent.html#ID) are fixed files in `static/`; what they show
comes from `data/*.js` scripts, loaded with <script> tags (which work from file:// where
fetch() does not) and only when needed: overview.js, expert_<EXPERT>.js (one expert's latent
table), block_<B>.js (full records of BLOCK latents), keys.js (look-up by token text),
vocab.js (token strings). So a run with 10^5 latents opens as fast as a small one.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sae_jax.browser.collect import Collected
from sae_jax.evaluation.features import HIST_EDGES

STATIC = Path(__file__).resolve().parent / "static"
BLOCK = 128  # latents per block_<B>.js file
CONTEXT_BEFORE, CONTEXT_AFTER = 12, 4


@dataclass
class SiteInfo:
    """What the pages say about the run and data. kind: 'text' (token ids and a tokenizer),
    'activations' (no token ids: a re-dump is needed for text) or 'synthetic'."""

    title: str
    kind: str
    data: str
    note: str = ""
    decode: Callable[[int], str] | None = None  # token id -> text (kind 'text')
    features: np.ndarray | None = None  # synthetic: planted directions [F, d]
    effects: tuple | None = None  # decoder logit effects (ids, logits, ids, logits), [M, k] each
    metrics: dict = field(default_factory=dict)


def write_site(out: Path, sae, got: Collected, info: SiteInfo, duplicates: list | None) -> Path:
    """Write out/ (index.html, expert.html, latent.html, assets/, data/); returns index.html.
    duplicates: (latent, latent, cosine) pairs, or None when they were not searched."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    (out / "data").mkdir(parents=True)
    for page in STATIC.iterdir():
        target = out / ("assets" if page.suffix in (".js", ".css") else "") / page.name
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(page, target)
    site = _Site(out, sae, got, info, duplicates)
    site.write()
    return out / "index.html"


class _Site:
    def __init__(self, out: Path, sae, got: Collected, info: SiteInfo, duplicates: list | None):
        self.out, self.sae, self.got, self.info = out, sae, got, info
        self.cfg = sae.cfg
        self.searched = duplicates is not None  # None: the search was skipped
        self.duplicates = duplicates or []
        self.vocab: set[int] = set()
        self.decode = functools.lru_cache(maxsize=None)(info.decode) if info.decode else None
        self.twins: dict[int, list] = {}
        for a, b, c in self.duplicates:
            self.twins.setdefault(int(a), []).append([int(b), round(float(c), 4)])
            self.twins.setdefault(int(b), []).append([int(a), round(float(c), 4)])
        self.best_feature = None
        if info.features is not None:
            rows = np.asarray(sae.params["w_dec"]).reshape(self.cfg.num_latents, -1)
            rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-30)
            cos = rows @ info.features.T  # [M, F]: small synthetic problems only
            self.best_feature = np.argsort(-cos, axis=1)[:, :3], np.sort(cos, axis=1)[:, ::-1][
                :, :3]  # fmt: skip

    def write(self) -> None:
        L = self.cfg.latents_per_expert
        labels = [self.label(lat) for lat in range(self.cfg.num_latents)]
        for block in range(-(-self.cfg.num_latents // BLOCK)):
            ids = range(block * BLOCK, min((block + 1) * BLOCK, self.cfg.num_latents))
            self.script(f"block_{block}", {str(i): self.latent(i) for i in ids})
        stats = self.got.stats
        freq = stats.fired / max(stats.tokens, 1)
        for e in range(self.cfg.num_experts):
            ids = np.arange(e * L, (e + 1) * L)
            order = ids[np.argsort(-freq[ids], kind="stable")]
            rows = [[int(i), float(freq[i]), round(float(stats.max_act[i]), 4), labels[i]]
                    for i in order]  # fmt: skip
            self.script(f"expert_{e}", {"latents": rows})
        self.script("keys", self.keys())
        self.script("overview", self.overview(freq))
        if self.info.kind == "text":
            self.script("vocab", {str(i): self.decode(i) for i in sorted(self.vocab)})

    def sparsity(self) -> int | str:
        """k of a TopK SAE; a peer's relu / jumprelu SAE has no fixed k: its activation."""
        kind = getattr(self.sae, "activation", "topk")
        return self.cfg.k if kind == "topk" else f"{kind} (no fixed k)"

    def script(self, name: str, payload) -> None:
        text = json.dumps(payload, separators=(",", ":"), allow_nan=False)
        (self.out / "data" / f"{name}.js").write_text(f"SAE.loaded({json.dumps(name)}, {text});\n")

    # --- one latent ------------------------------------------------------------------------
    def latent(self, i: int) -> dict:
        stats = self.got.stats
        items, values = stats.top.get(i)
        sample_items, sample_values = stats.sample.get(i)
        in_top = set(items.tolist())
        weaker = [(t, v) for t, v in zip(sample_items.tolist(), sample_values, strict=True)
                  if t not in in_top]  # fmt: skip
        weaker.sort(key=lambda tv: -tv[1])
        hist = stats.hist[i]
        nz = np.flatnonzero(hist)
        record = {
            "id": i,
            "expert": i // self.cfg.latents_per_expert,
            "count": int(stats.fired[i]),
            "freq": float(stats.fired[i] / max(stats.tokens, 1)),
            "max": round(float(stats.max_act[i]), 4),
            "hist": [int(nz[0]), hist[nz[0] : nz[-1] + 1].tolist()] if len(nz) else [],
            "top": [self.context(i, int(t), float(v)) for t, v in zip(items, values, strict=True)],
            "sample": [self.context(i, int(t), float(v)) for t, v in weaker],
            "duplicates": self.twins.get(i, []),
        }
        if self.info.effects is not None:
            up_ids, up, down_ids, down = (part[i] for part in self.info.effects)
            record["promoted"] = [[self.word(t), round(float(v), 3)] for t, v in zip(up_ids, up,
                                  strict=True)]  # fmt: skip
            record["suppressed"] = [[self.word(t), round(float(v), 3)] for t, v in
                                    zip(down_ids, down, strict=True)]  # fmt: skip
        if self.best_feature is not None:
            ids, cos = self.best_feature
            record["features"] = [[int(f), round(float(c), 4)] for f, c in zip(ids[i], cos[i],
                                  strict=True)]  # fmt: skip
        return record

    def word(self, token_id) -> int:
        self.vocab.add(int(token_id))
        return int(token_id)

    def context(self, latent: int, token: int, act: float) -> dict:
        """One activating token: where it is and, by data kind, its text with the latent's
        activation on each token, or its planted features."""
        got = self.got
        ctx = {"token": token, "act": round(act, 4)}
        if self.info.kind == "synthetic":
            mask = got.planted[token] >= 0
            ctx["features"] = [[int(f), round(float(m), 3)] for f, m in
                               zip(got.planted[token][mask], got.magnitude[token][mask],
                                   strict=True)]  # fmt: skip
            ctx["group"] = int(got.group[token])
            return ctx
        if got.sequence_start is not None:
            start = int(got.sequence_start[token])
            ctx["position"] = token - start
        if self.info.kind == "text":
            lo = max(start, token - CONTEXT_BEFORE)
            hi = min(len(got.keep), token + CONTEXT_AFTER + 1)
            span = np.arange(lo, hi)
            if got.sequence_start is not None:
                span = span[got.sequence_start[span] == start]
            ctx["ids"] = [self.word(t) for t in got.token_ids[span]]
            ctx["acts"] = [round(float(a), 3) for a in got.latent_acts(latent, span)]
            ctx["center"] = int(token - span[0])
        return ctx

    def label(self, i: int) -> str:
        """A short description for tables: matched planted feature, or top tokens' text."""
        if self.best_feature is not None:
            f, c = self.best_feature[0][i, 0], self.best_feature[1][i, 0]
            return f"feature {f} (cos {c:.2f})"
        if self.info.kind != "text":
            return ""
        items, _ = self.got.stats.top.get(i)
        words: list[str] = []
        for t in self.got.token_ids[items]:
            w = self.decode(int(t))
            if w not in words:
                words.append(w)
        return " | ".join(repr(w)[1:-1] for w in words[:4])

    # --- experts, overview, look-up ----------------------------------------------------------
    def keys(self) -> dict:
        """Look-up: token text (or 'f<id>' for a planted feature) -> experts and latents that
        fire on it, with counts."""
        stats, got = self.got.stats, self.got
        n, m = self.cfg.num_experts, self.cfg.num_latents
        found: dict[str, dict] = {}

        def name(key: int) -> str:
            return f"f{key}" if self.info.kind == "synthetic" else self.decode(key)

        if self.info.kind == "synthetic":  # expert counts per planted feature
            flat = got.planted.ravel()
            experts = np.repeat(got.expert, got.planted.shape[1])
            ok = (flat >= 0) & np.repeat(got.keep, got.planted.shape[1])
            pairs = np.unique(flat[ok] * n + experts[ok], return_counts=True)
            expert_pairs = (pairs[0] // n, pairs[0] % n, pairs[1])
        else:
            keys = stats.expert_keys.keys
            expert_pairs = (keys // n, keys % n, stats.expert_keys.counts)
        for key, e, c in zip(*expert_pairs, strict=True):
            entry = found.setdefault(name(int(key)), {"experts": {}, "latents": {}})
            entry["experts"][int(e)] = entry["experts"].get(int(e), 0) + int(c)
        keys = stats.latent_keys.keys
        for key, lat, c in zip(keys // m, keys % m, stats.latent_keys.counts, strict=True):
            entry = found.setdefault(name(int(key)), {"experts": {}, "latents": {}})
            entry["latents"][int(lat)] = entry["latents"].get(int(lat), 0) + int(c)
        return {
            key: {part: sorted(([i, c] for i, c in entry[part].items()), key=lambda ic: -ic[1])
                  [:12] for part in ("experts", "latents")}
            for key, entry in found.items()
        }  # fmt: skip

    def overview(self, freq: np.ndarray) -> dict:
        stats, cfg, L = self.got.stats, self.cfg, self.cfg.latents_per_expert
        experts = []
        key_counts = self.expert_key_counts()
        for e in range(cfg.num_experts):
            f = freq[e * L : (e + 1) * L]
            items, gates = stats.expert_top.get(e)
            experts.append({
                "id": e, "load": float(stats.load[e] / max(stats.tokens, 1)), "width": L,
                "dead": float(np.mean(f == 0)), "dense": float(np.mean(f > 0.1)),
                "keys": key_counts.get(e, []),
                "contexts": [self.routed_context(int(t), float(g)) for t, g in zip(items, gates,
                             strict=True)],
            })  # fmt: skip
        return {
            "title": self.info.title, "kind": self.info.kind, "data": self.info.data,
            "note": self.info.note, "d": cfg.d, "num_latents": cfg.num_latents,
            "num_experts": cfg.num_experts, "latents_per_expert": L, "k": self.sparsity(),
            "tokens": int(stats.tokens), "block": BLOCK,
            "hist_edges": [round(float(v), 3) for v in HIST_EDGES],
            "experts": experts, "metrics": {k: v for k, v in self.info.metrics.items()
                                            if isinstance(v, str) or math.isfinite(v)},
            "duplicates": [[int(a), int(b), round(c, 4)] for a, b, c in self.duplicates],
            "duplicates_searched": self.searched,
            "dead_fraction": float(np.mean(freq == 0)),
        }  # fmt: skip

    def expert_key_counts(self) -> dict[int, list]:
        """Expert -> its most often routed keys: [text, count, share of that key's tokens]."""
        n = self.cfg.num_experts
        keys, counts = self.got.stats.expert_keys.keys, self.got.stats.expert_keys.counts
        if not len(keys):
            return {}
        key, expert = keys // n, keys % n
        totals = np.bincount(np.searchsorted(np.unique(key), key), counts)
        share = counts / totals[np.searchsorted(np.unique(key), key)]
        out: dict[int, list] = {}
        for e in range(n):
            sel = np.flatnonzero(expert == e)
            sel = sel[np.argsort(-counts[sel], kind="stable")][:10]
            out[e] = [[self.key_text(int(key[j])), int(counts[j]), round(float(share[j]), 3)]
                      for j in sel]  # fmt: skip
        return out

    def key_text(self, key: int) -> str:
        if self.info.kind == "synthetic":
            return f"group {key}"
        return self.decode(key)

    def routed_context(self, token: int, gate: float) -> dict:
        ctx = self.context(-1, token, gate)
        ctx.pop("acts", None)
        return ctx
