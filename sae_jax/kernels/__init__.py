"""Below dispatch: what runs on one expert's tokens, and the router.

records.py      ExpertParams, ExpertRows, ExpertSettings, ExpertOut: what every kernel
                and dispatch path passes
expert.py       one expert's TopK SAE on a buffer of its tokens (dense and gather kernels)
auxk.py         AuxK on an expert's dead latents, and the dead-id buckets
sparse_rows.py  the gather kernel's ops on k rows per token, with written-out gradients
routing.py      top-1 router and the load-balancing loss
"""
