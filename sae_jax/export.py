"""Export a trained SAE to `sae.safetensors` + `cfg.json`, and load it back for inference.

Tensors (float32; N experts, L = NUM_LATENTS / N latents each, d input dims):
    w_enc [N, L, d]   encoder rows (row l of expert i is that latent's encoder vector)
    b_enc [N, L]      encoder bias
    w_dec [N, L, d]   decoder rows
    b_dec [d]         decoder bias, subtracted from the input before encoding
    w_router [d, N], b_router [d]   only when N > 1
The training input scale s (model input = s * raw activation) is folded in, so the tensors
apply to raw activations with the equations of README.md; decoder rows then have norm 1/s.
cfg.json keys: format_version, d, num_latents, num_experts, latents_per_expert, k,
input_scale (the folded s), source (free-form provenance).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from sae_jax import dispatch, routing
from sae_jax.config import SAEConfig
from sae_jax.experts import ExpertParams, expert_forward, use_dense

FORMAT_VERSION = 1
WEIGHTS, CONFIG = "sae.safetensors", "cfg.json"


def export_sae(
    params: dict, cfg: SAEConfig, out_dir: str | Path, input_scale: float = 1.0, source=None
) -> Path:
    """Write out_dir/sae.safetensors and out_dir/cfg.json from a pure-dict parameter tree."""
    s = float(input_scale)
    p = {k: np.asarray(jax.device_get(v), np.float32) for k, v in params.items()}
    tensors = {
        "w_enc": p["w_enc"] * s,
        "b_enc": p["b_enc"],
        "w_dec": p["w_dec"] / s,
        "b_dec": p["b_dec"] / s,
    }
    if cfg.num_experts > 1:
        tensors |= {"w_router": p["w_router"] * s, "b_router": p["b_router"] / s}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS))
    meta = {
        "format_version": FORMAT_VERSION,
        "d": cfg.d,
        "num_latents": cfg.num_latents,
        "num_experts": cfg.num_experts,
        "latents_per_expert": cfg.latents_per_expert,
        "k": cfg.k,
        "input_scale": s,
        "source": source or {},
    }
    (out / CONFIG).write_text(json.dumps(meta, indent=1))
    return out


class Codes(NamedTuple):
    values: jax.Array  # [T, k] latent activations (>= 0)
    indices: jax.Array  # [T, k] global latent ids in [0, NUM_LATENTS): expert * L + local id
    expert: jax.Array  # [T] routed expert
    gate: jax.Array  # [T] router probability of that expert (1 when N = 1)


class PretrainedSAE:
    """A loaded SAE for inference on one device: route, encode, decode, reconstruct.

    Accepts numpy or JAX arrays [T, d] of raw activations; returns JAX arrays. No capacity
    limit applies: every token runs its routed expert.
    """

    def __init__(self, tensors: dict[str, np.ndarray], meta: dict):
        self.meta = meta
        self.cfg = SAEConfig(
            d=meta["d"], num_latents=meta["num_latents"], num_experts=meta["num_experts"],
            k=meta["k"], k_aux=0,
        ).validate()  # fmt: skip
        self.params = {k: jnp.asarray(v) for k, v in tensors.items()}

    def route(self, x) -> routing.Routing:
        """Router probabilities [T, N], routed expert [T] and gate [T]."""
        return _route(self.params, jnp.asarray(x, jnp.float32), self.cfg)

    def encode(self, x) -> Codes:
        return _encode(self.params, jnp.asarray(x, jnp.float32), self.cfg)

    def decode(self, codes: Codes) -> jax.Array:
        """x_hat = gate * sum_j values_j W_dec[indices_j] + b_dec: [T, d]."""
        w = self.params["w_dec"].reshape(-1, self.cfg.d)
        recon = jnp.einsum("tk,tkd->td", codes.values, w[codes.indices])
        return codes.gate[:, None] * recon + self.params["b_dec"]

    def __call__(self, x) -> jax.Array:
        """Reconstruction of raw activations x: [T, d] -> [T, d]."""
        return self.decode(self.encode(x))


def load_pretrained(path: str | Path) -> PretrainedSAE:
    """Load a directory written by `export_sae` (or `python -m launch.export`)."""
    path = Path(path)
    meta = json.loads((path / CONFIG).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path / CONFIG}: unsupported format_version {meta.get('format_version')}"
        )
    return PretrainedSAE(load_file(str(path / WEIGHTS)), meta)


@functools.partial(jax.jit, static_argnums=2)
def _route(params: dict, x: jax.Array, cfg: SAEConfig) -> routing.Routing:
    if cfg.num_experts == 1:
        ones = jnp.ones((x.shape[0],), jnp.float32)
        return routing.Routing(ones[:, None], jnp.zeros(x.shape[0], jnp.int32), ones)
    return routing.route(x, params["w_router"], params["b_router"])


@functools.partial(jax.jit, static_argnums=2)
def _encode(params: dict, x: jax.Array, cfg: SAEConfig) -> Codes:
    n, tokens = cfg.num_experts, x.shape[0]
    r = _route(params, x, cfg)
    slot = dispatch.assign_slots(r.expert, n)
    buf = dispatch.to_buffers(x, r.expert, slot, n, tokens)  # capacity = every token
    valid = dispatch.to_buffers(jnp.ones(tokens, bool), r.expert, slot, n, tokens)
    experts = ExpertParams(params["w_enc"], params["b_enc"], params["w_dec"])
    forward = functools.partial(
        expert_forward, k=cfg.k, dense=use_dense(cfg.expert_kernel, cfg.latents_per_expert)
    )
    _, latents, idx, _, _ = jax.vmap(forward, in_axes=(0, 0, None, 0))(
        experts, buf, params["b_dec"], valid
    )
    values = dispatch.from_buffers(latents, r.expert, slot)
    local = dispatch.from_buffers(idx, r.expert, slot)
    return Codes(values, r.expert[:, None] * cfg.latents_per_expert + local, r.expert, r.gate)
