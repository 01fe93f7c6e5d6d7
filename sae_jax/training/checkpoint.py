"""orbax checkpoints of the whole training state, restorable onto any mesh.

A checkpoint holds the TrainState (parameters, Adam state, step, dead-latent counters) and a
JSON record: the model and training configs (to refuse an incompatible workdir, and to name
what a resumed run changes), the data reader position, the resolved gin config text. orbax
writes each step to a temporary directory and renames it when complete, so a save cut off
mid-write is never listed and the last complete one is used.
`restore_params` reads the parameters alone (no Adam state), placed on a mesh of the caller's
choosing: what export needs, on any topology.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from sae_jax.config import ConfigError, SAEConfig, TrainConfig, binding_name
from sae_jax.mesh import make_mesh
from sae_jax.model.switch import SwitchSAE

MODEL_KEYS = ("d", "num_latents", "num_experts")  # another value: the state cannot restore
# Another value restores but trains another model: named, and refused unless allowed.
CHANGE_KEYS = {
    SAEConfig: ("k", "k_aux", "capacity_factor", "eval_capacity_factor", "compute_dtype",
                "dispatch"),
    TrainConfig: ("steps", "batch_size", "lr", "base_lr", "seed", "lb_alpha", "aux_weight",
                  "decay_fraction", "grad_clip", "dead_after_tokens", "aux_max_share",
                  "train_data"),
}  # fmt: skip


class Checkpointer:
    """Asynchronous saves at the steps the caller chooses; keeps the last `keep`."""

    def __init__(self, workdir: str | Path, keep: int = 3, create: bool = True):
        """create=False only reads: a missing directory is not made (it has no steps)."""
        self.directory = Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def incomplete(self) -> list[str]:
        """Names of step directories left half-written (never restored from)."""
        if not self.directory.exists():
            return []
        return sorted(p.name for p in self.directory.iterdir() if "tmp" in p.name)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, record: dict) -> None:
        """Start saving `state` and `record` as step `step`; the write finishes in the
        background (close() waits for it)."""
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
        checkpoint written on one mesh lands on whatever mesh `like` lives on."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        with self._layout_errors(step):
            return self.manager.restore(step, args=args)["state"]

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
        (an older layout) -> one line."""
        try:
            yield
        except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
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
    [d, N] and b_router [d] (N > 1) replicated."""
    with jax.set_mesh(mesh):
        abstract = nnx.eval_shape(lambda: SwitchSAE(cfg, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    return {
        name: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, a.sharding.spec))
        for name, a in params.items()
    }


def model_record(cfg: SAEConfig) -> dict:
    """The SAEConfig as JSON (rebuilds it with SAEConfig.from_record(record))."""
    return dataclasses.asdict(cfg)


def check_compatible(record: dict, cfg: SAEConfig, directory: Path) -> None:
    """A one-line error when a workdir's checkpoint (its model_record) belongs to a model of
    another d, NUM_LATENTS or NUM_EXPERTS."""
    diffs = [
        f"{k} {record.get(k)} vs {getattr(cfg, k)}"
        for k in MODEL_KEYS
        if record.get(k) != getattr(cfg, k)
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


def check_changes(record: dict, cfg: SAEConfig, tcfg: TrainConfig, directory: Path,
                  allow: bool) -> list[str]:  # fmt: skip
    """The changes resuming would make (config_changes); a one-line ConfigError naming them
    unless `allow`."""
    changes = config_changes(record, cfg, tcfg)
    if changes and not allow:
        raise ConfigError(
            f"{directory} was trained with other settings ({', '.join(changes)}); pass "
            "--allow_changes to resume with the new ones, or use a new --workdir"
        )
    return changes
