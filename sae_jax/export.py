"""Export a trained SAE as safetensors + `cfg.json`, each process writing only its own experts.

Tensors (float32; N experts, L = NUM_LATENTS / N latents each, d input dims):
    w_enc [N, L, d]   encoder rows (row l of expert i is that latent's encoder vector)
    b_enc [N, L]      encoder bias
    w_dec [N, L, d]   decoder rows
    b_dec [d]         decoder bias, subtracted from the input before encoding
    w_router [d, N], b_router [d]   only when N > 1
    router_bias [N]   only when trained with ROUTER_BIAS (loss-free balancing): added to the
                      router logits to choose each token's expert, not to its gate
    threshold [N, L]  only for ACTIVATION batchtopk, matryoshka and jumprelu: each latent's
                      inference threshold (JumpReLU: exp(log_threshold); BatchTopK and
                      Matryoshka: their BatchThreshold scalar, the same for every latent);
                      a latent is active where pre > threshold, at most k' per token
                      (BatchTopK and Matryoshka: where gate x pre > threshold, their
                      threshold being on gated values; at N = 1 the gate is 1)
The training input scale s (model input = s * raw activation) is folded in, so the tensors
apply to raw activations with the equations of README.md; decoder rows then have norm 1/s.

Two forms; `sae_jax.load_pretrained` reads both.

- Single file (cfg.json format_version 1): `sae.safetensors` holds every tensor whole. Written
  when one process holds all the parameters and they total at most `max_file_bytes`
  (default DEFAULT_MAX_FILE_BYTES = 4 GiB).
- Sharded (format_version 2), otherwise: with F files, `sae-00000-of-0000F.safetensors` holds
  the replicated tensors (b_dec, w_router, b_router, router_bias) and each further
  `sae-0000i-of-0000F.safetensors` holds w_enc, b_enc, w_dec (and threshold) of one
  contiguous range of experts [a, b) (first axis b - a long; the file's safetensors metadata
  has "experts": "a:b" and "process", the index of the process that wrote it), at most
  max_file_bytes of them. `sae.safetensors.index.json` gives each
  tensor's full shape and where its parts are:

      {"format_version": 2, "files": ["sae-00000-of-00003.safetensors", ...],
       "tensors": {"w_enc": {"shape": [N, L, d], "dtype": "float32", "parts": [
                       {"file": "sae-00001-of-00003.safetensors", "experts": [0, 4]}, ...]},
                   "b_dec": {"shape": [d], "dtype": "float32", "parts": [
                       {"file": "sae-00000-of-00003.safetensors"}]}, ...}}

  Expert ranges follow the devices' shards: each process writes the ranges its own devices
  hold (one copy each, from the shard with replica_id 0) and no process gathers another's
  experts; process 0 writes the replicated tensors, the index and cfg.json.

cfg.json keys: format_version, d, num_latents, num_experts, latents_per_expert, k,
activation (SAEConfig.activation; an export written before it is 'topk'), k_max
(SAEConfig.k_max, from which k' = SAEConfig.candidates_per_row of the threshold kinds
follows), input_scale (the folded s), source (free-form provenance); also d_in (= d) and d_sae
(= num_latents), the names SAELens and sparsify use (exports written before them load too).
It is written last, and removed first when a directory is exported again: a directory
without cfg.json is not (yet) an export.
Files are written with mode 0644.

out_dir may be an object-store URL (gs://...; sae_jax.storage): each safetensors file is
written to a local temporary file and uploaded whole, the JSON files in one object write
each, in the same order (cfg.json and the index deleted first, cfg.json uploaded last), so an
upload that fails part way leaves no cfg.json: nothing that loads.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from safetensors.numpy import save_file

from sae_jax import storage
from sae_jax.config import SAEConfig
from sae_jax.kernels.activations import KINDS
from sae_jax.mesh import make_mesh
from sae_jax.model.switch import scaled_encoder, unit_rows

WEIGHTS, INDEX, CONFIG = "sae.safetensors", "sae.safetensors.index.json", "cfg.json"
SINGLE_FILE_VERSION, SHARDED_VERSION = 1, 2
EXPERT_TENSORS = ("w_enc", "b_enc", "w_dec", "threshold")  # first axis: experts (where present)
DEFAULT_MAX_FILE_BYTES = 4 * 2**30
FILE_MODE = 0o644

Array = jax.Array | np.ndarray


class Part(NamedTuple):
    """One file of the sharded form: experts [start, stop), or the replicated tensors."""

    file: str
    start: int | None = None
    stop: int | None = None


def export_sae(
    params: dict[str, Array],
    cfg: SAEConfig,
    out_dir: str | Path,
    input_scale: float = 1.0,
    source: dict | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> storage.AnyPath:
    """Write the SAE to out_dir, a local directory or a URL (format in this module's
    docstring) and return out_dir.

    params: {name: array}, numpy or jax.Arrays sharded on any mesh, over several processes
    too. With several processes every one must call this (it synchronises them); each
    writes only what its own devices hold.
    """
    out = storage.path(out_dir)
    if not storage.is_url(out):
        out.mkdir(parents=True, exist_ok=True)
    params = inference_params(params)
    lead = jax.process_index() == 0
    if lead:  # from here until cfg.json is rewritten the directory is not a complete export
        for name in (CONFIG, INDEX):
            (out / name).unlink(missing_ok=True)
    _sync("sae_jax.export: start")
    total = sum(4 * math.prod(a.shape) for a in params.values())
    single = jax.process_count() == 1 and total <= max_file_bytes
    if single:
        files = [WEIGHTS]
        if lead:
            _save(out / WEIGHTS, {n: _fold(n, np.asarray(jax.device_get(a)), input_scale)
                                  for n, a in params.items()})  # fmt: skip
    else:
        parts = plan_parts(params, max_file_bytes)
        files = [p.file for p in parts]
        _write_parts(out, params, parts, input_scale)
    _sync("sae_jax.export: written")
    if lead:
        _remove_stale(out, keep=files)
        if not single:
            _write_json(out / INDEX, index(params, parts))
        version = SINGLE_FILE_VERSION if single else SHARDED_VERSION
        _write_json(out / CONFIG, _config(cfg, version, input_scale, source))
    _sync("sae_jax.export: done")
    return out


def inference_params(params: dict[str, Array]) -> dict[str, Array]:
    """The tensors as inference uses them: feature scaling folded into w_enc (enc_scale
    dropped), the shared decoder's rows at unit norm, as the model applies them, and the
    'jump' rule's thresholds [N, L] (`THRESHOLDS`)."""
    params = dict(params)
    for name, threshold in THRESHOLDS.items():
        if name in params:
            params["threshold"] = threshold(params.pop(name), params["b_enc"])
    if "enc_scale" in params:
        scale = params.pop("enc_scale")
        params["w_enc"] = jax.jit(scaled_encoder)(params["w_enc"], scale)
    if "shared_w_dec" in params:
        params["shared_w_dec"] = jax.jit(unit_rows)(params["shared_w_dec"])
    return params


def _exp_threshold(log_threshold: Array, b_enc: Array) -> Array:
    """JumpReLU's thresholds exp(log_threshold) [N, L], sharded as log_threshold."""
    del b_enc
    return jax.jit(jnp.exp)(log_threshold)


def _every_latent(threshold: Array, b_enc: Array) -> Array:
    """BatchTopK's scalar inference threshold [] as the threshold of every latent [N, L],
    sharded as b_enc (each device makes its own shard: nothing is gathered)."""
    if not isinstance(b_enc, jax.Array):
        return np.full(b_enc.shape, np.asarray(threshold), np.float32)
    fill = jax.jit(lambda t: jnp.full(b_enc.shape, t, jnp.float32), out_shardings=b_enc.sharding)
    return fill(threshold)


# model variable -> (it, b_enc [N, L]) -> the thresholds [N, L] the export holds
THRESHOLDS = {"log_threshold": _exp_threshold, "batch_threshold": _every_latent}


def plan_parts(params: dict[str, Array], max_file_bytes: int) -> list[Part]:
    """The files of the sharded form: the replicated tensors, then the expert ranges of the
    devices' shards of w_enc, each cut into pieces of at most max_file_bytes (one expert at
    least). The same on every process (it reads the global sharding)."""
    per_expert = 4 * sum(math.prod(params[n].shape[1:]) for n in _experts(params))
    step = max(1, max_file_bytes // per_expert)
    ranges = [
        (start, min(start + step, stop))
        for first, stop in expert_ranges(params["w_enc"])
        for start in range(first, stop, step)
    ]
    count = len(ranges) + 1
    names = [f"sae-{i:05d}-of-{count:05d}.safetensors" for i in range(count)]
    return [Part(names[0])] + [Part(f, a, b) for f, (a, b) in zip(names[1:], ranges, strict=True)]


def expert_ranges(a: Array) -> list[tuple[int, int]]:
    """The distinct [start, stop) ranges of the first axis over all devices' shards of `a`
    (one range for a numpy array or an unsplit one)."""
    n = a.shape[0]
    if not isinstance(a, jax.Array):
        return [(0, n)]
    ranges = set()
    for index in a.sharding.devices_indices_map(a.shape).values():
        if any(s != slice(None) and (s.start, s.stop) != (0, dim)
               for s, dim in zip(index[1:], a.shape[1:], strict=True)):  # fmt: skip
            raise ValueError("export: expert tensors may be split over the expert axis only")
        ranges.add((index[0].start or 0, n if index[0].stop is None else index[0].stop))
    return sorted(ranges)


def index(params: dict[str, Array], parts: list[Part]) -> dict:
    """The sharded form's index: each tensor's full shape and the files of its parts."""
    tensors = {}
    for name, a in params.items():
        if name in EXPERT_TENSORS:
            places = [{"file": p.file, "experts": [p.start, p.stop]} for p in parts[1:]]
        else:
            places = [{"file": parts[0].file}]
        tensors[name] = {"shape": list(a.shape), "dtype": "float32", "parts": places}
    return {"format_version": SHARDED_VERSION, "files": [p.file for p in parts],
            "tensors": tensors}  # fmt: skip


def export_mesh(num_experts: int) -> Mesh:
    """A mesh over every device whose 'expert' axis divides N, to restore parameters onto:
    each device, and so each process, then holds only its share of the experts."""
    experts = math.gcd(num_experts, jax.device_count())
    return make_mesh((jax.device_count() // experts, experts))


def _write_parts(
    out: storage.AnyPath, params: dict[str, Array], parts: list[Part], scale: float
) -> None:
    """Write the parts this process owns: an expert range whose w_enc shard with replica_id 0
    is on one of its devices, and (process 0) the replicated tensors."""
    if jax.process_index() == 0:
        shared = {n: _fold(n, _replica(a), scale) for n, a in params.items()
                  if n not in EXPERT_TENSORS}  # fmt: skip
        _save(out / parts[0].file, shared)
    for part in parts[1:]:
        if _local_rows(params["w_enc"], part, first_replica=True) is None:
            continue  # another process writes it
        tensors = {}
        for name in _experts(params):
            rows = _local_rows(params[name], part, first_replica=False)
            if rows is None:
                raise ValueError(f"export: {name} experts {part.start}:{part.stop} are not on "
                                 "the devices that hold w_enc's")  # fmt: skip
            tensors[name] = _fold(name, rows, scale)
        meta = {"experts": f"{part.start}:{part.stop}", "process": str(jax.process_index())}
        _save(out / part.file, tensors, meta)


def _experts(params: dict[str, Array]) -> tuple[str, ...]:
    """The expert tensors (EXPERT_TENSORS) these parameters hold."""
    return tuple(n for n in EXPERT_TENSORS if n in params)


def _local_rows(a: Array, part: Part, first_replica: bool) -> np.ndarray | None:
    """a[part.start:part.stop] from a shard on this process's devices, or None."""
    if not isinstance(a, jax.Array):
        return a[part.start : part.stop] if jax.process_index() == 0 else None
    for shard in a.addressable_shards:
        lo = shard.index[0].start or 0
        hi = a.shape[0] if shard.index[0].stop is None else shard.index[0].stop
        if lo <= part.start and part.stop <= hi and (shard.replica_id == 0 or not first_replica):
            return np.asarray(shard.data[part.start - lo : part.stop - lo])
    return None


def _replica(a: Array) -> np.ndarray:
    """A replicated array's value from this process's first device."""
    return np.asarray(a.addressable_data(0) if isinstance(a, jax.Array) else a)


def _fold(name: str, a: np.ndarray, s: float) -> np.ndarray:
    """Fold the input scale s into one tensor (or any slice of it along the expert axis)."""
    a = np.asarray(a, np.float32)
    if name in ("w_enc", "w_router", "shared_w_enc"):
        return a * s
    if name in ("w_dec", "b_dec", "b_router", "shared_w_dec"):
        return a / s
    # b_enc; threshold (compared with the pre-activations, which the fold leaves unchanged:
    # (s W_enc)(x - b_dec / s) + b_enc = W_enc (s x - b_dec) + b_enc); router_bias (added to
    # the logits, which the fold leaves unchanged too)
    return a


def _config(cfg: SAEConfig, version: int, scale: float, source: dict | None) -> dict:
    return {
        "format_version": version,
        "d": cfg.d,
        "num_latents": cfg.num_latents,
        "num_experts": cfg.num_experts,
        "latents_per_expert": cfg.latents_per_expert,
        "k": cfg.k,
        "activation": cfg.activation,
        "k_max": cfg.k_max,
        "experts_per_token": cfg.experts_per_token,
        "shared_latents": cfg.shared_latents,
        "shared_k": cfg.shared_k,
        "d_in": cfg.d,
        "d_sae": cfg.num_latents,
        "input_scale": float(scale),
        "source": source or {},
    }


def config_of(meta: dict) -> SAEConfig:
    """The SAEConfig of an SAE's cfg.json (ours, or a peer's as sae_jax reads it), as far as
    inference needs it: an activation sae_jax's model has not (a peer's relu) reads as topk."""
    activation = meta.get("activation", "topk")
    return SAEConfig(
        d=meta["d"], num_latents=meta["num_latents"], num_experts=meta["num_experts"],
        k=meta["k"], k_aux=0, experts_per_token=meta.get("experts_per_token", 1),
        shared_latents=meta.get("shared_latents", 0), shared_k=meta.get("shared_k", 0),
        activation=activation if activation in KINDS else "topk", k_max=meta.get("k_max", 0),
    ).validate()  # fmt: skip


def per_row(cfg: SAEConfig) -> int:
    """The codes a routed row keeps at inference: K - SHARED_K for TopK, k' =
    cfg.candidates_per_row for a threshold (as switch.expert_settings in mode 'infer')."""
    return cfg.routed_k if cfg.kind.infer_rule == "topk" else cfg.candidates_per_row


def _remove_stale(out: storage.AnyPath, keep: list[str]) -> None:
    """Weight files of an earlier export of the other form or another file count."""
    for path in [out / WEIGHTS, *out.glob("sae-*-of-*.safetensors")]:
        if path.name not in keep:
            path.unlink(missing_ok=True)


def _save(path: storage.AnyPath, tensors: dict[str, np.ndarray],
          metadata: dict | None = None) -> None:  # fmt: skip
    """One safetensors file; to a URL through a local temporary file, uploaded whole."""
    if not storage.is_url(path):
        save_file(tensors, str(path), metadata=metadata)
        _sort_metadata(path)
        os.chmod(path, FILE_MODE)  # safetensors creates files as 0600
        return
    with tempfile.TemporaryDirectory(prefix="sae_jax-export-") as tmp:
        local = os.path.join(tmp, path.name)
        save_file(tensors, local, metadata=metadata)
        _sort_metadata(local)
        fs, target = storage.filesystem(path)
        fs.put_file(local, target)


def _sort_metadata(path: str | Path) -> None:
    """Rewrite a safetensors file's header with its metadata keys sorted: safetensors writes
    them in a hash map's order, which changes from one process to the next, so the same
    export would not be the same bytes twice. The header keeps its length (the same keys and
    values), so nothing after it moves."""
    with open(path, "r+b") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        if len(header.get("__metadata__") or {}) < 2:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:
            raise AssertionError(f"{path}: the re-serialised safetensors header grew")
        f.seek(8)
        f.write(text.ljust(size))


def _write_json(path: storage.AnyPath, value: dict) -> None:
    text = json.dumps(value, indent=1) + "\n"
    if storage.is_url(path):
        storage.write_atomic(path, text)
        return
    path.write_text(text)
    os.chmod(path, FILE_MODE)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
