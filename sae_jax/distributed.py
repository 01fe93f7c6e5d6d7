"""Multi-host runtime (JAX's multi-controller model) and per-process batch placement."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import NamedSharding


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Start jax.distributed when several processes are asked for; a no-op for one process.

    Arguments fall back to JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
    On TPU pods and SLURM/Open MPI GPU clusters pass `auto=True` behaviour by setting
    JAX_COORDINATOR_ADDRESS=auto: JAX then detects the cluster itself.
    """
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if address is None and (num_processes or 1) == 1:
        return
    # CPU hosts need a collectives backend for cross-process all_to_all / psum.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if address == "auto":
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(address, num_processes, process_id)


def process_rows(sharding: NamedSharding, num_rows: int) -> slice:
    """The contiguous rows of a [num_rows, ...] token-sharded array that this process holds."""
    index_map = sharding.addressable_devices_indices_map((num_rows,))
    starts = sorted((idx[0].start or 0, idx[0].stop or num_rows) for idx in index_map.values())
    for (_, stop), (start, _) in zip(starts, starts[1:], strict=False):
        if stop != start:
            raise ValueError("this process's devices do not hold contiguous token rows")
    return slice(starts[0][0], starts[-1][1])


def put_local(local: np.ndarray, sharding: NamedSharding, global_rows: int) -> jax.Array:
    """The global [global_rows, ...] token-sharded array whose rows process_rows() are `local`
    on this process (jax.make_array_from_process_local_data)."""
    shape = (global_rows, *local.shape[1:])
    return jax.make_array_from_process_local_data(sharding, np.asarray(local), shape)


def put_batch(batch, sharding: NamedSharding) -> jax.Array:
    """Place a global [tokens, d] batch sharded over tokens; each process hands over only the
    rows its own devices hold (jax.make_array_from_process_local_data)."""
    return put_local(batch[process_rows(sharding, batch.shape[0])], sharding, batch.shape[0])


def gather_ints(value: int) -> list[int]:
    """[value of process 0, value of process 1, ...] (exact up to 2**62)."""
    if jax.process_count() == 1:
        return [int(value)]
    from jax.experimental.multihost_utils import process_allgather

    parts = np.array([value >> 31, value & (2**31 - 1)], np.int32)  # int64 would become int32
    hi, lo = np.asarray(process_allgather(parts)).reshape(-1, 2).T
    return [int(h) << 31 | int(v) for h, v in zip(hi, lo, strict=True)]
