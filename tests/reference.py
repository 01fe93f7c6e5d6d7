"""Plain per-token numpy implementations of the model equations, for equivalence tests."""

from __future__ import annotations

import numpy as np


def topk_sae_token(x, w_enc, b_enc, w_dec, b_dec, k):
    """Gao et al. TopK SAE on one token: w_enc/w_dec [L, d] rows. Returns (x_hat, z)."""
    pre = w_enc @ (x - b_dec) + b_enc
    z = np.zeros_like(pre)
    top = np.argsort(-pre)[:k]
    z[top] = np.maximum(pre[top], 0.0)
    return z @ w_dec + b_dec, z


def switch_sae(x, params: dict, k: int):
    """Switch SAE, token by token, no capacity limit. Returns x_hat [T, d], expert [T], p [T]."""
    x_hat, experts, gates = [], [], []
    for tok in x:
        logits = (tok - params["b_router"]) @ params["w_router"]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        i = int(np.argmax(probs))
        centred = tok - params["b_dec"]
        no_bias = np.zeros_like(tok)
        recon, _ = topk_sae_token(
            centred, params["w_enc"][i], params["b_enc"][i], params["w_dec"][i], no_bias, k
        )
        x_hat.append(probs[i] * recon + params["b_dec"])
        experts.append(i)
        gates.append(probs[i])
    return np.array(x_hat), np.array(experts), np.array(gates)


def auxk_sums(x, params: dict, const: dict, dead, k: int, k_aux: int):
    """AuxK sums of a Switch SAE, token by token: the residual x - x_hat reconstructed, gated,
    by the top-k_aux dead latents of the routed expert. `const` (numpy copies of the
    parameters) fixes the routing, the residual and the chosen latents; `params` (jax arrays)
    enter only the aux reconstruction, so a test can differentiate through them.
    dead: [N, L] bool. Returns the (err, norm) sums over the tokens routed to an expert
    with a dead latent (the others have nothing to reconstruct the residual with).
    """
    import jax
    import jax.numpy as jnp

    x_hat, experts, gates = switch_sae(x, const, k)
    err = norm = 0.0
    for tok, tok_hat, i, gate in zip(x, x_hat, experts, gates, strict=True):
        if not dead[i].any():
            continue
        centred = tok - const["b_dec"]
        dead_pre = np.where(
            dead[i], np.maximum(const["w_enc"][i] @ centred + const["b_enc"][i], 0), 0
        )
        chosen = np.array([j for j in np.argsort(-dead_pre)[:k_aux] if dead[i][j]], int)
        pre = params["w_enc"][i][chosen] @ centred + params["b_enc"][i][chosen]
        aux = gate * (jax.nn.relu(pre) @ params["w_dec"][i][chosen])
        err = err + jnp.sum((tok - tok_hat - aux) ** 2)
        norm = norm + np.sum((tok - tok_hat) ** 2)
    return err, norm


def switch_mse(x, params: dict, const: dict, k: int):
    """The Switch SAE's MSE (mean over tokens and d), differentiable in `params` (jax
    arrays). `const` (numpy copies) fixes each token's expert and chosen latents, which the
    model picks without gradient; the rest is the per-token formula, batched over tokens."""
    import jax
    import jax.numpy as jnp

    _, expert, _ = switch_sae(x, const, k)
    pre = np.einsum("tld,td->tl", const["w_enc"][expert], x - const["b_dec"])
    top = np.argsort(-(pre + const["b_enc"][expert]), axis=1)[:, :k]  # [T, k]
    rows = (expert[:, None], top)
    probs = jax.nn.softmax((x - params["b_router"]) @ params["w_router"], axis=-1)
    gate = probs[np.arange(len(x)), expert]
    z = jnp.einsum("tkd,td->tk", params["w_enc"][rows], x - params["b_dec"])
    z = jax.nn.relu(z + params["b_enc"][rows])
    x_hat = gate[:, None] * jnp.einsum("tk,tkd->td", z, params["w_dec"][rows]) + params["b_dec"]
    return jnp.sum((x - x_hat) ** 2) / x.size


def ragged_all_to_all(operands, outputs, input_offsets, send_sizes, output_offsets, recv_sizes):
    """`jax.lax.ragged_all_to_all` over one group of E devices, as its docstring specifies.

    Each argument is a list over the devices in axis-index order: operands [N_rows, ...],
    outputs [M, ...], offsets and sizes [K] with K = E * S; device src sends slice k,
    operand[input_offsets[k]:][:send_sizes[k]], to device k // S, which writes it at
    output_offsets[k] (an offset in the receiver's output) as its received slice
    i = src * S + k % S, whose size is the receiver's recv_sizes[i]. Returns the outputs.
    """
    e = len(operands)
    s = len(input_offsets[0]) // e
    results = [np.array(o, copy=True) for o in outputs]
    for dst in range(e):
        for i in range(e * s):  # the receiver's slices, in its order
            src, j = divmod(i, s)
            k = dst * s + j  # the same slice, in the sender's order
            size = int(recv_sizes[dst][i])
            assert size == send_sizes[src][k], "send_sizes and recv_sizes disagree"
            start, at = int(input_offsets[src][k]), int(output_offsets[src][k])
            results[dst][at : at + size] = operands[src][start : start + size]
    return results


def effective_encoder(params: dict):
    """w_enc [N, L, d] as the model uses it: with feature scaling (params["enc_scale"] [N, d]),
    each expert's mean row plus (1 + scale) times every row's deviation from it."""
    w = params["w_enc"]
    if "enc_scale" not in params:
        return w
    mean = w.mean(axis=1, keepdims=True)
    return mean + (1 + params["enc_scale"][:, None, :]) * (w - mean)


def shared_codes(x, params: dict, shared_k: int):
    """The shared dictionary's TopK codes [T, S] (zeros but the shared_k largest) and its
    reconstruction [T, d] through unit-norm decoder rows."""
    pre = (x - params["b_dec"]) @ params["shared_w_enc"].T + params["shared_b_enc"]
    z = np.zeros_like(pre)
    top = np.argsort(-pre, axis=1)[:, :shared_k]
    rows = np.arange(len(x))[:, None]
    z[rows, top] = np.maximum(pre[rows, top], 0)
    w = params["shared_w_dec"]
    return z, z @ (w / np.linalg.norm(w, axis=1, keepdims=True))


def top_e_choice(x, params: dict, k: int, e: int, keep=None):
    """Routing beyond top-1, token by token: each token's e most probable experts and the
    global TopK over their latents by gated value p_j * ReLU(pre). keep: [T, e] bool, False
    for a row that capacity dropped (its latents are not candidates). Returns experts [T, e],
    gates [T, e] and chosen [T, e, L] bool."""
    params = dict(params, w_enc=effective_encoder(params))
    lat = params["w_enc"].shape[1]
    experts, gates, chosen = [], [], []
    keep = np.ones((len(x), e), bool) if keep is None else keep
    for tok, kept in zip(x, keep, strict=True):
        logits = (tok - params["b_router"]) @ params["w_router"]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = np.argsort(-probs, kind="stable")[:e]
        centred = tok - params["b_dec"]
        pre = np.stack([params["w_enc"][i] @ centred + params["b_enc"][i] for i in top])
        scored = np.where(kept[:, None], probs[top][:, None] * np.maximum(pre, 0), -1.0)
        mask = np.zeros(e * lat, bool)
        mask[np.argsort(-scored.reshape(-1), kind="stable")[:k]] = True
        mask &= np.repeat(kept, lat)
        experts.append(top)
        gates.append(probs[top])
        chosen.append(mask.reshape(e, lat))
    return np.array(experts), np.array(gates), np.array(chosen)


def top_e_sae(
    x, params: dict, k: int, e: int, dead=None, k_aux: int = 0, shared_k: int = 0, keep=None
):
    """x_hat [T, d] of the top-e global-TopK Switch SAE, token by token, and with dead [N, L]
    the AuxK sums (err, norm): the token's residual x - x_hat against the sum over its experts
    of the gated top-k_aux dead-latent reconstructions, for tokens with a dead expert.
    With shared_k, the shared dictionary's reconstruction is part of x_hat (and of what the
    residual leaves out); k is then the routed experts' share. keep: see `top_e_choice`."""
    experts, gates, chosen = top_e_choice(x, params, k, e, keep)
    params = dict(params, w_enc=effective_encoder(params))
    shared = shared_codes(x, params, shared_k)[1] if shared_k else np.zeros_like(x)
    x_hat, err, norm = [], 0.0, 0.0
    for tok, ids, g, mask, sh in zip(x, experts, gates, chosen, shared, strict=True):
        centred = tok - params["b_dec"]
        recon, aux = sh.copy(), np.zeros_like(tok)
        for j, i in enumerate(ids):
            pre = params["w_enc"][i] @ centred + params["b_enc"][i]
            recon += g[j] * (np.where(mask[j], np.maximum(pre, 0), 0) @ params["w_dec"][i])
            if dead is not None and dead[i].any():
                dead_pre = np.where(dead[i], np.maximum(pre, 0), 0)
                top = [m for m in np.argsort(-dead_pre)[:k_aux] if dead[i][m]]
                aux += g[j] * (dead_pre[top] @ params["w_dec"][i][top])
        x_hat.append(recon + params["b_dec"])
        if dead is not None and any(dead[i].any() for i in ids):
            err += np.sum((centred - recon - aux) ** 2)
            norm += np.sum((centred - recon) ** 2)
    return np.array(x_hat), err, norm


def top_e_mse(x, params: dict, const: dict, k: int, e: int, shared_k: int = 0):
    """The top-e model's MSE, differentiable in `params` (jax arrays), with the experts and
    the chosen latents fixed by `const` (numpy copies), as `switch_mse`."""
    import jax
    import jax.numpy as jnp

    experts, _, chosen = top_e_choice(x, const, k, e)
    probs = jax.nn.softmax((x - params["b_router"]) @ params["w_router"], axis=-1)
    x_hat = params["b_dec"]
    w_enc = effective_encoder(params)
    for j in range(e):
        i = experts[:, j]
        gate = probs[np.arange(len(x)), i]
        pre = jnp.einsum("tld,td->tl", w_enc[i], x - params["b_dec"])
        z = jax.nn.relu(pre + params["b_enc"][i]) * chosen[:, j]
        x_hat = x_hat + gate[:, None] * jnp.einsum("tl,tld->td", z, params["w_dec"][i])
    if "shared_w_enc" in params:
        mask = shared_codes(x, const, shared_k)[0] > 0
        pre = (x - params["b_dec"]) @ params["shared_w_enc"].T + params["shared_b_enc"]
        w = params["shared_w_dec"]
        w = w / jnp.linalg.norm(w, axis=1, keepdims=True)
        x_hat = x_hat + (jax.nn.relu(pre) * mask) @ w
    return jnp.sum((x - x_hat) ** 2) / x.size


def kind_choice(x, params: dict, cfg, mode: str):
    """The active latents of each token under an activation kind (kernels/activations.py),
    token by token with dense [L] pre-activations, top-1 routing (or N = 1), no capacity
    limit. mode: 'train', 'infer' or 'batch' (SwitchSAE.__call__). Returns (expert [T],
    gate [T], pre [T, L] of the routed expert, mask [T, L] the active latents, cand [T, L]
    the row's candidates, threshold [T, L] the 'jump' rule's thresholds on pre or None, the
    batch threshold (on gated values for the batch kinds) or None)."""
    tokens = x.shape[0]
    if cfg.num_experts > 1:
        _, expert, gate = switch_sae(x, params, cfg.k)
    else:
        expert, gate = np.zeros(tokens, int), np.ones(tokens)
    centred = x - params["b_dec"]
    pre = np.einsum("tld,td->tl", params["w_enc"][expert], centred) + params["b_enc"][expert]
    kind, kp = cfg.kind, cfg.candidates_per_row
    rule = {"batch": "topk", "infer": kind.infer_rule, "train": kind.train_rule}[mode]
    batch = mode == "batch" or (mode == "train" and kind.batch)
    k = kp if batch or rule == "jump" else cfg.k
    theta = None
    if rule == "jump":
        if "log_threshold" in params:
            theta = np.exp(params["log_threshold"])[expert]
        else:  # BatchTopK's threshold is on gated values: gate x pre > it
            theta = np.full_like(pre, float(params["batch_threshold"])) / gate[:, None]
    score = pre - theta if rule == "jump" else pre
    cand = np.zeros_like(pre, bool)
    np.put_along_axis(cand, np.argsort(-score, axis=1, kind="stable")[:, :k], True, axis=1)
    mask = cand & (pre > (theta if rule == "jump" else 0))
    threshold = None
    if batch:  # the batch kinds compare gated values; JumpReLU's first thresholds do not
        scored = pre * gate[:, None] if kind.batch else pre
        values = np.sort(np.where(cand, np.maximum(scored, 0), 0).ravel())[::-1]
        threshold = values[cfg.k * tokens - 1]
        mask = cand & (scored >= threshold) & (pre > 0)
    return expert, gate, pre, mask, cand, theta, threshold


def kind_sae(x, params: dict, cfg, mode: str):
    """x_hat [T, d], l0 [T] and the batch threshold of an activation kind (`kind_choice`),
    plus Matryoshka's prefix squared errors [P] (in mode 'train')."""
    expert, gate, pre, mask, _, _, threshold = kind_choice(x, params, cfg, mode)
    z = np.where(mask, pre, 0.0)
    recon = np.einsum("tl,tld->td", z, params["w_dec"][expert])
    x_hat = gate[:, None] * recon + params["b_dec"]
    prefix = []
    for end in cfg.prefix_ends if cfg.kind.prefixes and mode == "train" else ():
        part = np.einsum("tl,tld->td", z[:, :end], params["w_dec"][expert][:, :end])
        prefix.append(np.sum((x - params["b_dec"] - gate[:, None] * part) ** 2))
    return x_hat, mask.sum(axis=1), threshold, np.array(prefix)


def kind_loss(x, params: dict, const: dict, cfg, l0_coeff: float = 1.0):
    """The training loss of an activation kind in jax.numpy, dense: the active latents and
    candidates chosen from `const` (numpy parameters), the values from `params` (jax arrays),
    differentiable; JumpReLU through kernels.activations' straight-through functions."""
    import jax.numpy as jnp

    from sae_jax.kernels import activations

    expert, gate, _, mask, cand, _, _ = kind_choice(x, const, cfg, "train")
    centred = x - params["b_dec"]
    pre = jnp.einsum("tld,td->tl", params["w_enc"][expert], centred) + params["b_enc"][expert]
    tokens, d = x.shape
    extra = 0.0
    if cfg.kind.learned_threshold:
        theta = jnp.exp(params["log_threshold"])[expert]
        bandwidth = jnp.float32(cfg.jumprelu_bandwidth)
        z = jnp.where(cand, activations.jumprelu(pre, theta, bandwidth), 0.0)
        l0 = jnp.sum(jnp.where(cand, activations.step(pre, theta, bandwidth), 0.0)) / tokens
        var = np.sum((x - x.mean(axis=0)) ** 2) / (tokens * d)
        extra = l0_coeff * var * (l0 / cfg.k - 1.0) ** 2
    else:
        z = jnp.where(mask, pre, 0.0)
    dec = params["w_dec"][expert]
    x_hat = gate[:, None] * jnp.einsum("tl,tld->td", z, dec) + params["b_dec"]
    loss = jnp.mean((x - x_hat) ** 2) + extra
    for end in cfg.prefix_ends if cfg.kind.prefixes else ():
        part = jnp.einsum("tl,tld->td", z[:, :end], dec[:, :end])
        loss = loss + jnp.sum((centred - gate[:, None] * part) ** 2) / (tokens * d)
    return loss
