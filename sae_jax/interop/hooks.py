"""Where in the language model an SAE reads, in each library's naming.

The dumper (`launch.dump_activations --layer L`) takes the output of block L (0-based), the
residual stream after that block; its manifest's `source` says so ("layer": L, "site":
"output of block L (residual stream)"). TransformerLens (and so SAELens) names that place
`blocks.{L}.hook_resid_post` in every model. In Hugging Face it is the output of block L of
the model's block list, and sparsify names its hookpoints relative to the base model
(`model.base_model`), i.e. without the causal LM's first attribute:

| block list           | Hugging Face module      | sparsify hookpoint | models          |
|----------------------|--------------------------|--------------------|-----------------|
| model.layers         | model.layers.{L}         | layers.{L}         | Llama, SmolLM2  |
| transformer.h        | transformer.h.{L}        | h.{L}              | GPT-2           |
| gpt_neox.layers      | gpt_neox.layers.{L}      | layers.{L}         | Pythia          |
| model.decoder.layers | model.decoder.layers.{L} | decoder.layers.{L} | OPT             |

(the block lists are the dumper's BLOCK_PATHS; sparsify's `--layers L` means the hookpoint
`<block list>.L` within the base model.)
"""

from __future__ import annotations

from typing import NamedTuple

TRANSFORMER_LENS = "blocks.{layer}.hook_resid_post"  # SAELens's hook_name
BLOCK_LISTS = {  # a Hugging Face causal LM's block list -> its name within the base model
    "model.layers": "layers",
    "transformer.h": "h",
    "gpt_neox.layers": "layers",
    "model.decoder.layers": "decoder.layers",
}
LLAMA = "model.layers"


class HookNames(NamedTuple):
    transformer_lens: str  # SAELens's hook_name
    hugging_face: str  # the module of the Hugging Face causal LM whose output it is
    sparsify: str  # sparsify's hookpoint (a module of model.base_model)


def hook_names(layer: int, blocks: str = LLAMA) -> HookNames:
    """The names of the output of block `layer` (the residual stream after it) in each
    library, for a model whose block list is `blocks`."""
    if blocks not in BLOCK_LISTS:
        raise ValueError(f"unknown block list {blocks!r} (known: {', '.join(BLOCK_LISTS)})")
    return HookNames(TRANSFORMER_LENS.format(layer=layer), f"{blocks}.{layer}",
                     f"{BLOCK_LISTS[blocks]}.{layer}")  # fmt: skip
