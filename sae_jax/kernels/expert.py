"""One expert: a TopK SAE applied to a buffer of dispatched tokens, plus its AuxK term.

The top-k latents are chosen on gradient-free pre-activations; gradients reach only the k
chosen latents. Two kernels compute the chosen values and the decode:

- `gather` (wide experts): values are read off the gradient-free pre-activations, and the
  decode and both gradients touch only the k rows of each token (kernels/sparse_rows.py,
  one of the k at a time), so no [C, L] x [L, d] product is differentiated (Gao et al.'s
  sparse trick).
- `dense` (narrow experts, the usual Switch case): values are read off the [C, L]
  pre-activation matmul and decoding multiplies the sparse [C, L] codes by W_dec; every
  step is a plain matmul, which beats gathering k*d floats per token once L is small.

`ExpertSettings.kernel = 'auto'` picks dense for experts of at most 1024 latents, about where
the two kernels' step times cross on CPU (docs/benchmarks.md).

Tokens arrive centred (x - b_dec, computed in float32 before any rounding to the compute
dtype), so a large mean does not cancel in the encoder matmul; b_dec's encoder gradient comes
through an [L]-sized term whose value is zero (`with_b_dec_grad`), so no gradient with respect
to a [C, d] token buffer is formed. The matmuls take operands in the compute dtype
(sae_jax/precision.py) and accumulate in float32; top-k runs on float32 pre-activations.
AuxK (kernels/auxk.py) runs on each expert's dead latents only.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sae_jax import precision
from sae_jax.kernels import activations, sparse_rows
from sae_jax.kernels.auxk import auxk_recon, auxk_sums
from sae_jax.kernels.records import (
    DENSE_MAX_LATENTS,
    ExpertOut,
    ExpertParams,
    ExpertRows,
    ExpertSettings,
    use_dense,
)
from sae_jax.varying import sum_to_type, zeros_varying

__all__ = [
    "DENSE_MAX_LATENTS",
    "ExpertOut",
    "ExpertParams",
    "ExpertRows",
    "ExpertSettings",
    "centre",
    "expert_out",
    "run_experts",
    "use_dense",
]


def centre(x: jax.Array, b_dec: jax.Array, dtype: str = "float32") -> jax.Array:
    """x - b_dec in float32, rounded once to the compute dtype: [T, d] -> [T, d].

    Centring before the rounding keeps the tokens' spread when their mean is large against
    it. b_dec gets no gradient here; `with_b_dec_grad` gives it its encoder gradient.
    """
    return (x.astype(jnp.float32) - jax.lax.stop_gradient(b_dec)).astype(dtype)


def with_b_dec_grad(p: ExpertParams, b_dec: jax.Array, looped: bool = False) -> ExpertParams:
    """p with b_enc + (v - v), v = -W_enc b_dec [L]: the value is exactly b_enc, and the
    gradient reaching b_dec is -(sum over tokens of the pre-activation gradient) @ W_enc,
    what W_enc (x - b_dec) would give it, without forming a [C, d] gradient. looped: p is
    one trip's expert of a loop over experts (the gather kernel's lax.map), see _b_dec_term;
    vmapped (dense), the plain product sums b_dec's gradient over the experts in one
    contraction, as it always did."""
    if looped:
        v = _b_dec_term(p.w_enc, b_dec)
    else:
        v = -(jax.lax.stop_gradient(p.w_enc) @ b_dec)
    return p._replace(b_enc=p.b_enc + (v - jax.lax.stop_gradient(v)))


@jax.custom_vjp
def _b_dec_term(w_enc: jax.Array, b_dec: jax.Array) -> jax.Array:
    """-(W_enc b_dec) [L], differentiated for b_dec only. Its residual is w_enc as passed (a
    stop_gradient would make it a new value): in a loop over experts, a loop input kept as a
    residual is reused, while a value computed in the loop is stacked, [N, L, d] per step."""
    return -(w_enc @ b_dec)


def _b_dec_term_fwd(w_enc, b_dec):
    return _b_dec_term(w_enc, b_dec), (w_enc, b_dec)


def _b_dec_term_bwd(res, g):
    w_enc, b_dec = res
    return None, sum_to_type(-(g @ w_enc), b_dec)


_b_dec_term.defvjp(_b_dec_term_fwd, _b_dec_term_bwd)


def dense_preactivations(xc: jax.Array, p: ExpertParams, dtype: str = "float32") -> jax.Array:
    """W_enc xc + b_enc for centred tokens xc [C, d]: [C, L] float32."""
    return precision.einsum("cd,ld->cl", xc, p.w_enc, dtype) + p.b_enc


def encode_selected(xc, p: ExpertParams, idx, pre, pre_grad=None, value=None):
    """ReLU of the pre-activations of latents idx [C, k] -> [C, k] float32, with gradient.

    xc: [C, d] centred tokens; pre: the gradient-free [C, L] pre-activations; pre_grad: the
    differentiable ones (dense kernel); None reads the values off `pre` and sends the
    gradient to the k rows (sparse_rows.selected_preactivations). value: [C, k] the ReLU
    values a forward computed already: returned as they are, with the same gradient, so
    nothing reads `pre` or `pre_grad` and their matmul is dead code.
    """
    return jax.nn.relu(select_preactivations(xc, p, idx, pre, pre_grad, value))


@jax.custom_vjp
def valued_as(x: jax.Array, value: jax.Array) -> jax.Array:
    """`value` with the gradient of x. For value = relu(x) computed before, relu(valued_as(x,
    value)) has relu(x)'s value and gradient (the same mask, value > 0 where x > 0), and
    nothing reads x: its computation is dead code."""
    return value


def _valued_fwd(x, value):
    return value, None


def _valued_bwd(_, g):
    return g, None


valued_as.defvjp(_valued_fwd, _valued_bwd)


def decode(
    values: jax.Array, idx: jax.Array, w_dec: jax.Array, dense: bool, dtype: str = "float32"
) -> jax.Array:
    """sum_j values[:, j] * W_dec[idx[:, j]]: [C, k] -> [C, d] float32; idx distinct per row
    (a top-k's), which makes the codes' scatter and its gradient plain scatters (with
    duplicates allowed, JAX differentiates a scatter by scattering ids to find each winner)."""
    if dense:
        rows = jnp.arange(values.shape[0])[:, None]
        codes = jnp.zeros((values.shape[0], w_dec.shape[0]), dtype)
        codes = codes.at[rows, idx].set(values.astype(dtype), unique_indices=True)
        return precision.einsum("cl,ld->cd", codes, w_dec, dtype)
    return sparse_rows.gather_decode(values, idx, w_dec, dtype)


class Forward(NamedTuple):
    """One expert's forward on its buffer ([C, ...] rows, float32 but the ids)."""

    recon: jax.Array  # [C, d] W_dec^T z, ungated, no b_dec
    latents: jax.Array  # [C, k] the chosen latents' values
    indices: jax.Array  # [C, k] int32 their ids
    fired: jax.Array  # [L] valid rows on which each latent was active
    selected: jax.Array | None = None  # 'jump' rule: [C, k] their pre-activations
    l0: jax.Array | None = None  # 'jump' rule: [] valid rows' L0, straight-through for theta


def centred_forward(
    p: ExpertParams,
    buf: ExpertRows,
    b_dec: jax.Array,
    s: ExpertSettings,
    chosen: tuple[jax.Array, jax.Array] | None = None,
) -> Forward:
    """One expert's SAE on its buffer, by the activation rule s.rule.

    p: one expert's weights; buf: its rows (x [C, d] centred in the compute dtype, valid [C]
    False for empty slots); b_dec: [d] (for its gradient); chosen: (indices, values) [C, k]
    that a forward of the same weights and tokens returned (values: the ReLU values for
    'topk', the pre-activations for 'jump'), reused instead of the selection and the encoder
    values (a backward then needs no encoder matmul; see blocks.map_blocks).
    'topk': the k largest pre-activations, ReLU'd. 'jump': of the k largest pre - threshold
    (p.threshold [L]), those over the threshold (kernels/activations.py's jumprelu).
    """
    xc, dense, dtype = buf.x, s.dense(p.w_enc.shape[0]), s.dtype
    chosen = buf.chosen if chosen is None else chosen
    if s.encode_only:
        return candidates(p, buf, s)
    p = with_b_dec_grad(p, b_dec, looped=not dense)
    pre_grad = dense_preactivations(xc, p, dtype)
    pre = jax.lax.stop_gradient(pre_grad)
    validf = buf.valid.astype(jnp.float32)[:, None]
    extra = {}
    if s.rule == "jump":
        threshold = row_thresholds(p.threshold, buf.gate, s.gated_threshold)
        idx, value = (_jump_top(pre, threshold, s.k), None) if chosen is None else chosen
        selected = select_preactivations(xc, p, idx, pre, pre_grad if dense else None, value)
        theta, bandwidth = thresholds_at(threshold, idx), jnp.float32(s.bandwidth)
        latents = activations.jumprelu(selected, theta, bandwidth)
        extra = dict(selected=jax.lax.stop_gradient(selected),
                     l0=jnp.sum(validf * activations.step(selected, theta, bandwidth)))  # fmt: skip
    else:
        idx, value = (jax.lax.top_k(pre, s.k)[1], None) if chosen is None else chosen
        latents = encode_selected(xc, p, idx, pre, pre_grad if dense else None, value)
    recon = decode(latents, idx, p.w_dec, dense, dtype)
    active = (latents > 0) * validf
    fired = jnp.zeros(p.w_enc.shape[0], jnp.float32).at[idx].add(active)
    return Forward(recon, latents, idx, fired, **extra)


def _jump_top(pre: jax.Array, threshold: jax.Array, k: int) -> jax.Array:
    """[C, k] ids of each row's k largest pre - threshold ([L] or [C, L]; gradient-free)."""
    return jax.lax.top_k(pre - jax.lax.stop_gradient(threshold), k)[1]


def row_thresholds(threshold: jax.Array, gate: jax.Array, gated: bool) -> jax.Array:
    """The 'jump' rule's thresholds on the pre-activations: threshold [L] as it is, or, for a
    threshold on gated values (ExpertSettings.gated_threshold), each row's threshold / gate
    [C, L] (an empty row, gate 0, keeps nothing)."""
    if not gated:
        return threshold
    gate = jax.lax.stop_gradient(gate)[:, None]
    return jnp.where(gate > 0, threshold / jnp.where(gate > 0, gate, 1.0), jnp.inf)


def thresholds_at(threshold: jax.Array, idx: jax.Array) -> jax.Array:
    """The thresholds of latents idx [C, k]: threshold [L] or [C, L] (`row_thresholds`)."""
    if threshold.ndim == 1:
        return threshold[idx]
    return jnp.take_along_axis(threshold, idx, axis=1)


def select_preactivations(xc, p: ExpertParams, idx, pre, pre_grad=None, value=None):
    """The pre-activations of latents idx [C, k] -> [C, k] float32, with gradient (see
    `encode_selected`, of which this is the part before the ReLU)."""
    if pre_grad is not None:
        selected = jnp.take_along_axis(pre_grad, idx, axis=1)
    else:
        selected = sparse_rows.selected_preactivations(pre, idx, xc, p.w_enc, p.b_enc)
    return selected if value is None else valued_as(selected, value)


def candidates(p: ExpertParams, buf: ExpertRows, s: ExpertSettings) -> Forward:
    """The first stage of a selection over several rows (dispatch/global_topk.py): each row's
    k candidates of this expert by its rule, without gradient, decode or AuxK. Returns a
    Forward with a zero recon [C, d] and zero fired [L]; latents [C, k] are the values the
    selection compares, zero in rows that hold no token: the ReLU values for 'topk', the
    JumpReLU values for 'jump', whose pre-activations are in `selected`."""
    p = jax.lax.stop_gradient(p)
    pre = dense_preactivations(buf.x, p, s.dtype)
    validf = buf.valid.astype(jnp.float32)[:, None]
    recon = jnp.zeros(buf.x.shape, jnp.float32)
    fired = jnp.zeros(p.w_enc.shape[0], jnp.float32)
    if s.rule == "jump":
        threshold = row_thresholds(p.threshold, buf.gate, s.gated_threshold)
        idx = _jump_top(pre, threshold, s.k)
        selected = jnp.take_along_axis(pre, idx, axis=1)
        latents = selected * (selected > thresholds_at(threshold, idx)) * validf
        return Forward(recon, latents, idx, fired, selected)
    value, idx = jax.lax.top_k(pre, s.k)
    return Forward(recon, jax.nn.relu(value) * validf, idx, fired)


def prefix_errors(
    buf: ExpertRows, fwd: Forward, w_dec: jax.Array, b_dec: jax.Array, s: ExpertSettings
) -> jax.Array:
    """Matryoshka: for each prefix end m in s.prefixes, the sum over valid rows of
    ||x - b_dec - gate * W_dec[:m]^T z[:m]||^2, the row's error with only its latents below
    m (b_dec gets its gradient here: the rows hold x - b_dec without it).
    The prefixes' decodes are one dense product cut at the prefix ends: the codes [C, m_last]
    of the latents below the last end times W_dec's groups of rows between two ends, summed
    group by group; about the FLOPs of a dense decode of m_last latents whatever the kernel.
    Returns [len(prefixes)] float32. (The whole dictionary's is the model's own error.)"""
    g = jax.lax.stop_gradient(buf.gate)[:, None]
    validf = buf.valid.astype(jnp.float32)[:, None]
    residual = buf.x.astype(jnp.float32) - (b_dec - jax.lax.stop_gradient(b_dec))
    last = s.prefixes[-1]
    rows = jnp.arange(fwd.latents.shape[0])[:, None]
    below = fwd.indices < last
    codes = jnp.zeros((fwd.latents.shape[0], last), s.dtype)
    codes = codes.at[rows, jnp.where(below, fwd.indices, last)].add(
        (fwd.latents * below).astype(s.dtype), mode="drop"
    )
    errs, start = [], 0
    for end in s.prefixes:
        part = precision.einsum("cl,ld->cd", codes[:, start:end], w_dec[start:end], s.dtype)
        residual = residual - g * part
        errs.append(jnp.sum(validf * residual**2))
        start = end
    return jnp.stack(errs)


def expert_out(
    p: ExpertParams,
    buf: ExpertRows,
    b_dec: jax.Array,
    dead_ids: jax.Array | None,
    s: ExpertSettings,
    chosen: tuple[jax.Array, jax.Array] | None = None,
) -> ExpertOut:
    """One expert on one buffer of its tokens: the forward and, given dead ids, AuxK.

    p leaves for one expert ([L, d], [L]); buf [C, ...] rows; dead_ids [B] int32
    (`auxk.compact_dead`) or None (no AuxK); chosen: see `centred_forward`.
    Returns ExpertOut for this buffer (recon [C, d], ..., fired [L], AuxK sums [], and the
    kind's sums [S] where it has any).
    """
    fwd = centred_forward(p, buf, b_dec, s, chosen)
    recon, latents, idx, fired = fwd[:4]
    zero = zeros_varying((), recon.dtype, recon)
    out = ExpertOut(recon, latents, idx, fired, zero, zero, selected=fwd.selected)
    if s.prefixes and not s.encode_only:
        out = out._replace(kind_sums=prefix_errors(buf, fwd, p.w_dec, b_dec, s))
    elif fwd.l0 is not None:
        out = out._replace(kind_sums=fwd.l0[None])
    if dead_ids is None or s.k_aux == 0 or s.encode_only:
        return out
    if s.aux_out:
        aux, _ = auxk_recon(p, buf, dead_ids, s)
        return out._replace(aux_recon=aux)
    err, norm = auxk_sums(p, buf, dead_ids, recon, s)
    return out._replace(aux_err=err, aux_norm=norm)


def run_experts(
    p: ExpertParams,
    bufs: ExpertRows,
    b_dec: jax.Array,
    dead_ids: jax.Array | None,
    s: ExpertSettings,
) -> ExpertOut:
    """N experts on their buffers: p leaves [N, ...], bufs [N, C, ...] (x centred, see
    `centre`, in the compute dtype s.dtype), b_dec [d], dead_ids [N, B] (`auxk.compact_dead`;
    None: no AuxK). Whether any latent is dead, and the bucket B, are decided once per step,
    outside (see training/step.py), so a step without dead latents compiles no AuxK at all.
    Returns ExpertOut with [N, ...] leaves and the AuxK sums summed over experts.
    """
    one = functools.partial(expert_out, s=s)
    if s.dense(p.w_enc.shape[1]):  # batched matmuls
        dead_axis = None if dead_ids is None else 0
        out = jax.vmap(one, in_axes=(0, 0, None, dead_axis))(p, bufs, b_dec, dead_ids)
    else:  # one expert at a time: vmapped, the gather kernel's row gathers ran slower
        out = jax.lax.map(lambda a: one(a[0], a[1], b_dec, a[2]), (p, bufs, dead_ids))
    kind_sums = None if out.kind_sums is None else out.kind_sums.sum(axis=0)
    return out._replace(aux_err=out.aux_err.sum(), aux_norm=out.aux_norm.sum(),
                        kind_sums=kind_sums)  # fmt: skip
