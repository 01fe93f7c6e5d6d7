"""The Switch SAE as a SAELens architecture, "switch" (needs torch and SAELens; importing this
module registers it, once): `sae_lens.SAE.load_from_disk(DIR)` then opens a directory that
`sae_jax.interop.saelens_files` wrote for a Switch SAE (N > 1, e > 1 or a shared dictionary).

Its encode routes as `sae_jax.load_pretrained` does (equations in docs/interop.md), runs
each token's e experts only (tokens grouped by expert: never a [tokens, d_sae]
pre-activation over every expert), and returns dense feature activations [..., d_sae] holding
the *gated* values (value x its expert's router probability; shared latents ungated), so
decode is SAELens's plain `acts @ W_dec + b_dec`. W_enc [d_in, d_sae] and W_dec
[d_sae, d_in] are ordinary parameters, the latents in global id order (expert i's at
[i L, (i + 1) L), the shared dictionary's from NUM_LATENTS on).

The threshold kinds (cfg activation batchtopk, matryoshka or jumprelu; threshold [d_sae], the
shared latents' unused) encode by the 'jump' rule as `SwitchSAE(..., mode='infer')`: of each
routed row's expert, the candidates_per_row (k') largest pre - threshold, pre where pre >
threshold; every row keeps its own (no selection over a token's e experts). BatchTopK's and
Matryoshka's threshold is on gated values (gate x pre > threshold, as they were trained), so a
row's threshold on pre is threshold / gate; JumpReLU's is on pre itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
from sae_lens.saes.sae import SAE, SAEConfig
from torch import nn

from sae_jax.config import KINDS

ARCHITECTURE = "switch"
GATED_THRESHOLD = tuple(name for name, kind in KINDS.items() if kind.batch)


@dataclass
class SwitchSAEConfig(SAEConfig):
    """SAELens config of a Switch SAE: d_sae = num_experts * L + shared_latents."""

    k: int = 32  # latents per token, the shared dictionary's shared_k included
    num_experts: int = 1
    experts_per_token: int = 1
    shared_latents: int = 0
    shared_k: int = 0
    activation: str = "topk"  # or a threshold kind: batchtopk, matryoshka, jumprelu
    k_max: int = 0  # SAEConfig.k_max, as recorded
    candidates_per_row: int = 0  # k' of a threshold kind

    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    @property
    def num_latents(self) -> int:
        """M: the experts' latents (d_sae less the shared dictionary)."""
        return self.d_sae - self.shared_latents

    @property
    def latents_per_expert(self) -> int:
        return self.num_latents // self.num_experts


class SwitchSAE(SAE[SwitchSAEConfig]):
    """Inference-only Switch SAE: route, encode each token in its e experts, global TopK."""

    b_enc: nn.Parameter

    def initialize_weights(self) -> None:
        super().initialize_weights()
        cfg, like = self.cfg, {"dtype": self.dtype, "device": self.device}
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **like))
        if cfg.num_experts > 1:
            self.W_router = nn.Parameter(torch.zeros(cfg.d_in, cfg.num_experts, **like))
            self.b_router = nn.Parameter(torch.zeros(cfg.d_in, **like))
        if cfg.activation != "topk":
            self.threshold = nn.Parameter(torch.zeros(cfg.d_sae, **like))

    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        """router_bias [N] is there only for an SAE trained with ROUTER_BIAS."""
        if "router_bias" in state_dict and not hasattr(self, "router_bias"):
            like = state_dict["router_bias"]
            self.router_bias = nn.Parameter(torch.zeros_like(like, device=self.W_enc.device))

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        """As SAELens's, the router too: the SAE then takes x where it took s x."""
        super().fold_activation_norm_scaling_factor(scaling_factor)
        if self.cfg.num_experts > 1:
            self.W_router.data *= scaling_factor
            self.b_router.data /= scaling_factor

    def fold_W_dec_norm(self) -> None:
        raise NotImplementedError("switch SAE: folding the decoder norms into the encoder would "
                                  "change which latents the TopK chooses")  # fmt: skip

    def fold_activation_whitening(self, mean, whitening_matrix, unwhitening_matrix) -> None:
        raise NotImplementedError("switch SAE: folding a whitening is not supported")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense gated feature activations [..., d_sae] of x [..., d_in]."""
        lead = x.shape[:-1]
        raw = x.reshape(-1, self.cfg.d_in).to(self.dtype)
        sae_in = self.process_sae_in(raw)  # x - b_dec
        expert, gate = self.route(raw)
        acts = torch.zeros(raw.shape[0], self.cfg.d_sae, dtype=sae_in.dtype, device=sae_in.device)
        if self.cfg.k - self.cfg.shared_k:
            values, ids = self._routed_codes(sae_in, expert, gate)
            acts.scatter_(1, ids, values)
        if self.cfg.shared_latents:
            m = self.cfg.num_latents
            pre = sae_in @ self.W_enc[:, m:] + self.b_enc[m:]
            top, idx = pre.topk(self.cfg.shared_k, dim=-1)
            acts.scatter_(1, idx + m, top.relu())
        return self.hook_sae_acts_post(acts).reshape(*lead, self.cfg.d_sae)

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """x_hat = acts @ W_dec + b_dec: [..., d_in]."""
        out = self.hook_sae_recons(feature_acts.to(self.dtype) @ self.W_dec + self.b_dec)
        return self.reshape_fn_out(self.run_time_activation_norm_fn_out(out), self.d_head)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's e experts [T, e] (in order of choice) and their router probabilities
        [T, e] float32, for raw x [T, d_in]: p = softmax(W_router^T (x - b_router)); a
        router_bias, if trained with one, is added to the logits to choose the experts only."""
        t, e = x.shape[0], self.cfg.experts_per_token
        if self.cfg.num_experts == 1:
            return (torch.zeros(t, 1, dtype=torch.long, device=x.device),
                    torch.ones(t, 1, dtype=torch.float32, device=x.device))  # fmt: skip
        logits = (x.float() - self.b_router.float()) @ self.W_router.float()
        probs = logits.softmax(dim=-1)
        bias = getattr(self, "router_bias", None)
        scores = probs if bias is None else logits + bias.float()
        expert = scores.topk(e, dim=-1).indices
        return expert, probs.gather(1, expert)

    def _routed_codes(self, sae_in, expert, gate) -> tuple[torch.Tensor, torch.Tensor]:
        """Gated values and global latent ids [T, k] of each token's e experts. TopK: the k =
        K - SHARED_K largest gated values p_j ReLU(pre-activation) over its experts; a
        threshold kind: every expert's own k' candidates (k = e k'). Each expert encodes only
        its own tokens (its block of W_enc's columns)."""
        t, e = sae_in.shape[0], expert.shape[1]
        topk = self.cfg.activation == "topk"
        k = self.cfg.k - self.cfg.shared_k if topk else self.cfg.candidates_per_row
        cand, ids = self._candidates(sae_in, expert, gate, k, topk)
        gated = (cand.reshape(t, e, k) * gate.to(cand.dtype)[:, :, None]).reshape(t, e * k)
        if not topk:
            return gated, ids.reshape(t, e * k)
        values, pick = gated.topk(k, dim=-1)
        return values, ids.reshape(t, e * k).gather(1, pick)

    def _candidates(self, sae_in, expert, gate, k: int, topk: bool):
        """Each routed row's k candidates in its expert: values [T e, k] (ReLU'd top k; or the
        'jump' rule's pre where pre > threshold of the k largest pre - threshold, the
        threshold divided by the row's gate for BatchTopK and Matryoshka, whose threshold is
        on gated values) and global ids [T e, k]; row r is token r // e's (r % e)-th expert."""
        e, lat = expert.shape[1], self.cfg.latents_per_expert
        flat, gates = expert.reshape(-1), gate.reshape(-1).float()
        gated = self.cfg.activation in GATED_THRESHOLD
        cand = torch.zeros(flat.shape[0], k, dtype=sae_in.dtype, device=sae_in.device)
        ids = torch.zeros(flat.shape[0], k, dtype=torch.long, device=sae_in.device)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.cfg.num_experts).tolist()
        for i, rows in enumerate(torch.split(order, counts)):
            if not counts[i]:
                continue
            cols = slice(i * lat, (i + 1) * lat)
            pre = sae_in[rows // e] @ self.W_enc[:, cols] + self.b_enc[cols]
            if topk:
                top, idx = pre.topk(k, dim=-1)
                cand[rows] = top.relu()
            else:
                theta = self.threshold[cols].expand(len(rows), lat)
                if gated:
                    theta = theta / gates[rows, None].to(theta.dtype)
                idx = (pre - theta).topk(k, dim=-1).indices
                top = pre.gather(1, idx)
                over = top > theta.gather(1, idx)
                cand[rows] = torch.where(over, top.relu(), torch.zeros_like(top))
            ids[rows] = idx + i * lat
        return cand, ids


if ARCHITECTURE not in SAE_CLASS_REGISTRY:
    register_sae_class(ARCHITECTURE, SwitchSAE, SwitchSAEConfig)
