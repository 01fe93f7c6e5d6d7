"""Below dispatch: what runs on one expert's tokens, and the router.

expert.py       one expert's TopK SAE on a buffer of its tokens (dense and gather
                kernels), AuxK on its dead latents
sparse_rows.py  the gather kernel's ops on k rows per token, with written-out gradients
routing.py      top-1 router and the load-balancing loss
"""
