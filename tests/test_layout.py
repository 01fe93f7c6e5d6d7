"""The package's shape: imports run one way through its layers, few top-level modules, and
functions a reader can hold."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sae_jax"

# Bottom to top: a module may import its own layer and the layers below, never one above.
# A module belongs to the layer of the longest prefix that names it.
LAYERS = (
    ("sae_jax.config", "sae_jax.storage"),  # storage: every path and URL
    ("sae_jax.precision", "sae_jax.mesh", "sae_jax.varying", "sae_jax.distributed"),
    ("sae_jax.data",),
    ("sae_jax.kernels",),
    ("sae_jax.dispatch",),
    ("sae_jax.model",),
    ("sae_jax.export", "sae_jax.pretrained", "sae_jax.interop"),  # the formats beside export
    ("sae_jax.evaluation",),
    ("sae_jax.training",),  # the step, update, checkpoints, metrics: below the planner
    ("sae_jax.plan",),  # compiles the training and eval steps
    # the loop checks the plan's fit before it builds anything; many runs several loops
    ("sae_jax.training.loop", "sae_jax.training.many"),
    ("sae_jax.run_data", "sae_jax.browser", "sae_jax.gin_setup", "sae_jax.sae_set"),
    ("sae_jax",),  # the public API
)
MAX_TOP_LEVEL_MODULES = 12
MAX_FUNCTION_LINES, MAX_PARAMETERS = 80, 8


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int | None:
    """Index in LAYERS of the longest prefix naming `module` (None: no layer names it)."""
    best, best_len = None, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            covers = module == prefix or (prefix != "sae_jax" and module.startswith(prefix + "."))
            if covers and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    return best


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The sae_jax modules `path` imports (anywhere in it, function bodies included);
    `from sae_jax.pkg import name` counts as sae_jax.pkg.name where that is a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "sae_jax"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sae_jax":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in known else node.module)
    return found


def upward_imports(imports: dict[str, set[str]]) -> list[str]:
    """'A imports B' for every import of a module B in a higher layer than its importer A."""
    return [
        f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
        for a, targets in sorted(imports.items())
        for b in sorted(targets)
        if layer(b) > layer(a)
    ]


def package_imports() -> dict[str, set[str]]:
    mods = modules()
    return {name: imported_modules(path, set(mods)) for name, path in mods.items()}


def test_every_module_has_a_layer():
    assert [m for m in modules() if layer(m) is None] == []


def test_imports_run_one_way():
    assert upward_imports(package_imports()) == []


def test_the_layer_check_sees_an_upward_import():
    """The checker itself: a kernel importing the Switch module, or a dispatch path the
    public API, is reported; the reverse directions are not."""
    imports = {
        "sae_jax.kernels.expert": {"sae_jax.model.switch", "sae_jax.precision"},
        "sae_jax.dispatch.capacity": {"sae_jax", "sae_jax.kernels.expert"},
        "sae_jax.model.switch": {"sae_jax.dispatch.paths"},
    }
    assert upward_imports(imports) == [
        "sae_jax.dispatch.capacity (layer 4) imports sae_jax (layer 12)",
        "sae_jax.kernels.expert (layer 3) imports sae_jax.model.switch (layer 5)",
    ]


def test_few_top_level_modules():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


def long_functions(path: Path) -> list[str]:
    """Functions of `path` over MAX_FUNCTION_LINES lines or MAX_PARAMETERS parameters (self
    and cls aside; *args and **kwargs count one each)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        a = node.args
        params = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
        params = [p for p in params if p not in ("self", "cls")]
        params += [p.arg for p in (a.vararg, a.kwarg) if p is not None]
        lines = node.end_lineno - node.lineno + 1
        if lines > MAX_FUNCTION_LINES or len(params) > MAX_PARAMETERS:
            found.append(f"{path.name}:{node.lineno} {node.name}: {lines} lines, {len(params)}")
    return found


@pytest.mark.parametrize("name", sorted(modules()))
def test_functions_are_short(name):
    assert long_functions(modules()[name]) == []


def test_the_function_check_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    source = tmp_path / "m.py"
    wide = "def wide(self, a, b, c, d, e, f, g, h, i):\n    pass\n"
    source.write_text(f"def long():\n{body}\n\n\n{wide}")
    assert long_functions(source) == ["m.py:1 long: 81 lines, 0", "m.py:84 wide: 2 lines, 9"]
