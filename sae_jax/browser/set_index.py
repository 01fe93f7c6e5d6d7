"""The index page of a launch.train_many set's browsers (launch.browse --workdir SET).

DIR/browser/index.html: one row per SAE of the set (saes.json's order) with its name, layer
and settings, the name linking to that SAE's own browser (DIR/<name>/browser/index.html; a
relative link, so the set's directory can be copied and opened anywhere). An SAE whose browser
was not built is listed without a link, with why.
"""

from __future__ import annotations

import html

from sae_jax import storage

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }}
</style>
</head>
<body data-page="set">
<h1>{title}</h1>
<p>{count} SAEs trained by one launch.train_many job; each name opens its feature browser.</p>
<table class="saes">
<tr><th>SAE</th><th>layer</th><th>settings</th><th>NUM_LATENTS</th><th>K</th>
<th>NUM_EXPERTS</th></tr>
{rows}
</table>
</body>
</html>
"""


def set_index_row(entry: dict, failed: dict[str, str]) -> str:
    """One <tr>: the name (a link to its browser, or the reason it has none) and settings."""
    name = html.escape(entry["name"])
    if entry["name"] in failed:
        why = html.escape(failed[entry["name"]])
        first = f'{name} <span class="failed">(no browser: {why})</span>'
    else:
        first = f'<a class="sae-link" href="../{name}/browser/index.html">{name}</a>'
    layer = "-" if entry.get("layer") is None else str(entry["layer"])
    settings = ", ".join(f"{k}={v}" for k, v in (entry.get("settings") or {}).items()) or "-"
    cells = [first, layer, html.escape(settings), str(entry.get("num_latents", "-")),
             str(entry.get("k", "-")), str(entry.get("num_experts", "-"))]  # fmt: skip
    return f'<tr data-sae="{name}">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def write_set_index(workdir, saes: list[dict], failed: dict[str, str] | None = None):
    """Write workdir/browser/index.html for the set's `saes` (read_sae_set's records);
    `failed`: {name: why} of the SAEs whose browser was not built. Returns its path."""
    workdir = storage.path(workdir)
    rows = "\n".join(set_index_row(entry, failed or {}) for entry in saes)
    title = f"SAE set {html.escape(workdir.name)}"
    index = workdir / "browser" / "index.html"
    storage.write_atomic(index, PAGE.format(title=title, count=len(saes), rows=rows))
    return index
