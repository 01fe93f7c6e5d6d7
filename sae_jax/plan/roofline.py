"""Step time from a roofline: max(compute, memory traffic) + collective traffic.

The device overlaps its matmuls with its memory traffic at best, and (conservatively) does
not overlap collectives with either. Inputs are per device: XLA's FLOP and bytes-accessed
counts, and the collectives of the compiled step.
"""

from __future__ import annotations

from collections.abc import Sequence

from sae_jax.plan.hardware import Hardware
from sae_jax.plan.hlo import Collective


def step_time(
    flops: float,
    bytes_accessed: float,
    collectives: Sequence[Collective],
    hw: Hardware,
    dtype: str,
    batch: int,
    latency_s: float = 0.0,
) -> dict:
    """Seconds of compute, memory and network per step, the estimate, tokens/s and the
    limiting term ('FLOPs', 'bandwidth' or 'network'). latency_s: collectives' latency the
    traffic does not show (the batch threshold's scalar psums), counted as network time."""
    compute = flops / hw.peak_flops(dtype)
    memory = bytes_accessed / hw.hbm_bytes_per_s
    traffic = sum(c.traffic_bytes() / hw.bandwidth(c.group_size) for c in collectives)
    network = traffic + latency_s
    seconds = max(compute, memory) + network
    parts = {"FLOPs": compute, "bandwidth": memory, "network": network}
    return {
        "compute_s": compute,
        "memory_s": memory,
        "network_s": network,
        "latency_s": latency_s,
        "step_s": seconds,
        "tokens_per_sec": batch / seconds if seconds > 0 else float("inf"),
        "limit": max(parts, key=parts.get),
        "peak_flops": hw.peak_flops(dtype),
        "dtype": dtype,
    }
