"""Read a sparsify directory (`cfg.json` + `sae.safetensors`, as sparsify 1.3's
`SparseCoder.save_to_disk` writes them) into the native tensors of `sae_jax.export`.

sparsify tensors: encoder.weight [d_sae, d_in], encoder.bias [d_sae], W_dec [d_sae, d_in],
b_dec [d_in]; it encodes relu((x - b_dec) W^T + b) and keeps the top k, which is the native
TopK SAE with N = 1. A trainer's save directory holds one such directory per hookpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sae_jax.interop.peer_files import read_config, read_tensors
from sae_jax.interop.sparsify_files import CONFIG, LAYOUT, WEIGHTS
from sae_jax.interop.streaming import Latents

# sparsify's tensor -> ours, as the writer lays them out
NAMES = {theirs: ours.expert if isinstance(ours, Latents) else ours
         for theirs, ours in LAYOUT.items()}  # fmt: skip
# cfg.json options that change the maths, with the value sae_jax runs
REFUSED = {"activation": "topk", "transcode": False, "skip_connection": False}


def is_sparsify_dir(path: Path) -> bool:
    """cfg.json + sae.safetensors whose cfg.json is sparsify's (our own export writes the same
    file names, with a format_version)."""
    if not ((path / CONFIG).is_file() and (path / WEIGHTS).is_file()):
        return False
    try:
        cfg = json.loads((path / CONFIG).read_text())
    except ValueError:
        return False
    return isinstance(cfg, dict) and "format_version" not in cfg and "d_in" in cfg


def hookpoint_dirs(path: Path) -> list[Path]:
    """The sparsify directories directly inside `path` (a trainer's save, one per hookpoint)."""
    if not path.is_dir() or (path / CONFIG).exists():
        return []
    return sorted(p for p in path.iterdir() if p.is_dir() and is_sparsify_dir(p))


def read_sparsify(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """(native tensors, meta) of a sparsify directory; a one-line ValueError naming the file
    for an option sae_jax does not run (groupmax, transcode, skip connection)."""
    path = Path(path)
    cfg = read_config(path / CONFIG, ("d_in", "k"))
    for key, runs in REFUSED.items():
        if cfg.get(key, runs) != runs:
            raise ValueError(f"{path / CONFIG}: {key} = {cfg[key]!r} is not supported (sae_jax "
                             f"reads sparsify SAEs with {key} = {runs!r})")  # fmt: skip
    t = read_tensors(path / WEIGHTS)
    missing = [name for name in NAMES if name not in t]
    if missing:
        raise ValueError(f"{path / WEIGHTS}: no tensor {', '.join(missing)} (a sparsify SAE "
                         "saved without its decoder?)")  # fmt: skip
    d = int(cfg["d_in"])
    m, k = t["encoder.weight"].shape[0], int(cfg["k"])
    want = {"encoder.weight": (m, d), "encoder.bias": (m,), "W_dec": (m, d), "b_dec": (d,)}
    for name, shape in want.items():
        if t[name].shape != shape:
            raise ValueError(f"{path / WEIGHTS}: {name} has shape {t[name].shape}, expected "
                             f"{shape} (d_in = {d} in cfg.json)")  # fmt: skip
    if not 0 < k <= m:
        raise ValueError(f"{path / CONFIG}: k = {k} must be in [1, {m}]")
    tensors = {ours: t[theirs] for theirs, ours in NAMES.items()}
    for name in ("w_enc", "b_enc", "w_dec"):
        tensors[name] = tensors[name][None]  # one expert
    meta = {"d": d, "num_latents": m, "num_experts": 1, "latents_per_expert": m, "k": k,
            "experts_per_token": 1, "shared_latents": 0, "shared_k": 0, "d_in": d, "d_sae": m,
            "activation": "topk", "input_scale": 1.0, "format": "sparsify",
            "source": {"format": "sparsify", "cfg": cfg}}  # fmt: skip
    return tensors, meta
