"""Where in the language model an SAE reads, in each library's naming.

The dumper (`launch.dump_activations --layer L`) takes the output of block L (0-based), the
residual stream after that block; its manifest's `source` says so ("layer": L, "site":
"output of block L (residual stream)"). The same place is named

| site        | TransformerLens / SAELens hook_name | Hugging Face module | sparsify hookpoint |
|-------------|-------------------------------------|---------------------|--------------------|
| resid_post  | blocks.{L}.hook_resid_post          | model.layers.{L}    | layers.{L}         |

(sparsify names hookpoints relative to the model's base model, `model.base_model`, whose
block list of a Llama-style model is `layers`; `--layers L` there means `layers.L`. A
forward hook on the Hugging Face module `model.layers.{L}` of the causal LM sees its output,
the same vector.)
"""

from __future__ import annotations

from typing import NamedTuple


class HookNames(NamedTuple):
    transformer_lens: str  # SAELens's hook_name
    hugging_face: str  # the module of a Hugging Face causal LM whose output it is
    sparsify: str  # sparsify's hookpoint (a module of model.base_model)


SITES = {
    "resid_post": HookNames(
        "blocks.{layer}.hook_resid_post", "model.layers.{layer}", "layers.{layer}"
    ),
}
DUMP_SITE = "resid_post"  # what the dumper takes: the output of block L


def hook_names(layer: int, site: str = DUMP_SITE) -> HookNames:
    """The names of `site` at block `layer` in each library."""
    if site not in SITES:
        raise ValueError(f"unknown site {site!r} (known: {', '.join(SITES)})")
    return HookNames(*(name.format(layer=layer) for name in SITES[site]))
