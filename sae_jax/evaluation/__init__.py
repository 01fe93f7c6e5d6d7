"""Evaluation of a trained SAE.

held_out.py    the eval step and held-out metrics (FVU, L0, drop fraction, recovery)
recovery.py    planted-feature recovery, streamed over the experts where their rows lie
analysis.py    a loaded SAE on an eval set: per-expert and per-latent statistics
features.py    streaming per-latent statistics (frequency, histograms, top activations)
duplicates.py  duplicated features (decoder rows of cosine > 0.9), a block of rows at a time
plots.py       the eval plots, and several runs' eval curves side by side
lm_loss.py     loss recovered with the reconstruction spliced into the language model, and
               SAEBench's KL and CE scores
saebench.py    SAEBench's core metrics (sae_lens.evals' definitions): streaming sums, max cosines
"""
