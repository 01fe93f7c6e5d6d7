"""Token dispatch: the routed tokens to their experts' kernels and back.

Every path is `run(routed, params, dead_ids, settings) -> TokenOut`:

    routed.py      the interface: Routed (what a path takes) and TokenOut (what it returns)
    paths.py       the one table that picks a path from the config and the mesh
    capacity.py    [N, C, d] capacity buffers (tokens past C dropped), all_to_all across devices
    blocks.py      sort by expert, pad to blocks, run only the used blocks (custom VJP)
    dropless.py    every token runs its expert: blocks on one device, or a ragged exchange
    exchange.py    `ragged_all_to_all` plan and its CPU emulation
    ragged_dot.py  dropless experts as `jax.lax.ragged_dot` grouped matmuls (GPU/TPU)
"""
