"""Write a native export as a SAELens 6 directory: `cfg.json` + `sae_weights.safetensors`
(float32: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]).

- A plain SAE (N = 1, e = 1, no shared dictionary) is one of SAELens's own architectures
  (PLAIN): "topk" for ACTIVATION topk, "jumprelu" (threshold [d_sae]) for jumprelu,
  batchtopk and matryoshka, the form SAELens itself saves BatchTopK and Matryoshka SAEs in
  for inference (their threshold for every latent). `sae_lens.SAE.load_from_disk(DIR)` opens
  it with nothing of ours installed. SAELens's JumpReLU keeps every latent over its
  threshold: ours keeps at most k' = SAEConfig.candidates_per_row per token, so a token with
  more than k' over threshold has more latents there (none with k_max = the latents).
- Anything else is architecture "switch" (`import sae_jax.interop.saelens` registers it):
  d_sae = NUM_LATENTS + SHARED_LATENTS, expert i's latents at columns (W_enc) and rows
  (W_dec) [i L, (i + 1) L), the shared dictionary's at [M, M + S) (the global latent ids of
  `Codes.indices`), plus W_router [d_in, N], b_router [d_in] (N > 1) and router_bias [N]
  (trained with ROUTER_BIAS), threshold [d_sae] (the threshold kinds; 0 for the shared
  latents, a TopK), and cfg keys num_experts, k, experts_per_token, shared_latents,
  shared_k, activation, k_max and candidates_per_row (k', as ours).

The input scale and feature scaling are folded in already (the native export's tensors apply
to raw activations). metadata carries the dump's model, hook and context where the export's
source names them, and {"sae_jax": {"input_scale", "source"}} (with "activation", "k" and
"k_max" for the threshold kinds, so that `load_pretrained` reads back the same SAE).
"""

from __future__ import annotations

import json
from pathlib import Path

from sae_jax import storage
from sae_jax.export import config_of, per_row
from sae_jax.interop.hooks import hook_names
from sae_jax.interop.native_reader import DEFAULT_BLOCK_BYTES, NativeExport
from sae_jax.interop.streaming import Latents, begin_directory, finish_directory, write_layout

CONFIG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
FORMAT_VERSION = "6.0.0"  # the SAELens config layout written (metadata.sae_lens_version)
LATENTS = {
    "W_enc": Latents("w_enc", "shared_w_enc", latents_last=True),
    "b_enc": Latents("b_enc", "shared_b_enc"),
    "W_dec": Latents("w_dec", "shared_w_dec"),
    "threshold": Latents("threshold", None),  # the threshold kinds only
}
WHOLE = {"b_dec": "b_dec", "W_router": "w_router", "b_router": "b_router",
         "router_bias": "router_bias"}  # fmt: skip
DUMP_KEYS = ("model", "layer", "seq_len")  # a dump manifest's source names some of these


def write_saelens(native: str | Path, out: str | Path,
                  block_bytes: int = DEFAULT_BLOCK_BYTES) -> Path:  # fmt: skip
    """Convert the native export directory `native` into the SAELens directory `out`,
    expert block by expert block; returns out."""
    export = NativeExport(native)
    config = saelens_config(export.meta)
    out = begin_directory(out, CONFIG)
    latents = {t: n for t, n in LATENTS.items() if n.expert in export}
    layout = {**latents, **{t: n for t, n in WHOLE.items() if n in export}}
    write_layout(export, layout, out / WEIGHTS, block_bytes)
    return finish_directory(out, CONFIG, config)


def is_plain(meta: dict) -> bool:
    """N = 1, one expert per token, no shared dictionary: one of SAELens's own (PLAIN)."""
    return (meta["num_experts"] == 1 and meta.get("experts_per_token", 1) == 1
            and not meta.get("shared_latents", 0))  # fmt: skip


def architecture(meta: dict) -> str:
    """The SAELens architecture of a native export's cfg.json."""
    return PLAIN[meta.get("activation", "topk")] if is_plain(meta) else "switch"


def saelens_config(meta: dict) -> dict:
    """SAELens 6's cfg.json for a native export's cfg.json."""
    shared = meta.get("shared_latents", 0)
    arch = architecture(meta)
    config = {
        "architecture": arch,
        "d_in": meta["d"],
        "d_sae": meta["num_latents"] + shared,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": saelens_metadata(meta),
    }
    return {**config, **ARCHITECTURE_KEYS[arch](meta)}


def _topk_keys(meta: dict) -> dict:
    return {"k": meta["k"], "rescale_acts_by_decoder_norm": False}


def _switch_keys(meta: dict) -> dict:
    activation = meta.get("activation", "topk")
    return {
        "k": meta["k"],
        "num_experts": meta["num_experts"],
        "experts_per_token": meta.get("experts_per_token", 1),
        "shared_latents": meta.get("shared_latents", 0),
        "shared_k": meta.get("shared_k", 0),
        "activation": activation,
        "k_max": meta.get("k_max", 0),
        "candidates_per_row": per_row(config_of(meta)),
    }


# ACTIVATION of a plain SAE -> its SAELens architecture
PLAIN = {"topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu", "matryoshka": "jumprelu"}
# SAELens architecture -> its own cfg.json keys
ARCHITECTURE_KEYS = {"topk": _topk_keys, "jumprelu": lambda meta: {}, "switch": _switch_keys}


def saelens_metadata(meta: dict) -> dict:
    """Model, hook and context of the dump the SAE was trained on (None where unknown)."""
    source = meta.get("source") or {}
    dump = dump_source(source)
    layer, seq_len = dump.get("layer"), dump.get("seq_len")
    texts = dump.get("text_files")
    return {
        "sae_lens_version": FORMAT_VERSION,
        "model_name": dump.get("model"),
        "hook_name": None if layer is None else hook_names(int(layer)).transformer_lens,
        "hook_head_index": None,
        "context_size": seq_len,
        "prepend_bos": None if seq_len is None else True,  # the dumper always prepends BOS
        "dataset_path": ",".join(map(str, texts)) if texts else None,
        "sae_jax": {
            "input_scale": meta.get("input_scale", 1.0),
            "source": source,
            **_kind(meta),
        },  # fmt: skip
    }


def _kind(meta: dict) -> dict:
    """The threshold kinds' activation, k and k_max (nothing for TopK, as before them)."""
    if meta.get("activation", "topk") == "topk":
        return {}
    return {"activation": meta["activation"], "k": meta["k"], "k_max": meta.get("k_max", 0)}


def dump_source(source: dict) -> dict:
    """The dump manifest's source behind an export's source: the source itself where it names
    the model, layer or context; else the manifest of the run's train_data directory, where
    that still exists; else {}."""
    if any(key in source for key in DUMP_KEYS):
        return source
    train_data = source.get("train_data")
    manifest = storage.path(train_data) / "manifest.json" if isinstance(train_data, str) else None
    if manifest is None or not manifest.is_file():
        return {}
    try:
        found = json.loads(manifest.read_text()).get("source") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    return found if isinstance(found, dict) else {}
