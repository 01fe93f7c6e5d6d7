"""The feature browser: static HTML pages of a run's experts and latents (launch.browse).

`build_browser` encodes evaluation tokens with the run's exported SAE (collect.py), then
writes DIR/browser/ (site.py): an overview of the experts, a page per expert and per latent,
look-up by latent id and by token text. On text dumps with token ids the contexts are text;
on synthetic data, the planted features; when the shards' manifest names a loadable model,
each latent's decoder row is read through its unembedding (unembed.py).
A workdir may be a URL (gs://...): the pages are written to a local directory, then uploaded
to workdir/browser/ (whose old pages are deleted first).
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sae_jax import storage
from sae_jax.browser.collect import Collected, collect, tokens_to_encode
from sae_jax.browser.site import SiteInfo, write_site
from sae_jax.config import ConfigError
from sae_jax.data import ActivationData
from sae_jax.evaluation.analysis import duplicate_pairs
from sae_jax.run_data import load_run_sae, load_sae, open_eval_data

REDUMP = ("this dump has no token ids (written before the dumper stored them), so contexts "
          "show token positions, not text; re-dump it with python -m launch.dump_activations "
          "to see text")  # fmt: skip
# Shards indexed from arrays of one's own (launch.index_shards) name no model: nothing to redo.
NO_IDS = ("these shards come with no token ids (indexed arrays, not a launch.dump_activations "
          "dump), so contexts show token positions, not text")  # fmt: skip

__all__ = ["BrowserOptions", "Collected", "build_browser", "collect"]


@dataclass(frozen=True)
class BrowserOptions:
    """What the browser encodes and shows.

    tokens: evaluation tokens encoded; batch_size: tokens per encode batch; top_k: top
    contexts kept per latent; sample_k: random contexts kept per latent; effects_k: promoted
    and suppressed tokens per latent (use_model: load the LM to find them); duplicates: search
    the decoder rows for duplicated pairs (M^2 d work).
    """

    tokens: int = 65536
    batch_size: int = 4096
    top_k: int = 16
    sample_k: int = 8
    effects_k: int = 10
    use_model: bool = True
    duplicates: bool = True


def build_browser(
    workdir: str | Path,
    data: str | None = None,
    *,
    sae: str | Path | None = None,
    log=print,
    **options: Any,
) -> tuple[storage.AnyPath, Collected]:
    """Write workdir/browser/ for the run's exported SAE over `tokens` tokens of `data` (default:
    the run's EVAL_DATA). With `sae` (any directory load_pretrained reads: a peer's SAELens or
    sparsify SAE too) browse that SAE on `data` (then required) instead; workdir is then only
    where browser/ goes (and its eval.json is shown). `options`: BrowserOptions' fields.
    Returns (index.html, what was collected)."""
    opts = BrowserOptions(**options)
    workdir = storage.path(workdir)
    if sae is not None and data is None:
        raise ConfigError(f"{sae}: browsing an SAE directory needs data (activation shards)")
    title = _name(workdir) if sae is None else _name(storage.path(sae))
    sae = load_run_sae(workdir) if sae is None else load_sae(sae)
    source = open_eval_data(workdir, data)
    real = isinstance(source, ActivationData)
    if source.d != sae.cfg.d:
        raise ConfigError(f"{data or 'EVAL_DATA'}: d = {source.d}, but the SAE has d = "
                          f"{sae.cfg.d}")  # fmt: skip
    total = tokens_to_encode(source, opts.tokens, opts.batch_size)
    log(f"browse: encoding {total} tokens with {sae.cfg.num_latents} latents")
    got = collect(sae, source, opts.tokens, opts.batch_size, opts.top_k, opts.sample_k)
    info = SiteInfo(title=title, kind="synthetic", data="synthetic (seed)",
                    metrics=_eval_metrics(workdir))  # fmt: skip
    if real:
        info.data = str(source.directory)
        info.kind = "text" if source.has_token_ids else "activations"
        model = source.manifest.get("source", {}).get("model")
        info.note = "" if source.has_token_ids else REDUMP if model else NO_IDS
        if model:
            info.decode, info.effects, why = _text_and_effects(model, sae, opts)
            if why:
                info.note = (info.note + "; " if info.note else "") + why
        if info.kind == "text" and info.decode is None:
            info.kind = "activations"
    else:
        info.features = np.asarray(source.features)
    pairs = duplicate_pairs(np.asarray(sae.params["w_dec"])) if opts.duplicates else None
    found = "duplicates not searched" if pairs is None else f"{len(pairs)} duplicated pairs"
    log(f"browse: writing pages ({found})")
    return _write_pages(workdir / "browser", sae, got, info, pairs), got


def _write_pages(out: storage.AnyPath, sae, got: Collected, info: SiteInfo,
                 pairs: list | None) -> storage.AnyPath:  # fmt: skip
    """write_site into `out`; for a URL, into a local directory, uploaded to `out` once
    written (the old pages deleted first). Returns out/index.html."""
    if not storage.is_url(out):
        return write_site(out, sae, got, info, pairs)
    with tempfile.TemporaryDirectory(prefix="sae_jax-browser-") as tmp:
        index = write_site(Path(tmp) / "browser", sae, got, info, pairs)
        storage.remove_tree(out)
        storage.upload_tree(index.parent, out)
    return out / "index.html"


def _name(p: storage.AnyPath) -> str:
    """A directory's name: a local one's resolved, a URL's last component."""
    return p.name if storage.is_url(p) else p.resolve().name


def _text_and_effects(model: str, sae, opts: BrowserOptions):
    """(decode, logit effects or None, note) for the manifest's model; a note says what could
    not be loaded."""
    try:
        from sae_jax.browser.unembed import load_unembedding, logit_effects
        from sae_jax.data.dumper import load_tokenizer

        if not opts.use_model:
            tokenizer = load_tokenizer(model)
            effects = None
        else:
            unembed, tokenizer = load_unembedding(model)
            rows = np.asarray(sae.params["w_dec"]).reshape(sae.cfg.num_latents, -1)
            effects = logit_effects(rows, unembed, opts.effects_k)
    except (ImportError, ValueError, OSError) as e:
        return None, None, f"model {model} not loadable ({str(e).splitlines()[0]})"
    return (lambda i: tokenizer.decode([i])), effects, ""


def _eval_metrics(workdir: storage.AnyPath) -> dict:
    path = workdir / "eval.json"
    if not path.exists():
        return {}
    result = json.loads(path.read_text())
    return {k: v for k, v in result.items()
            if isinstance(v, int | float) and math.isfinite(v)}  # fmt: skip
