"""Evaluation of a trained SAE.

held_out.py  the eval step and held-out metrics (FVU, L0, drop fraction, recovery)
analysis.py  a loaded SAE on an eval set: per-expert and per-latent statistics
features.py  streaming per-latent statistics (frequency, histograms, top activations)
plots.py     the eval plots
lm_loss.py   loss recovered with the reconstruction spliced into the language model
"""
