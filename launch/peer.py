"""Time a peer library's TopK SAE step on the bench's shapes (`launch.bench --peer`).

sparsify (EleutherAI, PyPI `eai-sparsify`, extra `sparsify`): its `SparseCoder` with the
same d, width, k and batch, AuxK off, one step as its trainer takes it: forward, FVU
backward, decoder-gradient projection, Adam, decoder rows back to unit norm. Torch runs on
`threads` CPU threads (its own GPU if present is not used: compare on one machine).
"""

from __future__ import annotations

import time

PEERS = ("sparsify",)


class PeerMissing(RuntimeError):
    """The peer is not installed; the message is one line for the user."""


def measure(peer: str, *, d: int, num_latents: int, k: int, batch: int, steps: int,
            threads: int = 2, lr: float = 1e-3) -> dict:  # fmt: skip
    """A bench row for `peer` (one of PEERS); raises PeerMissing when it is not installed."""
    try:
        import torch
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError as e:
        raise PeerMissing(
            f"--peer {peer}: not installed ({e.name}); pip install -e '.[sparsify]'"
        ) from None
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    sae = SparseCoder(d, SparseCoderConfig(num_latents=num_latents, k=k))
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    x = torch.randn(batch, d)

    def step() -> None:
        out = sae(x)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sae.set_decoder_norm_to_unit_norm()

    step()  # warm-up: Adam's state, allocator
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    return {
        "num_experts": 1,
        "num_latents": num_latents,
        "mesh": "1x1",
        "dtype": "float32",
        "dispatch": peer,
        "padding_overhead": 1.0,
        "step_ms": 1e3 * seconds,
        "tokens_per_sec": batch / seconds,
        "gflop_per_step": None,
        "gflops_per_sec": None,
        "peak_mib_per_device": None,
        "tokens_by_latents_mib": batch * num_latents * 4 / 2**20,
        "peer": f"{peer} (torch {torch.__version__}, {threads} threads)",
    }
