"""Load an exported SAE (either form of `sae_jax.export`, or a peer's SAELens or sparsify
directory: `sae_jax.interop.readers`) and run it for inference.

Inference runs on one host, which holds the whole SAE. Encoding sorts tokens by their routed
expert and runs each expert on blocks of its own tokens (`sae_jax.dispatch.blocks`), so the encoder
work is that of at most T + N * B rows, not N * T.

Activation kinds (meta "activation", a row of ACTIVATIONS): "topk" (ours, sparsify's, SAELens's
topk), "relu" (SAELens standard), and the threshold kinds "jumprelu", "batchtopk" and
"matryoshka" (ours, SAELens jumprelu and batchtopk): pre if pre > threshold [N, L] else 0, as
`SwitchSAE(..., mode='infer')` computes it (ours of batchtopk and matryoshka: threshold / gate,
theirs being on gated values). relu has no fixed number of active latents per
token, nor have the threshold kinds: of each token's routed expert they keep at most k' =
SAEConfig.candidates_per_row latents (the k' largest pre - threshold), [..., k'] codes with zeros
after a token's own active latents. A single dictionary whose k' is all its latents (relu, a
peer's jumprelu) gives instead, for every token, the batch's largest active count rounded up to
a power of 2, so no active latent is dropped and the codes stay narrow.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from safetensors import safe_open

from sae_jax import storage
from sae_jax.config import SAEConfig
from sae_jax.dispatch import blocks
from sae_jax.export import (
    CONFIG,
    INDEX,
    SHARDED_VERSION,
    SINGLE_FILE_VERSION,
    WEIGHTS,
    config_of,
    per_row,
)
from sae_jax.interop.readers import read_peer
from sae_jax.kernels import routing
from sae_jax.kernels.activations import KINDS
from sae_jax.kernels.expert import ExpertParams, row_thresholds, thresholds_at

MAX_BLOCK = 128  # rows per expert block at most (encode's default block size)
MIN_BLOCK = 8
MIN_BUCKET = 128  # encode pads the token count to bucket(T) >= this


class Codes(NamedTuple):
    values: jax.Array  # [..., k] latent activations (>= 0)
    indices: jax.Array  # [..., k] global latent ids in [0, NUM_LATENTS): expert * L + local id
    # (a shared dictionary's latents follow: NUM_LATENTS + its id)
    expert: jax.Array  # [...] routed expert (with several per token: the most probable)
    gate: jax.Array  # [...] router probability of that expert (1 when N = 1)
    # [..., k] the router probability of each latent's own expert (1 for shared latents),
    # with several experts per token or a shared dictionary; None: `gate` for every latent.
    latent_gate: jax.Array | None = None


class PretrainedSAE:
    """A loaded SAE for inference on one device: route, encode, decode, reconstruct.

    Accepts numpy or JAX float arrays [..., d] of raw activations ([tokens, d], [batch, seq, d],
    or one token [d]); returns JAX arrays with the same leading axes. No capacity limit
    applies: every token runs its routed expert. The token count is padded to a bucket size
    (`bucket`), so a stream of batches of varying lengths compiles only a few times.
    """

    def __init__(self, tensors: dict[str, np.ndarray], meta: dict, path: str | Path | None = None):
        self.meta = meta
        self.path = None if path is None else str(path)
        self.activation = meta.get("activation", "topk")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not one of "
                             f"{', '.join(ACTIVATIONS)}")  # fmt: skip
        self.cfg = config_of(meta)
        one = self.cfg.num_experts == 1 and not self.cfg.shared_latents
        if ACTIVATIONS[self.activation].codes is _dense_codes and not one:
            raise ValueError(f"activation {self.activation!r} runs a single dictionary (N = 1, "
                             "no shared latents)")  # fmt: skip
        if self.activation in KINDS and self.activation != "topk" and "threshold" not in tensors:
            raise ValueError(f"activation {self.activation!r} needs a threshold tensor")
        self.params = {k: jnp.asarray(v) for k, v in tensors.items()}

    def __repr__(self) -> str:
        c = self.cfg
        where = "" if self.path is None else f", path={self.path!r}"
        sparsity = f"k={c.k}" if self.activation == "topk" else f"activation={self.activation!r}"
        return (f"PretrainedSAE(d={c.d}, num_latents={c.num_latents}, "
                f"num_experts={c.num_experts}, {sparsity}{where})")  # fmt: skip

    def route(self, x) -> routing.Routing:
        """Router probabilities [..., N], routed expert [...] and gate [...]."""
        x, lead = self._tokens(x)
        r = _route(self.params, _pad(x), self.cfg)
        return routing.Routing(*(None if a is None else _unpad(a, lead) for a in r))

    def encode(self, x, block_size: int | None = None) -> Codes:
        """Top-k codes of x [..., d] in each token's routed expert: values and indices
        [..., k], expert and gate [...]. block_size: rows per expert block (default: T / N
        rounded up to a power of 2, within [8, 128], for T the padded token count).
        relu / jumprelu SAEs: every active latent, k the batch's most active latents per token
        rounded up to a power of 2 (values 0 beyond a token's own); threshold kinds: each
        token's at most k' = cfg.candidates_per_row latents over threshold in its expert(s),
        [..., k'] (see the module docstring)."""
        x, lead = self._tokens(x)
        codes = ACTIVATIONS[self.activation].codes(self, _pad(x), x.shape[0], block_size)
        return Codes(*(None if a is None else _unpad(a, lead) for a in codes))

    def decode(self, codes: Codes) -> jax.Array:
        """x_hat = sum_j gate_j values_j W_dec[indices_j] + b_dec: [..., d], gate_j the
        latent's own gate (codes.latent_gate) or else the token's (codes.gate)."""
        values, indices = jnp.asarray(codes.values), jnp.asarray(codes.indices)
        gate = jnp.asarray(codes.gate)
        if values.ndim == 0 or values.shape != indices.shape or gate.shape != values.shape[:-1]:
            raise ValueError(f"expected codes with values and indices of shape [..., k] and gate "
                             f"[...], got values {tuple(values.shape)}, indices "
                             f"{tuple(indices.shape)}, gate {tuple(gate.shape)}")  # fmt: skip
        lead, k = values.shape[:-1], values.shape[-1]
        if codes.latent_gate is not None:  # each latent with its own expert's gate
            gate = jnp.ones(lead, jnp.float32)
            values = values * jnp.asarray(codes.latent_gate)
        decode = ACTIVATIONS[self.activation].decode
        x_hat = decode(self.params, _pad(values.reshape(-1, k).astype(jnp.float32)),
                       _pad(indices.reshape(-1, k).astype(jnp.int32)),
                       _pad(gate.reshape(-1).astype(jnp.float32)), self.cfg)  # fmt: skip
        return _unpad(x_hat, lead)

    def __call__(self, x) -> jax.Array:
        """Reconstruction of raw activations x: [..., d] -> [..., d]."""
        return self.decode(self.encode(x))

    def _tokens(self, x) -> tuple[jax.Array, tuple[int, ...]]:
        """x [..., d] as float32 tokens [T, d], and its leading axes; a one-line ValueError
        saying the expected shape otherwise."""
        if not hasattr(x, "dtype") or not hasattr(x, "shape"):
            x = np.asarray(x)
        shape, dtype, d = tuple(x.shape), np.dtype(x.dtype), self.cfg.d
        if not jnp.issubdtype(dtype, jnp.floating) or not shape or shape[-1] != d:
            kind = "" if jnp.issubdtype(dtype, jnp.floating) else f" ({dtype})"
            raise ValueError(f"expected float activations of shape [..., {d}] (d = {d}), got "
                             f"{shape}{kind}")  # fmt: skip
        return jnp.asarray(x, jnp.float32).reshape(-1, d), shape[:-1]


def load_pretrained(path: str | Path) -> PretrainedSAE:
    """Load a directory written by `export_sae` (or `python -m launch.export`), single-file
    or sharded, whole into this host's memory. A training run's directory loads its export
    (DIR/export). A peer's SAELens or sparsify directory loads too (`sae_jax.interop`).
    `path` may be a URL (gs://...): our export is read file by file (each safetensors file
    fetched whole, one at a time); a peer's directory is downloaded to a temporary one."""
    path = storage.path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such directory")
    native = _is_native(path)
    peer = None if native else _read_peer(path)
    if peer is not None:
        return PretrainedSAE(*peer, path)
    if (path / CONFIG).exists() and not native:
        raise FileNotFoundError(f"{path}: a cfg.json without the weights of any SAE sae_jax "
                                f"reads ({WEIGHTS} of ours or sparsify, sae_weights.safetensors "
                                "of SAELens)")  # fmt: skip
    if not (path / CONFIG).exists():
        if (path / "export" / CONFIG).exists():
            path = path / "export"
        elif (path / "checkpoints").is_dir():
            raise FileNotFoundError(f"{path} is a run directory with no exported SAE; run "
                                    f"python -m launch.export --workdir {path}")  # fmt: skip
        else:
            raise FileNotFoundError(f"{path / CONFIG}: no such file; {path} is not an "
                                    "exported SAE (written by sae_jax.export_sae or "
                                    "python -m launch.export), nor a SAELens or sparsify "
                                    "directory")  # fmt: skip
    meta = json.loads((path / CONFIG).read_text())
    version = meta.get("format_version")
    if version == SINGLE_FILE_VERSION:
        with _tensor_file(path / WEIGHTS) as f:
            return PretrainedSAE({name: f.get_tensor(name) for name in f.keys()}, meta, path)
    if version == SHARDED_VERSION:
        return PretrainedSAE(read_sharded(path), meta, path)
    raise ValueError(f"{path / CONFIG}: unsupported format_version {version}")


def _is_native(path: storage.AnyPath) -> bool:
    """cfg.json with a format_version: our own export."""
    try:
        return "format_version" in json.loads((path / CONFIG).read_text())
    except (OSError, ValueError, TypeError):
        return False


def _read_peer(path: storage.AnyPath) -> tuple[dict[str, np.ndarray], dict] | None:
    """read_peer of a local directory; of a URL, of a temporary copy of it, unless it is a
    run directory (export/ or checkpoints/ in it) or has no cfg.json, at its top or one level
    down (sparsify's hookpoints). Errors name the URL, not the copy."""
    if not storage.is_url(path):
        return read_peer(path)
    if (path / "export").exists() or (path / "checkpoints").exists():
        return None
    if not (path / CONFIG).exists() and not any(path.glob(f"*/{CONFIG}")):
        return None  # no peer's directory (nor a half-written export) is downloaded
    with storage.local_copy(path) as copy:
        try:
            return read_peer(copy)
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(str(e).replace(str(copy), str(path))) from None


@contextlib.contextmanager
def _tensor_file(path: storage.AnyPath) -> Iterator:
    """A safetensors file's tensors by name (keys(), get_tensor(name)): a local file opened
    lazily; a URL's object fetched whole (one at a time: a sharded export is read shard by
    shard)."""
    if not storage.is_url(path):
        with safe_open(str(path), framework="numpy") as f:
            yield f
        return
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    yield _Tensors(safetensors.numpy.load(path.read_bytes()))


class _Tensors(dict):
    """A dict of arrays with safe_open's get_tensor."""

    def get_tensor(self, name: str) -> np.ndarray:
        return self[name]


def read_sharded(path: storage.AnyPath) -> dict[str, np.ndarray]:
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
        with _tensor_file(path / file) as f:
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


def bucket(tokens: int) -> int:
    """The padded token count for T tokens: the next of MIN_BUCKET, 1.5 x MIN_BUCKET, 2 x
    MIN_BUCKET, 3 x MIN_BUCKET, 4 x ... (powers of 2 and the midpoints between them), so at
    most a third of the rows is padding beyond MIN_BUCKET and a stream of lengths compiles
    about twice per doubling."""
    if tokens <= MIN_BUCKET:
        return MIN_BUCKET
    power = 1 << (tokens - 1).bit_length()  # the next power of 2 >= tokens
    return power * 3 // 4 if tokens <= power * 3 // 4 else power


def _pad(a: jax.Array) -> jax.Array:
    """[T, ...] -> [bucket(T), ...], zeros after the T rows. Not under a trace (inside the
    caller's jit, which compiles for each shape anyway)."""
    if isinstance(a, jax.core.Tracer):
        return a
    rows = bucket(a.shape[0]) - a.shape[0]
    return jnp.pad(a, [(0, rows)] + [(0, 0)] * (a.ndim - 1))


def _unpad(a: jax.Array, lead: tuple[int, ...]) -> jax.Array:
    """The first prod(lead) rows of a padded [P, ...] output, reshaped to [*lead, ...]."""
    return a[: math.prod(lead)].reshape(lead + a.shape[1:])


def default_block(tokens: int, num_experts: int) -> int:
    """Expert block rows for T tokens over N experts: the balanced group size T / N rounded up
    to a power of 2, within [MIN_BLOCK, MAX_BLOCK] (encode then computes at most T + N * B
    rows)."""
    per_expert = max(1, -(-tokens // num_experts))
    return int(min(MAX_BLOCK, max(MIN_BLOCK, 1 << (per_expert - 1).bit_length())))


@functools.partial(jax.jit, static_argnums=2)
def _route(params: dict, x: jax.Array, cfg: SAEConfig) -> routing.Routing:
    """As in training: an exported router_bias [N] (ROUTER_BIAS) chooses the experts with the
    logits, the gate stays the unbiased probability."""
    if cfg.num_experts == 1:
        ones = jnp.ones((x.shape[0],), jnp.float32)
        return routing.Routing(ones[:, None], jnp.zeros(x.shape[0], jnp.int32), ones)
    if "router_bias" not in params:
        return routing.route(x, params["w_router"], params["b_router"])
    r = routing.route_top(x, params["w_router"], params["b_router"], 1, params["router_bias"])
    return routing.Routing(r.probs, r.expert[:, 0], r.gate[:, 0])


@functools.partial(jax.jit, static_argnums=(3, 4))
def _encode(params: dict, x: jax.Array, tokens: jax.Array, cfg: SAEConfig, block_size: int):
    """Codes of the first `tokens` rows of x [P, d] (later rows, padding, get no expert block
    and zero codes), by the kind's inference rule (cfg.kind.infer_rule)."""
    if cfg.experts_per_token > 1 or cfg.shared_latents:
        return _encode_global(params, x, tokens, cfg, block_size)
    r = _route(params, x, cfg)
    present = jnp.arange(x.shape[0]) < tokens
    values, local = _expert_codes(params, x, r.gate, r.expert, present, cfg, block_size)
    return Codes(values, r.expert[:, None] * cfg.latents_per_expert + local, r.expert, r.gate)


def _expert_codes(params: dict, x, gate, expert, present, cfg: SAEConfig, block_size: int):
    """Each row's codes in its expert [T] by the inference rule (RULES): values [T, k] and
    local ids [T, k], k = per_row(cfg); gate [T] the rows' router probabilities (a threshold
    on gated values, the batch kinds', compares gate x pre)."""
    experts = ExpertParams(params["w_enc"], params["b_enc"], params["w_dec"],
                           params.get("threshold"))  # fmt: skip
    rule = RULES[cfg.kind.infer_rule]
    block_fn = functools.partial(rule, b_dec=params["b_dec"], k=per_row(cfg),
                                 gated=cfg.kind.batch)  # fmt: skip
    return blocks.grouped_apply(block_fn, experts, (x, gate), expert, present=present,
                                num_experts=cfg.num_experts, block_size=block_size)  # fmt: skip


def _encode_global(params: dict, x, tokens, cfg: SAEConfig, block_size: int) -> Codes:
    """Codes of a token's e experts (dispatch/global_topk.py) and the shared dictionary's
    latents (ids from NUM_LATENTS on) after them. TopK: the global TopK over the e experts'
    candidates, k values per token; a threshold rule: every row keeps its own (no selection),
    e x k' values. The shared dictionary is a TopK of SHARED_K in every kind."""
    t, e, lat = x.shape[0], cfg.experts_per_token, cfg.latents_per_expert
    if cfg.num_experts == 1:
        expert, gate = jnp.zeros((t, 1), jnp.int32), jnp.ones((t, 1), jnp.float32)
    else:
        bias = params.get("router_bias")
        r = routing.route_top(x, params["w_router"], params["b_router"], e, bias)
        expert, gate = r.expert, r.gate
    present = jnp.repeat(jnp.arange(t) < tokens, e)
    values, local = _expert_codes(params, jnp.repeat(x, e, axis=0), gate.reshape(-1),
                                  expert.reshape(-1), present, cfg, block_size)  # fmt: skip
    ids = (expert.reshape(-1)[:, None] * lat + local).reshape(t, -1)  # [T, e * k_r]
    gates = jnp.repeat(gate, per_row(cfg), axis=1)
    parts = [(values.reshape(t, -1), ids, gates)]
    if cfg.kind.infer_rule == "topk":
        _, top = jax.lax.top_k(parts[0][0] * gates, cfg.routed_k)
        parts = [tuple(jnp.take_along_axis(a, top, axis=1) for a in parts[0])]
    if cfg.shared_latents:
        pre = (x - params["b_dec"]) @ params["shared_w_enc"].T + params["shared_b_enc"]
        top_s, idx_s = jax.lax.top_k(pre, cfg.shared_k)
        parts.append((jax.nn.relu(top_s), idx_s + cfg.num_latents, jnp.ones_like(top_s)))
    values, ids, latent_gate = (jnp.concatenate(a, axis=1) for a in zip(*parts, strict=True))
    return Codes(values, ids, expert[:, 0], gate[:, 0], latent_gate)


@functools.partial(jax.jit, static_argnums=4)
def _decode(params: dict, values, indices, gate, cfg: SAEConfig) -> jax.Array:
    w = params["w_dec"].reshape(-1, cfg.d)
    if cfg.shared_latents:
        w = jnp.concatenate([w, params["shared_w_dec"]])
    recon = jnp.einsum("tk,tkd->td", values, w[indices])
    return gate[:, None] * recon + params["b_dec"]


def encode_block(p: ExpertParams, rows, valid: jax.Array, *, b_dec: jax.Array, k: int,
                 gated: bool = False):  # fmt: skip
    """TopK codes of one expert's block rows = (x [B, d], gate [B]): values [B, k]
    (post-ReLU), local latent ids [B, k]. valid, gate and gated are unused: padding rows'
    codes are discarded by the caller, and a row's TopK does not depend on its gate."""
    del valid, gated
    x, _ = rows
    pre = (x - b_dec) @ p.w_enc.T + p.b_enc
    top, idx = jax.lax.top_k(pre, k)
    return jax.nn.relu(top), idx


def jump_block(p: ExpertParams, rows, valid: jax.Array, *, b_dec: jax.Array, k: int,
               gated: bool = False):  # fmt: skip
    """The 'jump' rule's codes of one expert's block rows = (x [B, d], gate [B])
    (kernels/expert.py): of the k largest pre - threshold, pre where pre > threshold, else 0:
    values [B, k] and local latent ids [B, k]. The threshold is p.threshold [L], or with
    `gated` (a threshold on gated values) p.threshold / gate. valid is unused, as in
    `encode_block`."""
    del valid
    x, gate = rows
    pre = (x - b_dec) @ p.w_enc.T + p.b_enc
    threshold = row_thresholds(p.threshold, gate, gated)
    idx = jax.lax.top_k(pre - threshold, k)[1]
    selected = jnp.take_along_axis(pre, idx, axis=1)
    return _jumprelu(selected, thresholds_at(threshold, idx)), idx


RULES = {"topk": encode_block, "jump": jump_block}  # SAEConfig.kind.infer_rule -> block codes


def _routed_codes(sae: PretrainedSAE, x: jax.Array, tokens: int, block_size: int | None) -> Codes:
    """Codes of the first `tokens` rows of the padded x [P, d] (routed, blocked)."""
    block = block_size or default_block(x.shape[0], sae.cfg.num_experts)
    return _encode(sae.params, x, jnp.int32(tokens), sae.cfg, block)


def _threshold_codes(sae: PretrainedSAE, x: jax.Array, tokens: int,
                     block_size: int | None) -> Codes:  # fmt: skip
    """The threshold kinds' codes: routed, at most k' per row; a single dictionary whose k'
    is all its latents (a peer's jumprelu): every active latent, narrow (`_dense_codes`)."""
    if _every_latent(sae.cfg):
        return _dense_codes(sae, x, tokens, block_size)
    return _routed_codes(sae, x, tokens, block_size)


def _threshold_decode(params: dict, values, indices, gate, cfg: SAEConfig) -> jax.Array:
    """Decode the threshold kinds' codes: wide ones (`_every_latent`) through the dense
    [P, M] codes, narrow ones by their rows."""
    decode = _decode_dense if _every_latent(cfg) else _decode
    return decode(params, values, indices, gate, cfg)


def _every_latent(cfg: SAEConfig) -> bool:
    """One dictionary (N = 1, no shared one) whose codes may hold every latent (k' = L)."""
    one = cfg.num_experts == 1 and not cfg.shared_latents
    return one and per_row(cfg) == cfg.latents_per_expert


def _dense_codes(sae: PretrainedSAE, x: jax.Array, tokens: int, block_size: int | None) -> Codes:
    """Every active latent of the first `tokens` rows of x [P, d]: values, indices [P, w], w
    the most active latents of a row rounded up to a power of 2 (one host sync per call; few
    compiles). block_size is unused (one dictionary)."""
    del block_size
    acts, most = _dense_acts(sae.params, x, jnp.int32(tokens), sae.activation)
    width = sae.cfg.num_latents  # inside the caller's jit: every latent
    if not isinstance(most, jax.core.Tracer):
        width = min(width, 1 << (max(int(most), 1) - 1).bit_length())
    values, indices = _top_active(acts, width)
    rows = x.shape[0]
    return Codes(values, indices, jnp.zeros(rows, jnp.int32), jnp.ones(rows, jnp.float32))


@functools.partial(jax.jit, static_argnums=3)
def _dense_acts(params: dict, x: jax.Array, tokens: jax.Array, kind: str):
    """Activations [P, M] of a one-dictionary SAE (rows from `tokens` on zero), and the most
    active latents of any row."""
    pre = (x - params["b_dec"]) @ params["w_enc"][0].T + params["b_enc"][0]
    acts = ACTIVATIONS[kind].function(pre, params)
    acts = jnp.where((jnp.arange(x.shape[0]) < tokens)[:, None], acts, 0.0)
    return acts, jnp.max(jnp.sum(acts > 0, axis=1))


@functools.partial(jax.jit, static_argnums=1)
def _top_active(acts: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
    return jax.lax.top_k(acts, width)


@functools.partial(jax.jit, static_argnums=4)
def _decode_dense(params: dict, values, indices, gate, cfg: SAEConfig) -> jax.Array:
    """gate * (codes scattered to [P, M]) @ W_dec + b_dec: no [P, k, d] gather for a wide k."""
    rows = jnp.arange(values.shape[0])[:, None]
    dense = jnp.zeros((values.shape[0], cfg.num_latents), jnp.float32).at[rows, indices].add(values)
    return gate[:, None] * (dense @ params["w_dec"][0]) + params["b_dec"]


def _jumprelu(pre: jax.Array, threshold: jax.Array) -> jax.Array:
    """pre where pre > threshold (and > 0), else 0 (elementwise, broadcasting)."""
    return jnp.where(pre > threshold, jax.nn.relu(pre), 0.0)


class Activation(NamedTuple):
    codes: Callable  # (sae, padded x [P, d], tokens, block_size) -> Codes of [P] rows
    decode: Callable  # (params, values [P, k], indices [P, k], gate [P], cfg) -> [P, d]
    function: Callable | None = None  # one-dictionary kinds: (pre [P, M], params) -> [P, M]


_THRESHOLD = Activation(
    _threshold_codes, _threshold_decode, lambda pre, params: _jumprelu(pre, params["threshold"][0])
)
ACTIVATIONS: dict[str, Activation] = {
    "topk": Activation(_routed_codes, _decode),
    "relu": Activation(_dense_codes, _decode_dense, lambda pre, params: jax.nn.relu(pre)),
    "jumprelu": _THRESHOLD,
    "batchtopk": _THRESHOLD,
    "matryoshka": _THRESHOLD,
}
