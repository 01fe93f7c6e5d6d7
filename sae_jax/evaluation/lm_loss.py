"""Loss recovered: the language model's next-token loss with the SAE's reconstruction spliced
into the residual stream at the layer the activations came from.

    recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean)

where CE_sae replaces the block's output at the spliced positions by the reconstruction and
CE_zero by zeros. The BOS position is never touched (the SAE never saw it), and neither are
tokens for which `splice_mask` is False (massive-activation outliers, which it was not trained
on). With a splice mask the figures are also reported with every text position spliced (keys
ending in `_with_outliers`).

SAEBench's scores (`saebench` in the result; sae_lens.evals.get_recons_loss) compare the same
splice with SAEBench's ablation, which zeroes the block's output at every position, BOS too:

    kl_div_score  = (KL_ablation - KL_sae) / KL_ablation
    ce_loss_score = (CE_ablation - CE_sae) / (CE_ablation - CE_clean)

KL is KL(clean || edited) of the next-token distributions, averaged over positions 1..
(every position but BOS); CE over the predictions of tokens 2.. (given positions 1..).
Needs the `dump` extra (torch, transformers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

Edit = Callable[[np.ndarray], np.ndarray]  # [tokens, d] raw activations -> [tokens, d]
Mask = Callable[[np.ndarray], np.ndarray]  # [tokens, d] -> [tokens] bool: splice these


class Variant(NamedTuple):
    """An edit of the block's output: `edit` on positions `first`.. where `mask` holds."""

    edit: Edit
    mask: Mask | None = None
    first: int = 1  # 1: BOS untouched; 0: every position


def _hook(variant: Variant):
    import torch

    def hook(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        body = hidden[:, variant.first :].float().cpu().numpy()
        flat = body.reshape(-1, body.shape[-1])
        mask = np.ones(len(flat), bool) if variant.mask is None else variant.mask(flat)
        new = flat.copy()
        if mask.any():
            new[mask] = variant.edit(flat[mask])
        body = torch.from_numpy(new.reshape(body.shape)).to(hidden.dtype).to(hidden.device)
        hidden = torch.cat([hidden[:, : variant.first], body], dim=1)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return hook


def _logits(model, block, ids, variant: Variant | None):
    """[B, S, V] float32 logits of ids [B, S], with the variant's edit of the block output."""
    handle = None if variant is None else block.register_forward_hook(_hook(variant))
    try:
        return model(ids).logits.float()
    finally:
        if handle is not None:
            handle.remove()


def lm_losses(
    model, block, sequences: Sequence[Sequence[int]], variants: dict[str, Variant],
    batch_size: int = 8,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """{"clean" and each variant's name: {"ce": mean next-token cross-entropy (nats) of tokens
    2.., "kl": mean KL(clean || variant) over positions 1..}}; one clean forward per batch."""
    import torch
    import torch.nn.functional as F

    names = ["clean", *variants]
    ce, kl = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    targets_seen, positions_seen = 0, 0
    device = next(model.parameters()).device
    with torch.inference_mode():
        for i in range(0, len(sequences), batch_size):
            ids = torch.tensor(sequences[i : i + batch_size], device=device)
            targets = ids[:, 2:]
            clean = _logits(model, block, ids, None)[:, 1:]  # positions 1..
            clean_logp = F.log_softmax(clean, dim=-1)
            for name in names:
                logits = clean if name == "clean" else _logits(model, block, ids, variants[name])
                logits = logits if name == "clean" else logits[:, 1:]
                logp = F.log_softmax(logits, dim=-1)
                ce[name] += float(F.nll_loss(logp[:, :-1].reshape(-1, logp.shape[-1]),
                                             targets.reshape(-1), reduction="sum"))  # fmt: skip
                kl[name] += float(F.kl_div(logp, clean_logp, reduction="sum", log_target=True))
            targets_seen += targets.numel()
            positions_seen += clean.shape[0] * clean.shape[1]
    return {n: {"ce": ce[n] / targets_seen, "kl": kl[n] / positions_seen} for n in names}


def _recovered(zero: float, spliced: float, clean: float) -> float:
    return (zero - spliced) / (zero - clean) if zero != clean else float("nan")


def loss_recovered(
    model, block, sequences: Sequence[Sequence[int]], reconstruct: Edit,
    splice_mask: Mask | None = None, batch_size: int = 8,
) -> dict:  # fmt: skip
    """Clean, spliced and zero-ablated LM loss, their difference and the fraction recovered;
    with a splice_mask, also the same with every position but BOS spliced (`_with_outliers`);
    and SAEBench's scores under "saebench"."""
    masks = {"": splice_mask} | ({"_with_outliers": None} if splice_mask is not None else {})
    variants = {"ablation": Variant(np.zeros_like, None, first=0)}
    for suffix, mask in masks.items():
        variants |= {"sae" + suffix: Variant(reconstruct, mask),
                     "zero" + suffix: Variant(np.zeros_like, mask)}  # fmt: skip
    loss = lm_losses(model, block, sequences, variants, batch_size)
    clean = loss["clean"]["ce"]
    result = {"ce_clean": clean, "lm_tokens": sum(len(s) - 2 for s in sequences)}
    for suffix in masks:
        spliced, zero = loss["sae" + suffix]["ce"], loss["zero" + suffix]["ce"]
        result |= {
            "ce_sae" + suffix: spliced,
            "ce_zero" + suffix: zero,
            "delta_ce" + suffix: spliced - clean,
            "loss_recovered" + suffix: _recovered(zero, spliced, clean),
        }
    return result | {"saebench": saebench_scores(loss)}


def saebench_scores(loss: dict[str, dict[str, float]]) -> dict[str, float]:
    """SAEBench's KL and CE figures and scores from lm_losses' "clean", "sae", "ablation"."""
    sae, ablation = loss["sae"], loss["ablation"]
    kl_score = (ablation["kl"] - sae["kl"]) / ablation["kl"] if ablation["kl"] else float("nan")
    return {
        "kl_div_score": kl_score,
        "kl_div_with_sae": sae["kl"],
        "kl_div_with_ablation": ablation["kl"],
        "ce_loss_score": _recovered(ablation["ce"], sae["ce"], loss["clean"]["ce"]),
        "ce_loss_with_sae": sae["ce"],
        "ce_loss_without_sae": loss["clean"]["ce"],
        "ce_loss_with_ablation": ablation["ce"],
    }
