"""orbax checkpoints of the whole training state, restorable onto any mesh.

A checkpoint holds the TrainState (parameters, Adam state, step, dead-latent counters) and a
JSON record: the model shape (to refuse an incompatible workdir), the data reader position,
the resolved gin config text. orbax writes each step to a temporary directory and renames it
when complete, so a save cut off mid-write is never listed and the last complete one is used.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from sae_jax.config import ConfigError, SAEConfig

MODEL_KEYS = ("d", "num_latents", "num_experts")


class Checkpointer:
    """Asynchronous saves at the steps the caller chooses; keeps the last `keep`."""

    def __init__(self, workdir: str | Path, keep: int = 3):
        self.directory = Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def incomplete(self) -> list[str]:
        """Names of step directories left half-written (never restored from)."""
        if not self.directory.exists():
            return []
        return sorted(p.name for p in self.directory.iterdir() if "tmp" in p.name)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

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
        return self.manager.restore(step, args=args)["state"]

    def restore_params(self, step: int) -> dict:
        """The parameters at `step` as a pure dict of arrays, without a target structure."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore())
        params = self.manager.restore(step, args=args)["state"]["params"]
        return {k: v["value"] if isinstance(v, dict) else v for k, v in params.items()}

    def close(self) -> None:
        """Wait for pending asynchronous saves, then release the manager (idempotent)."""
        if self.manager is not None:
            self.manager.wait_until_finished()
            self.manager.close()
            self.manager = None


def model_record(cfg: SAEConfig) -> dict:
    """The SAEConfig as JSON (rebuilds it with SAEConfig(**record))."""
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
