"""The Switch SAE module above its dispatch paths.

switch.py  the Flax module, its `shard_map` wiring and the choice of dispatch path
losses.py  the training loss and metrics from a forward's outputs
init.py    the geometric median that b_dec and b_router start at
"""

from sae_jax.model.switch import SwitchOut, SwitchSAE, check_mesh, unit_rows

__all__ = ["SwitchOut", "SwitchSAE", "check_mesh", "unit_rows"]
