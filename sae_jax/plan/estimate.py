"""Analytic memory and FLOPs of one training step, per device.

Memory terms (float32 state; W = one expert tensor's local shard, N_local x L x d x 4 bytes):
  parameters       w_enc + w_dec (2W), b_enc, and the replicated b_dec, b_router, w_router
  optimizer_state  Adam's two moments: 2 x parameters (+ its step count)
  counters         since_fired [N_local, L] int32, the step and the recent dead counts
  batch            the device's share of the input batch [T_local, d]
  gradients        one gradient per parameter: = parameters
  other            the rest of XLA's temporaries: see `other_temporaries`
The new state is donated (aliased to the old), so outputs add nothing but the metrics.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from sae_jax.config import SAEConfig, TrainConfig
from sae_jax.experts import use_dense
from sae_jax.train_step import DEAD_COUNT_LAG

F32 = 4
# Expert-sized [N_local, L, d] float32 temporaries the step holds besides the gradients
# (measured on XLA:CPU, configs/pod.gin on 64 devices: one, the zeros the gather kernel's row
# gradients are scattered into; the optimizer update runs a chunk at a time, see
# sae_jax/update.py). Below float32 the step also holds w_enc cast to the compute dtype for
# the [S, L] pre-activation matmul. Adjust these when the step changes.
UPDATE_EXPERT_BUFFERS = 1
# Elementwise FLOPs per parameter of the update: global-norm clipping (2), Adam's moments
# and step (~12), the decoder-gradient projection and row renormalisation (~6).
UPDATE_FLOPS_PER_PARAM = 20


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The sizes a step's cost depends on (global unless named local)."""

    d: int
    num_latents: int
    num_experts: int
    k: int
    k_aux: int
    batch: int
    data: int  # mesh axis sizes
    expert: int
    capacity_factor: float
    kernel: str = "auto"
    compute_dtype: str = "float32"

    @classmethod
    def of(cls, cfg: SAEConfig, tcfg: TrainConfig, mesh_shape: tuple[int, int]) -> Shapes:
        return cls(
            cfg.d, cfg.num_latents, cfg.num_experts, cfg.k, cfg.k_aux_effective,
            tcfg.batch_size, mesh_shape[0], mesh_shape[1], cfg.capacity_factor,
            cfg.expert_kernel, cfg.compute_dtype,
        )  # fmt: skip

    @property
    def devices(self) -> int:
        return self.data * self.expert

    @property
    def local_experts(self) -> int:
        return self.num_experts // self.expert

    @property
    def latents(self) -> int:  # L, per expert
        return self.num_latents // self.num_experts

    @property
    def local_tokens(self) -> int:
        return self.batch // self.devices

    @property
    def slots(self) -> int:
        """Token slots a device's experts run on: N_local x E x C = N x C,
        C = ceil(cf x T_local / N) (one buffer row per (source device, expert))."""
        cap = math.ceil(self.capacity_factor * self.local_tokens / self.num_experts)
        return self.num_experts * cap

    @property
    def dense(self) -> bool:
        return use_dense(self.kernel, self.latents)

    @property
    def expert_tensor_bytes(self) -> int:
        """W: one [N_local, L, d] float32 shard."""
        return self.local_experts * self.latents * self.d * F32


def memory(s: Shapes) -> dict[str, int]:
    """Bytes per device of each term (see the module docstring) and their total."""
    router = _router_params(s)
    params = (2 * s.expert_tensor_bytes + s.local_experts * s.latents * F32 + s.d * F32
              + router * F32)  # fmt: skip
    terms = {
        "parameters": params,
        "optimizer_state": 2 * params + F32,
        "counters": s.local_experts * s.latents * F32 + (1 + DEAD_COUNT_LAG) * F32,
        "batch": s.local_tokens * s.d * F32,
        "gradients": params,
        "other": other_temporaries(s),
    }
    terms["total"] = sum(terms.values())
    return terms


def _router_params(s: Shapes) -> int:
    return s.d * s.num_experts + s.d if s.num_experts > 1 else 0


def other_temporaries(s: Shapes) -> int:
    """Temporaries besides the gradients: the larger of the expert-sized buffers the step
    holds (UPDATE_EXPERT_BUFFERS x W, w_enc in the compute dtype below float32, and for the
    gather kernel AuxK's gradients at its largest bucket, 2 x W) and the
    activations of the forward and backward pass, which XLA places in the same memory at
    another time."""
    held = UPDATE_EXPERT_BUFFERS * s.expert_tensor_bytes
    if not s.dense and s.k_aux:  # AuxK with every latent dead: its dense W_enc and W_dec
        held += 2 * s.expert_tensor_bytes  # gradients beside the gather kernel's sparse ones
    if s.compute_dtype != "float32":
        held += s.expert_tensor_bytes * jnp.dtype(s.compute_dtype).itemsize // F32
    return max(held, activations(s))


def activations(s: Shapes) -> int:
    """Largest live activations, per device: the capacity buffers [S, d] on both sides of
    the all_to_alls, the pre-activations [S, L] and either the dense kernel's codes and
    their gradient ([S, L] each) or the gather kernel's rows ([S, k, d], encoder and
    decoder), plus AuxK's at its largest bucket (every latent dead)."""
    slots, tokens = s.slots, s.local_tokens
    buffers = 4 * (slots + tokens) * s.d * F32
    pre = slots * s.latents * F32
    kernel = 2 * pre if s.dense else 2 * slots * s.k * s.d * F32
    # AuxK with every latent dead: the [S, L] pre-activations of the dead columns, their
    # top-k selection mask and their gradient.
    aux = 3 * pre
    return buffers + pre + kernel + aux


def flops_per_token(s: Shapes, auxk: bool) -> dict[str, float]:
    """Matmul FLOPs per input token of the forward and backward pass (2 per multiply-add),
    plus the elementwise update of the local expert shards (replicated over 'data'). Expert
    work is per slot, so it is scaled by S / T_local (capacity factor and rounding). The
    router's backward reaches w_router and b_router."""
    ld, kd, pad = s.latents * s.d, s.k * s.d, s.slots / s.local_tokens
    if s.dense:  # pre-activations with grad; codes [C, L] @ W_dec
        enc, dec, aux = 4 * ld, 6 * ld, 10 * ld
    else:  # gradient-free pre-activations; k gathered rows with grad
        enc, dec, aux = 2 * ld + 6 * kd, 6 * kd, 10 * ld
    terms = {
        "router": 6.0 * s.d * s.num_experts if s.num_experts > 1 else 0.0,
        "encoder": pad * enc,
        "decoder": pad * dec,
        "auxk": pad * aux if auxk and s.k_aux else 0.0,
        "update": UPDATE_FLOPS_PER_PARAM * 2 * s.num_latents * s.d * s.data / s.batch,
    }
    terms["total"] = sum(terms.values())
    return terms
