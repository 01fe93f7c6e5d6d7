"""Write a native export as a sparsify 1.3 directory: `cfg.json` + `sae.safetensors`, what
`sparsify.SparseCoder.save_to_disk` writes (float32: encoder.weight [d_sae, d_in],
encoder.bias [d_sae], W_dec [d_sae, d_in], b_dec [d_in]; cfg.json holds the
SparseCoderConfig fields and d_in). `sparsify.Sae.load_from_disk(DIR)` opens it.

sparsify's sparse coder is one TopK SAE: only a plain TopK export (ACTIVATION topk, N = 1,
e = 1, no shared dictionary) converts. The input scale is folded in (the tensors apply to raw
activations).
"""

from __future__ import annotations

from pathlib import Path

from sae_jax.interop.native_reader import DEFAULT_BLOCK_BYTES, NativeExport
from sae_jax.interop.streaming import Latents, begin_directory, finish_directory, write_layout

CONFIG, WEIGHTS = "cfg.json", "sae.safetensors"
LAYOUT = {
    "encoder.weight": Latents("w_enc", None),
    "encoder.bias": Latents("b_enc", None),
    "W_dec": Latents("w_dec", None),
    "b_dec": "b_dec",
}


def write_sparsify(native: str | Path, out: str | Path,
                   block_bytes: int = DEFAULT_BLOCK_BYTES) -> Path:  # fmt: skip
    """Convert the native export directory `native` into the sparsify directory `out`,
    expert block by expert block; returns out. A one-line ValueError for an SAE sparsify
    cannot express."""
    export = NativeExport(native)
    check_sparsify(export.meta, export.path)
    config = sparsify_config(export.meta)
    out = begin_directory(out, CONFIG)
    write_layout(export, LAYOUT, out / WEIGHTS, block_bytes)
    return finish_directory(out, CONFIG, config)


def check_sparsify(meta: dict, where: str | Path = "the SAE") -> None:
    """A one-line ValueError unless the SAE is a plain TopK SAE (ACTIVATION topk, N = 1, e = 1,
    no shared dictionary)."""
    activation = meta.get("activation", "topk")
    if activation != "topk":
        raise ValueError(f"{where}: sparsify holds a TopK SAE only; this one has ACTIVATION = "
                         f"{activation!r}; use --format saelens")  # fmt: skip
    n, e, s = meta["num_experts"], meta.get("experts_per_token", 1), meta.get("shared_latents", 0)
    if n > 1 or e > 1 or s:
        raise ValueError(f"{where}: sparsify holds a plain TopK SAE only (NUM_EXPERTS = 1, no "
                         f"shared dictionary); this one has NUM_EXPERTS = {n}, EXPERTS_PER_TOKEN "
                         f"= {e}, SHARED_LATENTS = {s}; use --format saelens")  # fmt: skip


def sparsify_config(meta: dict) -> dict:
    """sparsify's cfg.json (SparseCoderConfig.to_dict() and d_in) for a native cfg.json."""
    return {
        "activation": "topk",
        "expansion_factor": max(1, meta["num_latents"] // meta["d"]),
        "normalize_decoder": True,  # as trained: unit decoder rows (before the input scale)
        "num_latents": meta["num_latents"],
        "k": meta["k"],
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": meta["d"],
    }
