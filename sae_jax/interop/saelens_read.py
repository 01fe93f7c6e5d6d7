"""Read a SAELens 6 directory (`cfg.json` + `sae_weights.safetensors`, as `SAE.save_model` and
`TrainingSAE.save_inference_model` write it) into the native tensors of `sae_jax.export`.

SAELens tensors: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in], and per
architecture threshold [d_sae] (jumprelu; switch of a threshold kind), topk_threshold []
(batchtopk training save), W_router [d_in, N], b_router [d_in], router_bias [N] (switch, our
own SAELens export: expert i's latents at [i L, (i + 1) L), a shared dictionary's at
[M, M + S)). Native: w_enc, w_dec
[N, L, d], b_enc [N, L], b_dec [d] (threshold [N, L]); a peer's SAE reads as N = 1 with one of
the activation kinds of `sae_jax.pretrained` (topk, relu, jumprelu); one of ours (our SAELens
export) with its own (a threshold kind's activation, k and k_max from metadata.sae_jax, or the
switch cfg). Options that change the maths and fold exactly into the weights are folded; the
others are refused in one line.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from sae_jax.interop.peer_files import read_config, read_tensors
from sae_jax.interop.saelens_files import CONFIG, WEIGHTS, WHOLE

BASE_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")

Tensors = dict[str, np.ndarray]


def is_saelens_dir(path: Path) -> bool:
    return (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def read_saelens(path: str | Path) -> tuple[Tensors, dict]:
    """(native tensors, meta) of a SAELens directory; a one-line ValueError naming the file
    for an architecture or option sae_jax does not run."""
    path = Path(path)
    cfg = read_config(path / CONFIG, ("d_in", "d_sae"))
    arch = cfg.get("architecture")
    if arch is None:
        raise ValueError(f"{path / CONFIG}: no architecture (a SAELens config from before 6.0? "
                         "load it with SAELens 6 and save it again)")  # fmt: skip
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path / CONFIG}: SAELens architecture {arch!r} is not supported "
                         f"(sae_jax reads {', '.join(ARCHITECTURES)})")  # fmt: skip
    _check_options(path / CONFIG, cfg)
    t = read_tensors(path / WEIGHTS)
    if "log_threshold" in t:  # JumpReLU saves from before SAELens stored the threshold itself
        t["threshold"] = np.exp(t.pop("log_threshold"))
    _check_shapes(path / WEIGHTS, t, int(cfg["d_in"]), int(cfg["d_sae"]))
    if not cfg.get("apply_b_dec_to_input", True):
        # x W + b = (x - b_dec) W + (b + b_dec W): the native encoder always centres
        t["b_enc"] = (t["b_enc"] + t["b_dec"].astype(np.float64) @ t["W_enc"]).astype(np.float32)
    tensors, meta = ARCHITECTURES[arch](path, cfg, t)
    sae_jax = cfg.get("metadata", {}).get("sae_jax", {})
    source = sae_jax.get("source") or {"format": "saelens", "architecture": arch,
                                       "metadata": cfg.get("metadata", {})}  # fmt: skip
    if cfg.get("reshape_activations", "none") == "hook_z":
        source = source | {"reshape_activations": "hook_z"}  # inputs: heads flattened
    return tensors, meta | {"input_scale": float(sae_jax.get("input_scale", 1.0)),
                            "source": source, "format": "saelens"}  # fmt: skip


def _check_options(where: Path, cfg: dict) -> None:
    norm = cfg.get("normalize_activations", "none")
    if norm == "expected_average_only_in":
        raise ValueError(f"{where}: normalize_activations is expected_average_only_in, whose "
                         "scaling factor is not in the directory; fold it into the weights "
                         "(sae.fold_activation_norm_scaling_factor) and save again")  # fmt: skip
    if norm != "none":
        raise ValueError(f"{where}: normalize_activations {norm!r} is not supported (only "
                         "'none'; it does not fold into the weights)")  # fmt: skip
    reshape = cfg.get("reshape_activations", "none")
    if reshape not in ("none", "hook_z"):
        raise ValueError(f"{where}: reshape_activations {reshape!r} is not supported")


def _check_shapes(where: Path, t: Tensors, d: int, m: int) -> None:
    want = {"W_enc": (d, m), "b_enc": (m,), "W_dec": (m, d), "b_dec": (d,), "threshold": (m,)}
    for name in BASE_TENSORS:
        if name not in t:
            raise ValueError(f"{where}: no tensor {name} (holds {', '.join(sorted(t))})")
    for name, shape in want.items():
        if name in t and t[name].shape != shape:
            raise ValueError(f"{where}: {name} has shape {t[name].shape}, cfg.json's d_in = "
                             f"{d} and d_sae = {m} say {shape}")  # fmt: skip


def _one_expert(t: Tensors, activation: str, k: int, **extra: np.ndarray) -> tuple[Tensors, dict]:
    """A single-dictionary SAE in the native layout (N = 1)."""
    d, m = t["W_enc"].shape
    tensors = {"w_enc": np.ascontiguousarray(t["W_enc"].T)[None], "b_enc": t["b_enc"][None],
               "w_dec": t["W_dec"][None], "b_dec": t["b_dec"]}  # fmt: skip
    tensors |= {name: value[None] for name, value in extra.items()}  # [d_sae] -> [1, d_sae]
    meta = {"d": d, "num_latents": m, "num_experts": 1, "latents_per_expert": m, "k": k,
            "experts_per_token": 1, "shared_latents": 0, "shared_k": 0, "d_in": d, "d_sae": m,
            "activation": activation}  # fmt: skip
    return tensors, meta


def _fold_decoder_norms(t: Tensors) -> None:
    """SAELens's rescale_acts_by_decoder_norm: pre-activations times ||W_dec row|| choose the
    latents and the decoder rows act at unit norm. Folded: W_enc, b_enc times the norms,
    W_dec rows divided by them (as SAELens folds it for inference)."""
    norms = np.linalg.norm(t["W_dec"].astype(np.float64), axis=1)
    t["W_enc"] = (t["W_enc"] * norms).astype(np.float32)
    t["b_enc"] = (t["b_enc"] * norms).astype(np.float32)
    t["W_dec"] = (t["W_dec"] / norms[:, None]).astype(np.float32)


def _integer_k(where: Path, cfg: dict) -> int:
    k = cfg.get("k")
    if not isinstance(k, int) or isinstance(k, bool) or not 0 < k <= cfg["d_sae"]:
        raise ValueError(f"{where}: k = {k!r} must be an integer in [1, d_sae = {cfg['d_sae']}]")
    return k


def _standard(path: Path, cfg: dict, t: Tensors) -> tuple[Tensors, dict]:
    return _one_expert(t, "relu", int(cfg["d_sae"]))


def _topk(path: Path, cfg: dict, t: Tensors) -> tuple[Tensors, dict]:
    k = _integer_k(path / CONFIG, cfg)
    if cfg.get("rescale_acts_by_decoder_norm"):
        _fold_decoder_norms(t)
    return _one_expert(t, "topk", k)


def _jumprelu(path: Path, cfg: dict, t: Tensors) -> tuple[Tensors, dict]:
    """A JumpReLU SAE; one of ours (metadata.sae_jax with an activation: jumprelu, batchtopk
    or matryoshka) reads back with its own activation, k and k_max."""
    if "threshold" not in t:
        raise ValueError(f"{path / WEIGHTS}: a jumprelu SAE needs its threshold tensor")
    tensors, meta = _one_expert(t, "jumprelu", int(cfg["d_sae"]), threshold=t["threshold"])
    ours = cfg.get("metadata", {}).get("sae_jax", {})
    if "activation" in ours:
        meta |= {key: ours[key] for key in ("activation", "k", "k_max")}
    return tensors, meta


def _batchtopk(path: Path, cfg: dict, t: Tensors) -> tuple[Tensors, dict]:
    """A BatchTopK training save: at inference a JumpReLU with the learnt topk_threshold for
    every latent, in the units of the (decoder-norm rescaled) pre-activations."""
    if "topk_threshold" not in t:
        raise ValueError(f"{path / WEIGHTS}: a batchtopk SAE needs its topk_threshold tensor")
    if cfg.get("rescale_acts_by_decoder_norm"):
        _fold_decoder_norms(t)
    threshold = np.full(t["b_enc"].shape, float(t["topk_threshold"]), np.float32)
    return _one_expert(t, "jumprelu", int(cfg["d_sae"]), threshold=threshold)


def _switch(path: Path, cfg: dict, t: Tensors) -> tuple[Tensors, dict]:
    """Our own Switch SAE in SAELens form, back into the native layout (bitwise)."""
    read_config(path / CONFIG, ("num_experts", "k"))
    n, s, d = int(cfg["num_experts"]), int(cfg.get("shared_latents", 0)), int(cfg["d_in"])
    m = int(cfg["d_sae"]) - s
    if n < 1 or m % n:
        raise ValueError(f"{path / CONFIG}: d_sae - shared_latents = {m} latents do not split "
                         f"into num_experts = {n} experts")  # fmt: skip
    w_enc = t["W_enc"].T  # [d_sae, d]
    tensors = {"w_enc": np.ascontiguousarray(w_enc[:m]).reshape(n, m // n, d),
               "b_enc": t["b_enc"][:m].reshape(n, m // n),
               "w_dec": np.ascontiguousarray(t["W_dec"][:m]).reshape(n, m // n, d),
               "b_dec": t["b_dec"]}  # fmt: skip
    for theirs, ours in WHOLE.items():  # the router's tensors, as the writer names them
        if theirs in t and ours not in tensors:
            tensors[ours] = t[theirs]
    if n > 1 and "w_router" not in tensors:
        raise ValueError(f"{path / WEIGHTS}: {n} experts but no W_router")
    if s:
        tensors |= {"shared_w_enc": np.ascontiguousarray(w_enc[m:]),
                    "shared_b_enc": t["b_enc"][m:], "shared_w_dec": t["W_dec"][m:]}  # fmt: skip
    activation = cfg.get("activation", "topk")
    if activation != "topk":  # the threshold kinds: the experts' thresholds (not the shared)
        if "threshold" not in t:
            raise ValueError(f"{path / WEIGHTS}: a {activation} switch SAE needs its threshold")
        tensors["threshold"] = t["threshold"][:m].reshape(n, m // n)
    meta = {"d": d, "num_latents": m, "num_experts": n, "latents_per_expert": m // n,
            "k": int(cfg["k"]), "experts_per_token": int(cfg.get("experts_per_token", 1)),
            "shared_latents": s, "shared_k": int(cfg.get("shared_k", 0)), "d_in": d,
            "d_sae": m, "activation": activation, "k_max": int(cfg.get("k_max", 0))}  # fmt: skip
    return tensors, meta


# architecture -> reader of (directory, cfg.json, SAELens tensors) into (native tensors, meta)
ARCHITECTURES: dict[str, Callable[[Path, dict, Tensors], tuple[Tensors, dict]]] = {
    "standard": _standard,
    "topk": _topk,
    "batchtopk": _batchtopk,
    "matryoshka_batchtopk": _batchtopk,  # its nested widths shape the training loss only
    "jumprelu": _jumprelu,
    "switch": _switch,
}
