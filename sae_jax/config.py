"""Configuration as data: frozen dataclasses bound by gin, validated before any compilation."""

from __future__ import annotations

import dataclasses
import math

import gin

EXPERT_KERNELS = ("auto", "dense", "gather")
RETIRED_KEYS = {"encoder_bias"}  # model-record keys of older versions, read and dropped
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
DISPATCHES = ("capacity", "dropless")
GROUPED_MATMULS = ("auto", "ragged_dot", "blocks")
FOLLOW = "TRAIN_DATA"  # EVAL_DATA's default: evaluate on TRAIN_DATA (TrainConfig.eval_spec)


# The activation kinds (kernels/activations.py has their functions; docs/activations.md).
@dataclasses.dataclass(frozen=True)
class Kind:
    """How an activation kind selects its active latents (static)."""

    train_rule: str  # 'topk' or 'jump': the expert kernel's own rule in training
    batch: bool  # training selects by a batch threshold over every row (two stages)
    infer_rule: str  # the kernel's rule at inference ('jump': a threshold per latent)
    learned_threshold: bool  # a threshold per latent is a parameter (log_threshold [N, L])
    prefixes: bool  # Matryoshka's nested prefix losses


KINDS: dict[str, Kind] = {
    "topk": Kind("topk", batch=False, infer_rule="topk", learned_threshold=False, prefixes=False),
    "batchtopk": Kind("topk", batch=True, infer_rule="jump", learned_threshold=False,
                      prefixes=False),
    "matryoshka": Kind("topk", batch=True, infer_rule="jump", learned_threshold=False,
                       prefixes=True),
    "jumprelu": Kind("jump", batch=False, infer_rule="jump", learned_threshold=True,
                     prefixes=False),
}  # fmt: skip
ACTIVATIONS = tuple(KINDS)


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
        sae_jax/kernels/expert.py. Both compute the same function and gradients.
    compute_dtype: 'float32', 'bfloat16' or 'auto' (float32 on CPU, bfloat16 on GPU/TPU): the
        dtype of the expert matmul operands and of the dispatched token buffers; they
        accumulate in float32, and parameters, router, losses and metrics stay float32.
    dispatch: 'capacity' ([N, C, d] buffers; tokens past C are dropped) or 'dropless' (tokens
        sorted by expert, each expert run on blocks of its own tokens;
        sae_jax/dispatch/dropless.py).
    block_size: rows per expert block of the dropless dispatch; 0 picks one from the tokens
        per device and N (`dropless.auto_block_size`).
    grouped_matmul: how dropless runs the experts whose tokens are all on the device:
        'ragged_dot' (sae_jax/dispatch/ragged_dot.py; native on TPU, a dense masked product on
        CPU and possibly on GPU), 'blocks' (sae_jax/dispatch/blocks.py) or 'auto' (ragged_dot on
        TPU with the dense kernel, else blocks). Across devices dropless always uses blocks.
    experts_per_token: e, the experts each token is routed to (its e most probable; at most
        num_experts, to which a larger e is lowered: a TopK SAE has e = 1). e = 1 is
        the Switch SAE; e > 1 picks the k active latents with one TopK across the e experts'
        latents together, each scaled by its expert's router probability (Scale SAE's global
        TopK, Xu et al. 2025; docs/routing.md).
    shared_latents / shared_k: an always-on shared dictionary of this many latents that every
        token uses beside its routed experts, with shared_k of the k active latents (0: none).
    feature_scaling: Scale SAE's feature scaling: each expert's encoder rows become
        mean + (1 + s) * (rows - mean), s a learned per-expert [d] vector (zero at init).
    router_bias: loss-free balancing (DeepSeek-V3): a per-expert bias added to the routing
        scores when choosing experts (not in the gate), nudged after each step towards equal
        load (TrainConfig.router_bias_rate); not a parameter the optimiser sees.
    activation: the experts' kind, 'topk', 'batchtopk', 'matryoshka' or 'jumprelu'
        (sae_jax/kernels/activations.py, docs/activations.md); k is the mean number of
        active latents per token every kind aims at (exact for TopK).
    k_max: the most latents a row of the non-TopK kinds keeps (its candidates); 0: 4 k,
        capped at the latents per expert.
    matryoshka_prefixes: Matryoshka's nested prefixes, as fractions of each expert's latents
        (the whole dictionary is the last prefix and not listed).
    jumprelu_bandwidth: JumpReLU's straight-through kernel width, relative to each threshold.
    """

    d: int = 0
    num_latents: int = 1024
    num_experts: int = 1
    k: int = 32
    k_aux: int = 256
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    expert_kernel: str = "auto"
    compute_dtype: str = "auto"
    dispatch: str = "capacity"
    block_size: int = 0
    grouped_matmul: str = "auto"
    experts_per_token: int = 1
    shared_latents: int = 0
    shared_k: int = 0
    feature_scaling: bool = False
    router_bias: bool = False
    activation: str = "topk"
    k_max: int = 0
    matryoshka_prefixes: tuple[float, ...] = (0.0625, 0.125, 0.25, 0.5)
    jumprelu_bandwidth: float = 0.1

    def __post_init__(self):
        if isinstance(self.matryoshka_prefixes, list):  # from a JSON record: hashable again
            object.__setattr__(self, "matryoshka_prefixes", tuple(self.matryoshka_prefixes))
        # e is at most N: EXPERTS_PER_TOKEN=2 in a config still trains a TopK SAE at N = 1.
        e, n = self.experts_per_token, self.num_experts
        if _is_int(e) and _is_int(n) and 1 <= n < e:
            object.__setattr__(self, "experts_per_token", n)

    @property
    def latents_per_expert(self) -> int:
        return self.num_latents // self.num_experts

    @property
    def k_aux_effective(self) -> int:
        return min(self.k_aux, self.latents_per_expert)

    @classmethod
    def from_record(cls, record: dict) -> SAEConfig:
        """The config a checkpoint's model record (`dataclasses.asdict`) describes. Keys of
        older versions that no longer configure anything (`encoder_bias`: every SAE had
        one) are dropped; fields a record lacks take their defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(record) - known - RETIRED_KEYS)
        if unknown:
            raise ConfigError(f"the checkpoint's model record has keys this version does not "
                              f"know ({', '.join(unknown)}); export it with the version that "
                              "wrote it")  # fmt: skip
        return cls(**{k: v for k, v in record.items() if k in known})

    def validate(self, need_d: bool = True) -> SAEConfig:
        """Raise ConfigError on a bad value; `need_d=False` before the data has set d."""
        check_types(self)
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
        if self.grouped_matmul not in GROUPED_MATMULS:
            raise ConfigError(
                f"grouped_matmul={self.grouped_matmul!r}: use auto, ragged_dot or blocks"
            )
        if self.k_aux < 0:
            raise ConfigError(f"k_aux={self.k_aux} must be >= 0")
        self._validate_routing()
        self._validate_activation()
        for name, cf in (
            ("CAPACITY_FACTOR", self.capacity_factor),
            ("EVAL_CAPACITY_FACTOR", self.eval_capacity_factor),
        ):
            if not (isinstance(cf, int | float) and cf > 0 and math.isfinite(cf)):
                raise ConfigError(f"{name}={cf!r} must be a positive number")
        return self

    def _validate_routing(self) -> None:
        e, n = self.experts_per_token, self.num_experts
        _positive("EXPERTS_PER_TOKEN", e)
        if e > n:
            raise ConfigError(f"EXPERTS_PER_TOKEN={e} exceeds NUM_EXPERTS={n}")
        if self.shared_latents < 0 or self.shared_k < 0:
            raise ConfigError("SHARED_LATENTS and SHARED_K must be >= 0")
        if (self.shared_latents > 0) != (self.shared_k > 0):
            raise ConfigError(
                f"SHARED_LATENTS={self.shared_latents} and SHARED_K={self.shared_k}: set both "
                "(a shared dictionary and its share of K) or neither"
            )
        if self.shared_k > min(self.shared_latents, self.k - 1) and self.shared_k:
            raise ConfigError(
                f"SHARED_K={self.shared_k} must be below K={self.k} and at most "
                f"SHARED_LATENTS={self.shared_latents}"
            )
        if e * self.latents_per_expert < self.routed_k:
            raise ConfigError(
                f"K - SHARED_K = {self.routed_k} exceeds the latents of the "
                f"{e} routed expert(s) ({e * self.latents_per_expert})"
            )

    def _validate_activation(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"ACTIVATION={self.activation!r}: use one of "
                              f"{', '.join(map(repr, ACTIVATIONS))}")  # fmt: skip
        if self.k_max and not self.routed_k <= self.k_max <= self.latents_per_expert:
            raise ConfigError(f"SAEConfig.k_max={self.k_max} must lie between K - SHARED_K = "
                              f"{self.routed_k} and the latents per expert "
                              f"({self.latents_per_expert}), or be 0 (auto)")  # fmt: skip
        if not self.jumprelu_bandwidth > 0:
            raise ConfigError(f"SAEConfig.jumprelu_bandwidth={self.jumprelu_bandwidth} must be > 0")
        if self.activation != "matryoshka":
            return
        if self.experts_per_token > 1 or self.shared_latents:
            raise ConfigError("ACTIVATION='matryoshka' needs EXPERTS_PER_TOKEN=1 and no "
                              "SHARED_LATENTS (its prefix losses are per routed row)")  # fmt: skip
        fractions = tuple(self.matryoshka_prefixes)
        steps = zip((0, *fractions), (*fractions, 1), strict=True)
        if not fractions or any(not a < b for a, b in steps):
            raise ConfigError(f"SAEConfig.matryoshka_prefixes={fractions}: increasing "
                              "fractions in (0, 1), the whole dictionary left out")  # fmt: skip

    @property
    def kind(self) -> Kind:
        """How this config's activation selects latents (kernels.activations.KINDS)."""
        return KINDS[self.activation]

    @property
    def candidates_per_row(self) -> int:
        """k' of the non-TopK kinds: k_max, or 4 x (K - SHARED_K) within the expert."""
        return self.k_max or min(4 * self.routed_k, self.latents_per_expert)

    @property
    def prefix_ends(self) -> tuple[int, ...]:
        """Matryoshka's prefix ends in each expert's latents (at least 1 each, distinct)."""
        lat = self.latents_per_expert
        ends = sorted({max(1, round(f * lat)) for f in self.matryoshka_prefixes} - {lat})
        return tuple(ends)

    @property
    def dictionary_size(self) -> int:
        """Every latent: the experts' NUM_LATENTS and the shared dictionary's (ids after them)."""
        return self.num_latents + self.shared_latents

    @property
    def routed_k(self) -> int:
        """The active latents chosen among the routed experts' (k without the shared ones)."""
        return self.k - self.shared_k


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train: steps, batch, optimiser, losses, data and logging.

    lr: one fixed LR for every parameter group. None: each group's own, by Gao et al.'s
        1/sqrt(width) rule, base_lr / sqrt(width / 2**14) (their base_lr 2e-4), the experts at
        the width of the whole routed dictionary, NUM_LATENTS, a shared dictionary at its own
        (training/learning_rates.py).
    router_lr: the router's LR (w_router, b_router); None: the experts'.
    lb_alpha: load-balancing weight against the per-dimension MSE; it applies with
        SAEConfig.router_bias too (0: balance by the bias alone).
    router_bias_rate: with SAEConfig.router_bias, how far each step moves an expert's routing
        bias, in units of the router's LR: -rate x router LR x sign(its load - the mean load)
        (training/learning_rates.router_bias_step). The router's logits move with its Adam
        steps, and the bias has to keep up with them: at a fixed step of 1e-3 a top-2 Switch
        of 32 experts dropped half its rows over one pass at capacity factor 1.25; at 10 x its
        LR, 0.2% (docs/routing.md, "Bias rate").
    router_z_weight: weight of the router z-loss (ST-MoE), mean over tokens of
        logsumexp(router logits)^2; 0: off.
    l0_coeff: JumpReLU's L0 penalty, l0_coeff x (batch variance per dimension) x (L0 / K -
        1)^2 against the per-dimension MSE: it pulls the mean L0 towards K from both sides.
    threshold_rate: BatchTopK and Matryoshka: each step moves the inference threshold this
        share of the way to the batch's threshold (an exponential average).
    threshold_lr: JumpReLU's log-thresholds' Adam LR (their own group; None: the experts').
    grad_clip: the gradients are scaled down to this global norm where they exceed it
        (after the decoder projection). 1.0 is far above these models' usual norm (~1e-2 on
        normalised inputs) and so only stops runaway steps; the BatchTopK configs clip at 0.01,
        where a Switch router's rare spikes otherwise set its Adam state back
        (docs/activations.md, "A gradient clip").
    dead_after_tokens: a latent that has not fired for this many training tokens is dead.
    aux_max_share: AuxK takes at most this share of an expert's latents per step (rounded down
        to a dead-id bucket, see kernels.auxk.max_bucket); with more dead ones they take turns.
        1.0: every dead latent every step, as Gao et al.
    mesh_shape: ('data', 'expert') device mesh; -1 = all remaining devices.
    compile_ahead: compile the training step of every AuxK bucket the run can use before the
        first step (training/step.py), so that no step stops for a compile; False: each one
        compiles at its first use (a shorter start when latents may never die).
    eval_data: 'TRAIN_DATA' (FOLLOW, the default) follows train_data (`eval_spec`): shards
        evaluate on the training shards themselves, 'synthetic' on a held-out synthetic stream.
    """

    steps: int = 1000
    batch_size: int = 4096
    lr: float | None = None
    base_lr: float = 2e-4
    router_lr: float | None = None
    seed: int = 0
    lb_alpha: float = 3.0
    router_bias_rate: float = 10.0
    router_z_weight: float = 0.0
    l0_coeff: float = 1.0
    threshold_rate: float = 0.05
    threshold_lr: float | None = 3e-2
    aux_weight: float = 1.0 / 32.0
    dead_after_tokens: int = 1_000_000
    aux_max_share: float = 1.0 / 32.0
    warmup_fraction: float = 0.0
    decay_fraction: float = 0.2
    grad_clip: float = 1.0
    geometric_median_tokens: int = 8192
    train_data: str = "synthetic"
    eval_data: str = FOLLOW
    eval_every: int = 0
    eval_tokens: int = 65536
    log_every: int = 50
    mesh_shape: tuple[int, int] = (-1, 1)
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    compile_ahead: bool = True

    def validate(self) -> TrainConfig:
        check_types(self)
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
        if self.router_lr is not None and not self.router_lr > 0:
            raise ConfigError(f"ROUTER_LR={self.router_lr!r} must be positive (or None)")
        if not self.base_lr > 0:
            raise ConfigError(f"BASE_LR={self.base_lr!r} must be positive")
        if self.lb_alpha < 0:
            raise ConfigError(f"LB_ALPHA={self.lb_alpha} must be >= 0")
        if self.router_bias_rate < 0 or self.router_z_weight < 0:
            raise ConfigError("ROUTER_BIAS_RATE and ROUTER_Z_WEIGHT must be >= 0")
        if self.l0_coeff < 0:
            raise ConfigError(f"L0_COEFF={self.l0_coeff} must be >= 0")
        if not 0 < self.threshold_rate <= 1:
            raise ConfigError(
                f"TrainConfig.threshold_rate={self.threshold_rate} must lie in (0, 1]"
            )
        if self.threshold_lr is not None and not self.threshold_lr > 0:
            raise ConfigError(f"TrainConfig.threshold_lr={self.threshold_lr!r} must be positive")
        if not self.grad_clip > 0:
            raise ConfigError(f"TrainConfig.grad_clip={self.grad_clip!r} must be positive")
        if not 0 < self.aux_max_share <= 1:
            raise ConfigError(f"TrainConfig.aux_max_share={self.aux_max_share} must lie in (0, 1]")
        if not 0 <= self.decay_fraction <= 1:
            raise ConfigError(f"decay_fraction={self.decay_fraction} must lie in [0, 1]")
        if not 0 <= self.warmup_fraction <= 1 - self.decay_fraction:
            raise ConfigError(
                f"warmup_fraction={self.warmup_fraction} must lie in [0, 1 - decay_fraction]"
            )
        return self

    @property
    def eval_spec(self) -> str:
        """The evaluation data as used: EVAL_DATA, or TRAIN_DATA when EVAL_DATA is FOLLOW."""
        return self.train_data if self.eval_data == FOLLOW else self.eval_data

    def learning_rate(self, width: int) -> float:
        """The LR of a dictionary of `width` latents: LR, or base_lr / sqrt(width / 2**14)."""
        if self.lr is not None:
            return self.lr
        return self.base_lr / math.sqrt(width / 2**14)


# The configs/base.gin macro that binds each field, to name it in messages as the user
# writes it (tests/test_cli.py checks this against base.gin); other fields: Class.field.
MACROS = {
    "SAEConfig": {
        "num_latents": "NUM_LATENTS", "num_experts": "NUM_EXPERTS", "k": "K",
        "capacity_factor": "CAPACITY_FACTOR", "eval_capacity_factor": "EVAL_CAPACITY_FACTOR",
        "compute_dtype": "COMPUTE_DTYPE", "dispatch": "DISPATCH",
        "experts_per_token": "EXPERTS_PER_TOKEN", "shared_latents": "SHARED_LATENTS",
        "shared_k": "SHARED_K", "feature_scaling": "FEATURE_SCALING",
        "router_bias": "ROUTER_BIAS", "activation": "ACTIVATION",
    },
    "TrainConfig": {
        "steps": "STEPS", "batch_size": "BATCH_SIZE", "lr": "LR", "seed": "SEED",
        "lb_alpha": "LB_ALPHA", "train_data": "TRAIN_DATA", "eval_data": "EVAL_DATA",
        "eval_every": "EVAL_EVERY", "log_every": "LOG_EVERY", "mesh_shape": "MESH_SHAPE",
        "checkpoint_every": "CHECKPOINT_EVERY", "base_lr": "BASE_LR", "router_lr": "ROUTER_LR",
        "router_bias_rate": "ROUTER_BIAS_RATE", "router_z_weight": "ROUTER_Z_WEIGHT",
        "l0_coeff": "L0_COEFF",
    },
}  # fmt: skip


def binding_name(cls: type, field: str) -> str:
    """How a user sets `field` of `cls`: its macro (`K`) or `SAEConfig.k_aux`."""
    return MACROS.get(cls.__name__, {}).get(field, f"{cls.__name__}.{field}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# Field annotations (strings, as written above) -> (what a value must be, test).
_TYPES = {
    "int": ("an integer", _is_int),
    "float": ("a number", _is_number),
    "float | None": ("a number or None", lambda v: v is None or _is_number(v)),
    "str": ("a quoted string", lambda v: isinstance(v, str)),
    "bool": ("True or False", lambda v: isinstance(v, bool)),
    "tuple[int, int]": (
        "a pair of integers like (1, 8)",
        lambda v: isinstance(v, tuple | list) and len(v) == 2 and all(map(_is_int, v)),
    ),
    "tuple[float, ...]": (
        "a tuple of numbers like (0.25, 0.5)",
        lambda v: isinstance(v, tuple | list) and all(map(_is_number, v)),
    ),
}


def check_types(cfg: SAEConfig | TrainConfig) -> None:
    """A one-line ConfigError naming the binding when a field holds a value of the wrong type
    (`LR='abc'`), before any comparison could raise a TypeError."""
    for field in dataclasses.fields(cfg):
        what, ok = _TYPES[field.type]
        value = getattr(cfg, field.name)
        if not ok(value):
            raise ConfigError(f"{binding_name(type(cfg), field.name)}={value!r} must be {what}")


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a positive integer")
