"""The field's own SAE formats beside our export: SAELens and sparsify directories, written
from a run and read as peers' SAEs (numpy and safetensors only; `sae_jax.interop.saelens`,
which needs torch and SAELens, registers the Switch SAE as a SAELens architecture)."""
