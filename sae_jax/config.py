"""Configuration as data: frozen dataclasses bound by gin, validated before any compilation."""

from __future__ import annotations

import dataclasses
import math

import gin

EXPERT_KERNELS = ("auto", "dense", "gather")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
DISPATCHES = ("capacity", "dropless")


class ConfigError(ValueError):
    """A bad configuration value; the message is one line meant for the user."""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SAEConfig:
    """The Switch SAE's shape. `num_experts = 1` is a plain TopK SAE.

    d: input dimension (set from the data, not from gin).
    num_latents: total dictionary width M, split evenly over the experts.
    k: active latents per token, chosen inside the routed expert.
    k_aux: dead latents used by the AuxK loss (capped at the latents per expert; 0 turns it off).
    capacity_factor / eval_capacity_factor: expert buffer size C = ceil(cf * tokens / N).
    expert_kernel: 'dense', 'gather' or 'auto' (dense up to 1024 latents per expert); see
        sae_jax/experts.py. Both compute the same function and gradients.
    compute_dtype: 'float32', 'bfloat16' or 'auto' (float32 on CPU, bfloat16 on GPU/TPU): the
        dtype of the expert matmul operands and of the dispatched token buffers; they
        accumulate in float32, and parameters, router, losses and metrics stay float32.
    dispatch: 'capacity' ([N, C, d] buffers; tokens past C are dropped) or 'dropless' (tokens
        sorted by expert, each expert run on blocks of its own tokens; sae_jax/dropless.py).
        'dropless' needs an 'expert' mesh axis of 1 for now.
    block_size: rows per expert block of the dropless dispatch; 0 picks one from the tokens
        per device and N (`dropless.auto_block_size`).
    """

    d: int = 0
    num_latents: int = 1024
    num_experts: int = 1
    k: int = 32
    k_aux: int = 256
    encoder_bias: bool = True
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    expert_kernel: str = "auto"
    compute_dtype: str = "auto"
    dispatch: str = "capacity"
    block_size: int = 0

    @property
    def latents_per_expert(self) -> int:
        return self.num_latents // self.num_experts

    @property
    def k_aux_effective(self) -> int:
        return min(self.k_aux, self.latents_per_expert)

    def validate(self, need_d: bool = True) -> SAEConfig:
        """Raise ConfigError on a bad value; `need_d=False` before the data has set d."""
        _positive("NUM_LATENTS", self.num_latents)
        _positive("NUM_EXPERTS", self.num_experts)
        _positive("K", self.k)
        if need_d:
            _positive("d", self.d)
        if self.num_latents % self.num_experts:
            raise ConfigError(
                f"NUM_LATENTS={self.num_latents} is not divisible by NUM_EXPERTS={self.num_experts}"
            )
        if self.k > self.latents_per_expert:
            raise ConfigError(
                f"K={self.k} exceeds the latents per expert "
                f"(NUM_LATENTS/NUM_EXPERTS = {self.latents_per_expert})"
            )
        if self.expert_kernel not in EXPERT_KERNELS:
            raise ConfigError(f"expert_kernel={self.expert_kernel!r}: use auto, dense or gather")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(
                f"COMPUTE_DTYPE={self.compute_dtype!r}: use 'auto', 'float32' or 'bfloat16'"
            )
        if self.dispatch not in DISPATCHES:
            raise ConfigError(f"DISPATCH={self.dispatch!r}: use 'capacity' or 'dropless'")
        if (
            isinstance(self.block_size, bool)
            or not isinstance(self.block_size, int)
            or (self.block_size < 0)
        ):
            raise ConfigError(f"block_size={self.block_size!r} must be an integer >= 0 (0: auto)")
        if self.k_aux < 0:
            raise ConfigError(f"k_aux={self.k_aux} must be >= 0")
        for name, cf in (
            ("CAPACITY_FACTOR", self.capacity_factor),
            ("EVAL_CAPACITY_FACTOR", self.eval_capacity_factor),
        ):
            if not (isinstance(cf, int | float) and cf > 0 and math.isfinite(cf)):
                raise ConfigError(f"{name}={cf!r} must be a positive number")
        return self


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train: steps, batch, optimiser, losses, data and logging.

    lr: None picks base_lr / sqrt(latents per expert / 2**14): Gao et al.'s 1/sqrt(width) rule
        (their base_lr 2e-4), applied to the width of one expert, the TopK SAE a token sees.
    lb_alpha: load-balancing weight against the per-dimension MSE.
    dead_after_tokens: a latent that has not fired for this many training tokens is dead.
    mesh_shape: ('data', 'expert') device mesh; -1 = all remaining devices.
    """

    steps: int = 1000
    batch_size: int = 4096
    lr: float | None = None
    base_lr: float = 2e-4
    seed: int = 0
    lb_alpha: float = 3.0
    aux_weight: float = 1.0 / 32.0
    dead_after_tokens: int = 1_000_000
    decay_fraction: float = 0.2
    grad_clip: float = 1.0
    geometric_median_tokens: int = 8192
    train_data: str = "synthetic"
    eval_data: str = "synthetic"
    eval_every: int = 0
    eval_tokens: int = 65536
    log_every: int = 50
    mesh_shape: tuple[int, int] = (-1, 1)
    checkpoint_every: int = 500
    keep_checkpoints: int = 3

    def validate(self) -> TrainConfig:
        _positive("STEPS", self.steps)
        _positive("BATCH_SIZE", self.batch_size)
        _positive("LOG_EVERY", self.log_every)
        _positive("eval_tokens", self.eval_tokens)
        _positive("CHECKPOINT_EVERY", self.checkpoint_every)
        _positive("keep_checkpoints", self.keep_checkpoints)
        _positive("dead_after_tokens", self.dead_after_tokens)
        if self.eval_every < 0:
            raise ConfigError(f"EVAL_EVERY={self.eval_every} must be >= 0 (0: only at the end)")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"LR={self.lr!r} must be positive (or None for the default)")
        if not self.base_lr > 0:
            raise ConfigError(f"BASE_LR={self.base_lr!r} must be positive")
        if self.lb_alpha < 0:
            raise ConfigError(f"LB_ALPHA={self.lb_alpha} must be >= 0")
        if not 0 <= self.decay_fraction <= 1:
            raise ConfigError(f"decay_fraction={self.decay_fraction} must lie in [0, 1]")
        return self

    def learning_rate(self, latents_per_expert: int) -> float:
        if self.lr is not None:
            return self.lr
        return self.base_lr / math.sqrt(latents_per_expert / 2**14)


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a positive integer")
