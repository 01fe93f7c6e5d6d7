"""Datasheet figures for the hardware a plan is for (per device). GB = 10^9 bytes.

H100 SXM5 80 GB (NVIDIA H100 datasheet): 989 TFLOP/s dense bf16 (tensor cores), 67 TFLOP/s
fp32 (non-tensor; TF32 tensor cores would give 495 dense but round inputs to 10 bits),
80 GB HBM3 at 3.35 TB/s, NVLink 4 900 GB/s total (450 GB/s each way) to the 7 other GPUs of
an 8-GPU node, one 400 Gb/s InfiniBand NDR NIC per GPU (50 GB/s each way) between nodes.
TPU v5p (Google Cloud TPU v5p docs): 459 TFLOP/s bf16, 95 GB HBM2e at 2765 GB/s, ICI
4800 Gb/s per chip (600 GB/s each way; "1200 GBps bidirectional"), 3D torus. The MXUs are
bf16 only: a full-precision f32 matmul (Precision.HIGHEST) takes 6 bf16 passes, 459 / 6.
"""

from __future__ import annotations

import dataclasses
import os

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    memory_bytes: float  # per device
    flops_bf16: float  # peak FLOP/s per device
    flops_f32: float
    hbm_bytes_per_s: float
    link_bytes_per_s: float  # each way, inside a node / slice (NVLink, ICI)
    network_bytes_per_s: float  # each way, between nodes (InfiniBand); = link where none
    devices_per_node: int  # collectives over more devices than this use `network_bytes_per_s`
    source: str

    def peak_flops(self, dtype: str) -> float:
        return self.flops_bf16 if dtype in ("bfloat16", "float16") else self.flops_f32

    def bandwidth(self, group_size: int) -> float:
        """Bytes/s each way for a collective over `group_size` devices."""
        return (
            self.link_bytes_per_s
            if group_size <= self.devices_per_node
            else (self.network_bytes_per_s)
        )


H100 = Hardware(
    name="h100", memory_bytes=80 * GB, flops_bf16=989e12, flops_f32=67e12,
    hbm_bytes_per_s=3.35e12, link_bytes_per_s=450 * GB, network_bytes_per_s=50 * GB,
    devices_per_node=8,
    source="NVIDIA H100 SXM5 80GB datasheet: 989 TFLOP/s dense bf16, 67 TFLOP/s fp32, "
    "80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s (450 each way) in an 8-GPU node, "
    "400 Gb/s InfiniBand NDR per GPU between nodes",
)  # fmt: skip
TPU_V5P = Hardware(
    name="tpu-v5p", memory_bytes=95 * GB, flops_bf16=459e12, flops_f32=459e12 / 6,
    hbm_bytes_per_s=2765 * GB, link_bytes_per_s=600 * GB, network_bytes_per_s=600 * GB,
    devices_per_node=8960,
    source="Google Cloud TPU v5p docs: 459 TFLOP/s bf16 (f32 = 6 bf16 passes), 95 GB HBM2e "
    "at 2765 GB/s, ICI 4800 Gb/s per chip (600 GB/s each way), 3D torus up to 8960 chips",
)  # fmt: skip

# Nominal figures for this machine's CPU (an x86 core with AVX2 FMA: 2 x 8 f32 FMAs per cycle
# at ~2.5 GHz = 80 GFLOP/s per core; ~10 GB/s of DRAM bandwidth per core).
CPU_FLOPS_PER_CORE = 80e9
CPU_BYTES_PER_S_PER_CORE = 10 * GB


def cpu() -> Hardware:
    """This machine, treated as one device: nproc cores and its total RAM."""
    cores = os.cpu_count() or 1
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Hardware(
        name="cpu", memory_bytes=float(memory), flops_bf16=cores * CPU_FLOPS_PER_CORE,
        flops_f32=cores * CPU_FLOPS_PER_CORE, hbm_bytes_per_s=cores * CPU_BYTES_PER_S_PER_CORE,
        link_bytes_per_s=cores * CPU_BYTES_PER_S_PER_CORE,
        network_bytes_per_s=cores * CPU_BYTES_PER_S_PER_CORE, devices_per_node=1 << 30,
        source=f"this machine: {cores} cores (nproc), {memory / 2**30:.1f} GiB RAM; nominal "
        f"{CPU_FLOPS_PER_CORE / 1e9:.0f} GFLOP/s and {CPU_BYTES_PER_S_PER_CORE / GB:.0f} GB/s "
        "per core (AVX2 FMA at ~2.5 GHz), collectives at memory speed",
    )  # fmt: skip


NAMES = ("h100", "tpu-v5p", "cpu")


def get(name: str) -> Hardware:
    return {"h100": lambda: H100, "tpu-v5p": lambda: TPU_V5P, "cpu": cpu}[name]()
