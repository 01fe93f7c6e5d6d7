"""orbax checkpoints of the whole training state, restorable onto any mesh.

A checkpoint holds the TrainState (parameters, Adam state, step, dead-latent counters) and a
JSON record: the model and training configs (to refuse an incompatible workdir, and to name
what a resumed run changes), the data reader position, the resolved gin config text. On a
local disk orbax writes each step to a temporary directory and renames it when complete; on an
object store (a gs:// workdir), which cannot rename, it writes the step directory in place and
a commit_success.txt marker last. Either way a save cut off mid-write is never listed and the
last complete one is used.
`restore_params` reads the parameters alone (no Adam state), placed on a mesh of the caller's
choosing: what export needs, on any topology.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import inspect
import re
import sys
from pathlib import Path
from typing import Any

import gin
import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from orbax.checkpoint.checkpoint_managers import preservation_policy
from orbax.checkpoint.path import step as orbax_step

from sae_jax import storage
from sae_jax.config import ConfigError, SAEConfig, TrainConfig, binding_name
from sae_jax.data import ActivationData, SyntheticData
from sae_jax.data.source import source_class
from sae_jax.mesh import make_mesh
from sae_jax.model.switch import BatchThreshold, RouterBias, SwitchSAE

# Another value: the state cannot restore (router_bias: the state holds a RouterBias or not).
MODEL_KEYS = ("d", "num_latents", "num_experts", "router_bias", "shared_latents",
              "feature_scaling", "activation")  # fmt: skip
# Another value restores but trains another model: named, and refused unless allowed.
CHANGE_KEYS = {
    SAEConfig: ("k", "k_aux", "capacity_factor", "eval_capacity_factor", "compute_dtype",
                "dispatch", "experts_per_token", "shared_k", "k_max", "matryoshka_prefixes",
                "jumprelu_bandwidth"),
    TrainConfig: ("steps", "batch_size", "lr", "base_lr", "router_lr", "seed", "lb_alpha",
                  "aux_weight", "warmup_fraction", "decay_fraction", "grad_clip",
                  "dead_after_tokens", "aux_max_share", "train_data", "router_bias_rate",
                  "router_z_weight", "l0_coeff", "threshold_rate", "threshold_lr"),
}  # fmt: skip
DATA_TRAIN_KEYS = ("train_data", "seed")  # TrainConfig fields that choose the training data
# The data source's parameters that change the training stream (another value: the data would
# change mid-run), named as the user sets them. ActivationData's seed is TrainConfig.seed (SEED);
# its prefetch_batches and process change nothing in the stream.
DATA_KEYS = {
    SyntheticData: {"dim": "SYNTH_DIM", "num_features": "SYNTH_FEATURES",
                    "num_groups": "SyntheticData.num_groups",
                    "group_share": "SyntheticData.group_share",
                    "mean_active": "SyntheticData.mean_active", "power": "SyntheticData.power",
                    "seed": "SyntheticData.seed"},
    ActivationData: {"outlier_norm_factor": "OUTLIER_NORM_FACTOR",
                     "shuffle_buffer": "ActivationData.shuffle_buffer",
                     "chunk_tokens": "ActivationData.chunk_tokens",
                     "scale_tokens": "ActivationData.scale_tokens"},
}  # fmt: skip


CLOSED_LOOP = "Event loop is closed"


def quiet_closed_loop_callbacks() -> None:
    """Silence what a failed restore leaves behind: the reads still in flight complete
    into orbax's event loop, closed by then, and each reports an unraisable
    `RuntimeError: Event loop is closed` (some 130 lines of tracebacks after the fallback
    line, none about the run). Only that error is dropped; any other still reaches the
    previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop", False):
        return

    def hook(unraisable):
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == CLOSED_LOOP):
            previous(unraisable)

    hook.drops_closed_loop = True
    sys.unraisablehook = hook


class UnreadableCheckpoint(Exception):
    """A checkpoint whose files do not read back (truncated, corrupted): `reason` is the
    storage layer's first line."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"checkpoint at step {step} does not restore ({reason})")
        self.step, self.reason = step, reason


class Checkpointer:
    """Asynchronous saves at the steps the caller chooses; keeps the last `keep`."""

    def __init__(self, workdir: str | Path, keep: int = 3, create: bool = True):
        """`workdir`: a local directory or a URL (gs://...). create=False only reads: a missing
        directory is not made (it has no steps)."""
        root = storage.path(workdir)
        self.directory = (root if storage.is_url(workdir) else root.absolute()) / "checkpoints"
        storage.forget_listings(self.directory)  # the store as it is now, not as last listed
        self.keep, self.create = keep, create
        self.preserved: int | None = None
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def preserve(self, step: int) -> None:
        """Keep the checkpoint at `step` beside the last `keep` until `release(step)`: the
        final checkpoint of a finished run that is being extended stays until the new final
        one exists."""
        self.preserved = step
        self.manager.close()
        policy = preservation_policy.AnyPreservationPolicy(
            [preservation_policy.LatestN(self.keep), preservation_policy.CustomSteps([step])]
        )
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=self.create)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def release(self) -> None:
        """After the saves in flight finish, delete the preserved step (if any) unless it is
        among the last `keep`."""
        step, self.preserved = self.preserved, None
        if step is None:
            return
        self.manager.wait_until_finished()
        steps = sorted(self.all_steps())
        if step in steps and step not in steps[-self.keep :]:
            self.manager.delete(step)

    def incomplete(self) -> list[str]:
        """Names of step directories left half-written (never restored from): orbax's
        temporary directories on a local disk (<step>.orbax-checkpoint-tmp-<time>), step
        directories without their commit_success.txt on an object store."""
        if not self.directory.exists():
            return []
        return sorted(p.name for p in self.directory.iterdir()
                      if is_step_name(p.name) and orbax_step.is_path_temporary(p))  # fmt: skip

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, record: dict) -> None:
        """Start saving `state` and `record` as step `step`; the write finishes in the
        background (close() waits for it). The record's "data" part gets the data source's
        settings (data_settings) as "source", to refuse resuming on other data."""
        if "data" in record and "train" in record and "source" not in record["data"]:
            source = data_settings(record["train"]["train_data"])
            record = {**record, "data": {**record["data"], "source": source}}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)
        )
        self.manager.save(step, args=args, force=True)

    def record(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))[
            "record"
        ]

    def restore(self, step: int, like: Any) -> Any:
        """Restore the state at `step` with the structure, dtypes and shardings of `like`, so a
        checkpoint written on one mesh lands on whatever mesh `like` lives on.
        A tree this version does not have -> ConfigError; files whose bytes do not read back
        (truncated, damaged: STATUS) -> UnreadableCheckpoint."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        try:
            with self._layout_errors(step):
                return self.manager.restore(step, args=args)["state"]
        except (ConfigError, UnreadableCheckpoint):
            raise
        except Exception as e:  # orbax wraps tensorstore's error in a plain Exception
            if STATUS.match(reason := storage_error(e)):
                raise UnreadableCheckpoint(step, reason) from e
            raise

    def set_aside(self, step: int) -> storage.AnyPath:
        """Move the checkpoint at `step` to checkpoints/broken/<step> (kept for inspection; no
        longer listed or restored; on an object store a copy, then a delete); returns where
        it went."""
        target = self.directory / "broken" / str(step)
        n = 1
        while target.exists():
            target, n = self.directory / "broken" / f"{step}.{n}", n + 1
        if not storage.is_url(self.directory):
            target.parent.mkdir(parents=True, exist_ok=True)
        storage.move(self.directory / str(step), target)
        storage.forget_listings(self.directory)
        self.manager.reload()
        return target

    def restore_params(self, step: int, mesh: Mesh | None = None) -> dict[str, jax.Array]:
        """Only the parameters at `step` ({name: array}), each read straight into its sharding
        on `mesh` (default: the first device): expert tensors split over 'expert', the rest
        replicated. The Adam state and counters are not read at all."""
        cfg = SAEConfig.from_record(self.record(step)["model"])
        target = param_target(cfg, make_mesh((1, 1)) if mesh is None else mesh)
        item = {"params": {name: {"value": leaf} for name, leaf in target.items()}}
        restore = ocp.args.PyTreeRestore(
            item=item,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True,
        )
        with self._layout_errors(step):
            state = self.manager.restore(step, args=ocp.args.Composite(state=restore))["state"]
        return {name: v["value"] for name, v in state["params"].items()}

    @contextlib.contextmanager
    def _layout_errors(self, step: int):
        """orbax's multi-line errors for a checkpoint whose tree does not match this version's
        (an older layout) -> one line; bytes that do not read back (STATUS) ->
        UnreadableCheckpoint. A restore that fails leaves reads in flight (see
        quiet_closed_loop_callbacks), so their noise is silenced before it starts."""
        quiet_closed_loop_callbacks()
        try:
            yield
        except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
            if STATUS.match(str(e)):
                raise UnreadableCheckpoint(step, storage_error(e)) from e
            first = first_line(e)
            raise ConfigError(
                f"the checkpoint at step {step} in {self.directory} does not match this "
                "version's training state (written by an older version?); train in a new "
                f"--workdir, or export it with the version that wrote it (orbax: {first[:100]})"
            ) from None

    def close(self) -> None:
        """Wait for pending asynchronous saves, then release the manager (idempotent)."""
        if self.manager is not None:
            self.manager.wait_until_finished()
            self.manager.close()
            self.manager = None


def param_target(cfg: SAEConfig, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The parameters of SwitchSAE(cfg) as abstract arrays sharded on `mesh` (nothing is
    allocated): w_enc/w_dec [N, L, d] and b_enc [N, L] over 'expert', b_dec [d], w_router
    [d, N] and b_router [d] (N > 1) replicated, and router_bias [N] (a RouterBias, with
    cfg.router_bias) replicated: what routing at inference needs; and the 'jump' rule's
    thresholds: log_threshold [N, L] over 'expert' (jumprelu), batch_threshold [] (a
    BatchThreshold; batchtopk, matryoshka) replicated."""
    with jax.set_mesh(mesh):
        abstract = nnx.eval_shape(lambda: SwitchSAE(cfg, rngs=nnx.Rngs(0)))
    kept = nnx.Any(nnx.Param, RouterBias, BatchThreshold)
    params = nnx.to_pure_dict(nnx.state(abstract, kept))
    return {
        name: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, a.sharding.spec))
        for name, a in params.items()
    }


def is_step_name(name: str) -> bool:
    """Whether a name in the checkpoint directory is a step's (finished or not): '30' or
    '30.orbax-checkpoint-tmp-<time>', not 'broken'."""
    try:
        orbax_step.step_from_checkpoint_name(name)
    except ValueError:
        return False
    return True


def model_record(cfg: SAEConfig) -> dict:
    """The SAEConfig as JSON (rebuilds it with SAEConfig.from_record(record))."""
    return dataclasses.asdict(cfg)


def check_compatible(record: dict, cfg: SAEConfig, directory: storage.AnyPath) -> None:
    """A one-line error when a workdir's checkpoint (its model_record) belongs to a model of
    another d, NUM_LATENTS, NUM_EXPERTS or ROUTER_BIAS (a record without a key: its default)."""
    defaults = {f.name: f.default for f in dataclasses.fields(SAEConfig)}
    diffs = [
        f"{k} {record.get(k, defaults[k])} vs {getattr(cfg, k)}"
        for k in MODEL_KEYS
        if record.get(k, defaults[k]) != getattr(cfg, k)
    ]
    if diffs:
        raise ConfigError(
            f"{directory} holds a checkpoint of another model ({', '.join(diffs)}); "
            "use a new --workdir or delete it"
        )


def config_changes(record: dict, cfg: SAEConfig, tcfg: TrainConfig) -> list[str]:
    """What resuming from a checkpoint's record with (cfg, tcfg) would change, as
    ['K 8 -> 16', 'STEPS 1500 -> 3000']; a record without a "train" part (written by an older
    version) is compared on the model alone."""
    saved = {SAEConfig: SAEConfig.from_record(record["model"])}
    if "train" in record:
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        train = {k: v for k, v in record["train"].items() if k in fields}
        saved[TrainConfig] = dataclasses.replace(tcfg, **train)
    now = {SAEConfig: cfg, TrainConfig: tcfg}
    return [
        f"{binding_name(cls, k)} {getattr(old, k)!r} -> {getattr(now[cls], k)!r}"
        for cls, old in saved.items()
        for k in CHANGE_KEYS[cls]
        if getattr(old, k) != getattr(now[cls], k)
    ]


def check_changes(record: dict, cfg: SAEConfig, tcfg: TrainConfig, directory: storage.AnyPath,
                  allow: bool) -> list[str]:  # fmt: skip
    """The changes resuming would make (config_changes, then the data source's settings:
    data_changes); a one-line ConfigError naming them unless `allow`, which says so when the
    training data would change (TRAIN_DATA, SEED, or the source's settings)."""
    changes = config_changes(record, cfg, tcfg)
    train = record.get("train", {})
    data = [  # TrainConfig's settings that choose the data: named with the source's
        (binding_name(TrainConfig, k), train[k], getattr(tcfg, k))
        for k in DATA_TRAIN_KEYS
        if k in train and train[k] != getattr(tcfg, k)
    ]
    changes = [c for c in changes if not any(c.startswith(f"{name} ") for name, *_ in data)]
    data += [
        (name, old, new)
        for name, old, new in data_changes(record, tcfg)
        if not (name == "SyntheticData.seed" and ("SEED", old, new) in data)
    ]
    if data and not allow:
        step = record.get("data", {}).get("train_step")
        at = "" if step is None else f" at step {step}"
        was = ", ".join(f"{name}={old!r}, not {new!r}" for name, old, new in data)
        also = f"; other settings changed too ({', '.join(changes)})" if changes else ""
        raise ConfigError(
            f"the checkpoint{at} in {directory} was trained with {was} (the "
            f"training data would change mid-run){also}; resume with the same settings, or "
            "pass --allow_changes"
        )
    changes += [f"{name} {old!r} -> {new!r}" for name, old, new in data]
    if changes and not allow:
        raise ConfigError(
            f"{directory} was trained with other settings ({', '.join(changes)}); pass "
            "--allow_changes to resume with the new ones, or use a new --workdir"
        )
    return changes


# tensorstore's status codes for bytes that do not read back (a truncated or damaged file). A
# missing array (NOT_FOUND) reads as another layout, as before; transient codes (UNAVAILABLE,
# ...) are raised as they are: a checkpoint is only set aside when its own bytes are bad.
STATUS = re.compile(r"(OUT_OF_RANGE|DATA_LOSS): ")


def storage_error(e: BaseException) -> str:
    """The first line of the innermost cause of `e` (tensorstore's status under orbax's
    wrapping), at most 120 characters."""
    while e.__cause__ is not None:
        e = e.__cause__
    first = first_line(e)
    return first if len(first) <= 120 else first[:117] + "..."


def first_line(e: BaseException) -> str:
    """The first non-blank line of an error's message (its type's name when it has none)."""
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)


def data_settings(train_data: str) -> dict[str, Any]:
    """The current (gin-bound, else default) values of the data source's parameters that change
    the training stream (DATA_KEYS), as {parameter: value}."""
    cls = source_class(train_data)
    defaults = inspect.signature(cls.__init__).parameters
    out = {}
    for name in DATA_KEYS[cls]:
        try:
            value = gin.query_parameter(f"{cls.__name__}.{name}")
        except ValueError:
            value = defaults[name].default
        while isinstance(value, gin.config.ConfigurableReference) and value.evaluate:
            value = value.scoped_configurable_fn()  # a macro: its value
        out[name] = value
    return out


def saved_data_settings(record: dict) -> dict[str, Any] | None:
    """The data settings a checkpoint was trained with: the record's own (data.source), or for
    a record written before they were stored, those its gin config text binds (defaults for
    the rest); None when neither is there."""
    data, train = record.get("data", {}), record.get("train", {})
    if "source" in data:
        return data["source"]
    text, train_data = record.get("gin_config", ""), train.get("train_data")
    if not text or train_data is None:
        return None
    cls = source_class(train_data)
    bound = gin_bindings(text)
    defaults = inspect.signature(cls.__init__).parameters
    saved = {
        name: bound.get(f"{cls.__name__}.{name}", defaults[name].default) for name in DATA_KEYS[cls]
    }
    return {name: v for name, v in saved.items() if v is not _UNREAD}  # unread: not compared


def gin_bindings(text: str) -> dict[str, Any]:
    """{'Class.param' or 'MACRO': value} of the one-line Python-literal bindings in gin config
    text (gin.config_str()), macros (`%NAME`) resolved; a value that is no Python literal is
    _UNREAD; other lines are skipped."""
    raw = {}
    for line in text.splitlines():
        m = re.fullmatch(r"\s*([A-Za-z_][\w.]*)\s*=\s*(.+?)\s*", line)
        if m:
            raw[m.group(1)] = m.group(2)

    def value(v: str, depth: int = 0):
        if v.startswith("%") and depth < 10:
            return value(raw.get(v[1:], "<unbound>"), depth + 1)
        try:
            return ast.literal_eval(v)
        except (ValueError, SyntaxError):
            return _UNREAD

    return {k: value(v) for k, v in raw.items()}


_UNREAD = object()


def data_changes(record: dict, tcfg: TrainConfig) -> list[tuple[str, Any, Any]]:
    """(name, saved value, current value) of each data setting (DATA_KEYS) that differs from
    the checkpoint's (none when TRAIN_DATA itself changed: config_changes names that, or when
    the record does not say)."""
    saved = saved_data_settings(record)
    if saved is None or record.get("train", {}).get("train_data") != tcfg.train_data:
        return []
    cls = source_class(tcfg.train_data)
    now = data_settings(tcfg.train_data)
    return [
        (label, saved[k], now[k])
        for k, label in DATA_KEYS[cls].items()
        if k in saved and saved[k] != now[k]
    ]
