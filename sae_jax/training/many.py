"""Several SAEs trained from one read of their data (`launch.train_many`).

Each SAE is a run of its own (training.loop's set-up, checkpoints, logs, export and final
evaluation, in WORKDIR/<name>/), stepped in turn on every batch of its data: SAEs on the same
data directory share one stream, read once, so each sees the batches its own `launch.train`
run would, and ends bitwise the same.
"""

from __future__ import annotations

import dataclasses
import json

from sae_jax import storage
from sae_jax.config import SAEConfig, TrainConfig

SET_FILE = "saes.json"  # WORKDIR/saes.json: the job's SAEs (sae_set.read_sae_set)


@dataclasses.dataclass(frozen=True)
class SAESpec:
    """One SAE of a job: its name (subdirectory), configs, the gin text that trains it alone,
    the dump layer it reads (None: a plain data directory) and the entry's own settings."""

    name: str
    sae_cfg: SAEConfig
    tcfg: TrainConfig
    config_text: str
    layer: int | None = None
    settings: dict = dataclasses.field(default_factory=dict)


def set_record(specs: list[SAESpec]) -> dict:
    """WORKDIR/saes.json's content: each SAE's name, layer, data and main settings."""
    return {"saes": [{
        "name": s.name, "layer": s.layer, "train_data": s.tcfg.train_data,
        "eval_data": s.tcfg.eval_spec, "num_latents": s.sae_cfg.num_latents, "k": s.sae_cfg.k,
        "num_experts": s.sae_cfg.num_experts,
        "experts_per_token": s.sae_cfg.experts_per_token,
        "lr": s.tcfg.lr, "base_lr": s.tcfg.base_lr, "settings": s.settings,
    } for s in specs]}  # fmt: skip


def write_set_record(workdir: str | storage.AnyPath, specs: list[SAESpec]) -> None:
    storage.path(workdir).mkdir(parents=True, exist_ok=True)
    text = json.dumps(set_record(specs), indent=1, sort_keys=True, default=str)
    storage.write_atomic(storage.path(workdir) / SET_FILE, text + "\n")
