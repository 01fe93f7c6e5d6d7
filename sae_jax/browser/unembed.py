"""Which output tokens a latent's decoder row promotes and suppresses: the row pushed through
the language model's final norm scale and unembedding (a direct logit effect, ignoring the
layers after the SAE's)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

ROWS_PER_CHUNK = 256


def load_unembedding(model_spec: str) -> tuple[np.ndarray, object]:
    """(W [vocab, d] = unembedding rows scaled by the final norm's weight, tokenizer) of a
    model the dumper can load (needs the `dump` extra)."""
    from sae_jax.data.dumper import load_model

    model, tokenizer, _ = load_model(model_spec, "cpu")
    w = model.get_output_embeddings().weight.detach().float().numpy()
    inner = getattr(model, "model", None)
    norm = getattr(inner, "norm", None)
    if norm is not None and getattr(norm, "weight", None) is not None:
        w = w * norm.weight.detach().float().numpy()[None, :]
    return w, tokenizer


def logit_effects(rows: np.ndarray, unembed: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    """For decoder rows [n, d]: (promoted ids [n, k], their logits [n, k], suppressed ids
    [n, k], their logits [n, k]), a chunk of rows at a time."""
    w = jnp.asarray(unembed)
    out = [[], [], [], []]
    for i in range(0, len(rows), ROWS_PER_CHUNK):
        chunk = np.zeros((ROWS_PER_CHUNK, rows.shape[1]), np.float32)
        n = min(ROWS_PER_CHUNK, len(rows) - i)
        chunk[:n] = rows[i : i + n]
        for part, got in zip(out, _top_bottom(jnp.asarray(chunk), w, k), strict=True):
            part.append(np.asarray(got)[:n])
    return tuple(np.concatenate(part) for part in out)


@functools.partial(jax.jit, static_argnums=2)
def _top_bottom(rows: jax.Array, w: jax.Array, k: int):
    unit = rows / jnp.maximum(jnp.linalg.norm(rows, axis=-1, keepdims=True), 1e-30)
    logits = unit @ w.T
    top, top_ids = jax.lax.top_k(logits, k)
    low, low_ids = jax.lax.top_k(-logits, k)
    return top_ids, top, low_ids, -low
