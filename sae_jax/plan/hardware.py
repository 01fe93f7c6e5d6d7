"""Datasheet figures for the hardware a plan is for (per device). GB = 10^9 bytes.

H100 SXM5 80 GB (NVIDIA H100 datasheet): 989 TFLOP/s dense bf16 (tensor cores), 67 TFLOP/s
fp32 (non-tensor; TF32 tensor cores would give 495 dense but round inputs to 10 bits),
80 GB HBM3 at 3.35 TB/s, NVLink 4 900 GB/s total (450 GB/s each way) to the 7 other GPUs of
an 8-GPU node, one 400 Gb/s InfiniBand NDR NIC per GPU (50 GB/s each way) between nodes.
TPU v5p (Google Cloud TPU v5p docs): 459 TFLOP/s bf16, 95 GB HBM2e at 2765 GB/s, ICI
4800 Gb/s per chip (600 GB/s each way; "1200 GBps bidirectional"), 3D torus. The MXUs are
bf16 only: a full-precision f32 matmul (Precision.HIGHEST) takes 6 bf16 passes, 459 / 6.

What a process can use is less than the card (`Hardware.usable_bytes`):
- GPU: JAX preallocates XLA's buffer pool as 75% of the card's memory by default
  (XLA_PYTHON_CLIENT_MEM_FRACTION / XLA_CLIENT_MEM_FRACTION; docs.jax.dev, "GPU memory
  allocation"); every buffer of the step comes from that pool. The CUDA context and NCCL's
  own buffers live in the rest. Inside the pool XLA:GPU also holds workspaces XLA:CPU's
  compile does not show: cuBLAS asks 32 MiB per matmul stream on Hopper (cuBLAS docs,
  cublasSetWorkspace), cuDNN and the collectives' scratch more; we hold back GPU_WORKSPACE_BYTES
  for them, a conservative estimate, not a measured figure.
- TPU: no preallocation fraction; the runtime keeps part of HBM for itself and the program's
  code. No documented figure: TPU_RESERVED_BYTES is a conservative estimate.
"""

from __future__ import annotations

import dataclasses
import os

GB = 1e9
GIB = 2**30
COLLECTIVE_LATENCY_SOURCE = (
    "about 10 us for a scalar all-reduce inside an NVLink node or a TPU slice, "
    "30 us across InfiniBand nodes (NCCL's tree algorithm at hundreds of GPUs)"
)
GPU_MEM_FRACTION = 0.75  # JAX's default preallocation (XLA_PYTHON_CLIENT_MEM_FRACTION)
GPU_WORKSPACE_BYTES = 1 * GIB  # estimate: cuBLAS/cuDNN workspaces, collective scratch
TPU_RESERVED_BYTES = 2 * GIB  # estimate: the TPU runtime's share of HBM


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
    usable_fraction: float = 1.0  # of memory_bytes: the pool XLA's buffers come from
    reserved_bytes: float = 0.0  # held back inside that pool (workspaces; an estimate)
    usable_source: str = "the whole memory"
    # Seconds one small (scalar) collective takes inside a node / between nodes: its
    # latency, which a byte count does not show (estimates, see COLLECTIVE_LATENCY_SOURCE).
    link_latency_s: float = 10e-6
    network_latency_s: float = 30e-6

    @property
    def usable_bytes(self) -> float:
        """Memory per device a training process can give its buffers: the fits judgement."""
        return self.memory_bytes * self.usable_fraction - self.reserved_bytes

    @property
    def preallocates(self) -> bool:
        """A GPU: XLA's buffer pool is a preallocated fraction of the card."""
        return self.usable_fraction < 1.0

    def with_mem_fraction(self, fraction: float) -> Hardware:
        """This GPU with XLA's pool at `fraction` of the card (XLA_PYTHON_CLIENT_MEM_FRACTION)."""
        return dataclasses.replace(
            self, usable_fraction=fraction,
            usable_source=self.usable_source.replace(
                f"{self.usable_fraction:g} of the card", f"{fraction:g} of the card"),
        )  # fmt: skip

    def peak_flops(self, dtype: str) -> float:
        return self.flops_bf16 if dtype in ("bfloat16", "float16") else self.flops_f32

    def latency(self, group_size: int) -> float:
        """Seconds of one scalar collective over `group_size` devices (an estimate)."""
        return (
            self.link_latency_s if group_size <= self.devices_per_node else self.network_latency_s
        )

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
    usable_fraction=GPU_MEM_FRACTION, reserved_bytes=GPU_WORKSPACE_BYTES,
    usable_source=f"XLA's buffer pool, {GPU_MEM_FRACTION:g} of the card (JAX's default "
    f"preallocation), less {GPU_WORKSPACE_BYTES / GIB:g} GiB for cuBLAS/cuDNN workspaces and "
    "collective scratch (estimate)",
)  # fmt: skip
TPU_V5P = Hardware(
    name="tpu-v5p", memory_bytes=95 * GB, flops_bf16=459e12, flops_f32=459e12 / 6,
    hbm_bytes_per_s=2765 * GB, link_bytes_per_s=600 * GB, network_bytes_per_s=600 * GB,
    devices_per_node=8960,
    source="Google Cloud TPU v5p docs: 459 TFLOP/s bf16 (f32 = 6 bf16 passes), 95 GB HBM2e "
    "at 2765 GB/s, ICI 4800 Gb/s per chip (600 GB/s each way), 3D torus up to 8960 chips",
    reserved_bytes=TPU_RESERVED_BYTES,
    usable_source=f"HBM less {TPU_RESERVED_BYTES / GIB:g} GiB for the TPU runtime (estimate)",
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
        link_latency_s=1e-6,
        source=f"this machine: {cores} cores (nproc), {memory / 2**30:.1f} GiB RAM; nominal "
        f"{CPU_FLOPS_PER_CORE / 1e9:.0f} GFLOP/s and {CPU_BYTES_PER_S_PER_CORE / GB:.0f} GB/s "
        "per core (AVX2 FMA at ~2.5 GHz), collectives at memory speed",
    )  # fmt: skip


NAMES = ("h100", "tpu-v5p", "cpu")


def get(name: str, mem_fraction: float | None = None) -> Hardware:
    """The named hardware; `mem_fraction` (GPU): XLA's pool as that fraction of the card, by
    default XLA_CLIENT_MEM_FRACTION or XLA_PYTHON_CLIENT_MEM_FRACTION when set, else 0.75."""
    hw = {"h100": lambda: H100, "tpu-v5p": lambda: TPU_V5P, "cpu": cpu}[name]()
    if not hw.preallocates:
        return hw
    fraction = mem_fraction or _env_fraction()
    return hw.with_mem_fraction(fraction) if fraction else hw


def _env_fraction() -> float | None:
    for var in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
        try:
            return float(os.environ[var]) if os.environ.get(var) else None
        except ValueError:
            continue
    return None
