"""Loss recovered: the language model's next-token loss with the SAE's reconstruction spliced
into the residual stream at the layer the activations came from.

    recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean)

where CE_sae replaces the block's output at the spliced positions by the reconstruction and
CE_zero by zeros. The BOS position is never touched (the SAE never saw it), and neither are
tokens for which `splice_mask` is False (massive-activation outliers, which it was not trained
on). With a splice mask the figures are also reported with every text position spliced (keys
ending in `_with_outliers`). Needs the `dump` extra (torch, transformers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Edit = Callable[[np.ndarray], np.ndarray]  # [tokens, d] raw activations -> [tokens, d]


def lm_cross_entropy(
    model, block, sequences: Sequence[Sequence[int]], edit: Edit | None = None,
    splice_mask: Callable[[np.ndarray], np.ndarray] | None = None, batch_size: int = 8,
) -> float:  # fmt: skip
    """Mean next-token cross-entropy (nats) of tokens 2.. of each sequence, given positions
    1.. (so BOS is context only), with `edit` applied to the block's output there."""
    import torch
    import torch.nn.functional as F

    def hook(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        body = hidden[:, 1:].float().cpu().numpy()
        flat = body.reshape(-1, body.shape[-1])
        mask = np.ones(len(flat), bool) if splice_mask is None else splice_mask(flat)
        new = flat.copy()
        if mask.any():
            new[mask] = edit(flat[mask])
        body = torch.from_numpy(new.reshape(body.shape)).to(hidden.dtype).to(hidden.device)
        hidden = torch.cat([hidden[:, :1], body], dim=1)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = block.register_forward_hook(hook) if edit is not None else None
    total, count = 0.0, 0
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for i in range(0, len(sequences), batch_size):
                ids = torch.tensor(sequences[i : i + batch_size], device=device)
                logits = model(ids).logits[:, 1:-1].float()
                targets = ids[:, 2:]
                ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                     reduction="sum")  # fmt: skip
                total += float(ce)
                count += targets.numel()
    finally:
        if handle is not None:
            handle.remove()
    return total / count


def loss_recovered(
    model, block, sequences: Sequence[Sequence[int]], reconstruct: Edit,
    splice_mask: Callable[[np.ndarray], np.ndarray] | None = None, batch_size: int = 8,
) -> dict:  # fmt: skip
    """Clean, spliced and zero-ablated LM loss, their difference and the fraction recovered;
    with a splice_mask, also the same with every position but BOS spliced (`_with_outliers`)."""
    clean = lm_cross_entropy(model, block, sequences, batch_size=batch_size)
    result = {"ce_clean": clean, "lm_tokens": sum(len(s) - 2 for s in sequences)}
    masks = {"": splice_mask} | ({"_with_outliers": None} if splice_mask is not None else {})
    for suffix, mask in masks.items():
        kw = {"splice_mask": mask, "batch_size": batch_size}
        spliced = lm_cross_entropy(model, block, sequences, reconstruct, **kw)
        zero = lm_cross_entropy(model, block, sequences, np.zeros_like, **kw)
        result |= {
            "ce_sae" + suffix: spliced,
            "ce_zero" + suffix: zero,
            "delta_ce" + suffix: spliced - clean,
            "loss_recovered" + suffix: (zero - spliced) / (zero - clean)
            if zero != clean
            else float("nan"),
        }
    return result
