"""Load an exported SAE (either form of `sae_jax.export`) and run it for inference.

Inference runs on one host, which holds the whole SAE. Encoding sorts tokens by their routed
expert and runs each expert on blocks of its own tokens (`sae_jax.dispatch.blocks`), so the encoder
work is that of at most T + N * B rows, not N * T.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file

from sae_jax.config import SAEConfig
from sae_jax.dispatch import blocks
from sae_jax.export import CONFIG, INDEX, SHARDED_VERSION, SINGLE_FILE_VERSION, WEIGHTS
from sae_jax.kernels import routing
from sae_jax.kernels.expert import ExpertParams

MAX_BLOCK = 128  # rows per expert block at most (encode's default block size)
MIN_BLOCK = 8


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

    def encode(self, x, block_size: int | None = None) -> Codes:
        """Top-k codes of x [T, d] in each token's routed expert. block_size: rows per
        expert block (default: T / N rounded up to a power of 2, within [8, 128])."""
        x = jnp.asarray(x, jnp.float32)
        block = block_size or default_block(x.shape[0], self.cfg.num_experts)
        return _encode(self.params, x, self.cfg, block)

    def decode(self, codes: Codes) -> jax.Array:
        """x_hat = gate * sum_j values_j W_dec[indices_j] + b_dec: [T, d]."""
        w = self.params["w_dec"].reshape(-1, self.cfg.d)
        recon = jnp.einsum("tk,tkd->td", codes.values, w[codes.indices])
        return codes.gate[:, None] * recon + self.params["b_dec"]

    def __call__(self, x) -> jax.Array:
        """Reconstruction of raw activations x: [T, d] -> [T, d]."""
        return self.decode(self.encode(x))


def load_pretrained(path: str | Path) -> PretrainedSAE:
    """Load a directory written by `export_sae` (or `python -m launch.export`), single-file
    or sharded, whole into this host's memory."""
    path = Path(path)
    meta = json.loads((path / CONFIG).read_text())
    version = meta.get("format_version")
    if version == SINGLE_FILE_VERSION:
        return PretrainedSAE(load_file(str(path / WEIGHTS)), meta)
    if version == SHARDED_VERSION:
        return PretrainedSAE(read_sharded(path), meta)
    raise ValueError(f"{path / CONFIG}: unsupported format_version {version}")


def read_sharded(path: Path) -> dict[str, np.ndarray]:
    """Assemble every tensor of a sharded export from its parts (see sae_jax.export)."""
    entries = json.loads((path / INDEX).read_text())["tensors"]
    tensors = {name: np.empty(e["shape"], np.dtype(e["dtype"])) for name, e in entries.items()}
    filled = {name: np.zeros(e["shape"][0] if e["shape"] else 1, bool) for name, e in
              entries.items()}  # fmt: skip
    by_file: dict[str, list[tuple[str, dict]]] = {}
    for name, entry in entries.items():
        for part in entry["parts"]:
            by_file.setdefault(part["file"], []).append((name, part))
    for file, wanted in by_file.items():
        with safe_open(str(path / file), framework="numpy") as f:
            for name, part in wanted:
                rows = slice(*part["experts"]) if "experts" in part else slice(None)
                value = f.get_tensor(name)
                if value.shape != tensors[name][rows].shape:
                    raise ValueError(f"{path / file}: {name} has shape {value.shape}, the index "
                                     f"says {tensors[name][rows].shape}")  # fmt: skip
                tensors[name][rows] = value
                filled[name][rows] = True
    missing = [name for name, done in filled.items() if not done.all()]
    if missing:
        raise ValueError(f"{path / INDEX}: no file holds part of {', '.join(missing)}")
    return tensors


def default_block(tokens: int, num_experts: int) -> int:
    """Expert block rows for T tokens over N experts: the balanced group size T / N rounded up
    to a power of 2, within [MIN_BLOCK, MAX_BLOCK] (encode then computes at most T + N * B
    rows)."""
    per_expert = max(1, -(-tokens // num_experts))
    return int(min(MAX_BLOCK, max(MIN_BLOCK, 1 << (per_expert - 1).bit_length())))


@functools.partial(jax.jit, static_argnums=2)
def _route(params: dict, x: jax.Array, cfg: SAEConfig) -> routing.Routing:
    if cfg.num_experts == 1:
        ones = jnp.ones((x.shape[0],), jnp.float32)
        return routing.Routing(ones[:, None], jnp.zeros(x.shape[0], jnp.int32), ones)
    return routing.route(x, params["w_router"], params["b_router"])


@functools.partial(jax.jit, static_argnums=(2, 3))
def _encode(params: dict, x: jax.Array, cfg: SAEConfig, block_size: int) -> Codes:
    r = _route(params, x, cfg)
    experts = ExpertParams(params["w_enc"], params["b_enc"], params["w_dec"])
    block_fn = functools.partial(encode_block, b_dec=params["b_dec"], k=cfg.k)
    values, local = blocks.grouped_apply(
        block_fn, experts, x, r.expert, num_experts=cfg.num_experts, block_size=block_size
    )
    return Codes(values, r.expert[:, None] * cfg.latents_per_expert + local, r.expert, r.gate)


def encode_block(p: ExpertParams, x: jax.Array, valid: jax.Array, *, b_dec: jax.Array, k: int):
    """TopK codes of one expert's block x [B, d]: values [B, k] (post-ReLU), local latent ids
    [B, k]. valid is unused: padding rows' codes are discarded by the caller."""
    del valid
    pre = (x - b_dec) @ p.w_enc.T + p.b_enc
    top, idx = jax.lax.top_k(pre, k)
    return jax.nn.relu(top), idx
