"""The package's shape, read from its source: each folder imports only folders on lower floors (README, Layout), no
function is longer than a screen or takes more than a handful of required values, and the public API documents its
arguments with an example."""
import ast
import importlib
from pathlib import Path

import pytest

from helpers import ROOT

PACKAGE = ROOT / "lora_tuner"
# floor of each top-level folder or module of lora_tuner: an import may only go to a lower floor (or stay inside)
FLOORS = {
    "errors": 0,
    "sizes": 1, "weights": 1, "outputs": 1,
    "formats": 2,
    "config": 3,
    "run_folder": 4, "data": 4,
    "model": 5,
    "verify": 6,
    "plan": 7,
    "preflight": 8, "adapters": 8,
    "train": 9, "export": 9,
    "eval": 10,
    "serve": 11,
    "ui": 12,
    "cli": 13, "__init__": 13,
}
MAX_LINES, MAX_REQUIRED = 60, 6
# signatures others fix: click commands take one parameter per option; torch's autograd passes what forward saved
FIXED_SIGNATURES = ("main.command", "staticmethod")


def unit(path: Path) -> str:
    """The folder (or top-level module) a file of the package belongs to."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def imported_units(path: Path) -> set[str]:
    """The package's folders and modules this file imports, relative or absolute."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(parts[:len(parts) - node.level])
            target = base + (node.module.split(".") if node.module else [])
            found |= {target[0]} if target else {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lora_tuner."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("lora_tuner.")}
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_folder_has_a_floor():
    assert {unit(path) for path in SOURCES} == set(FLOORS), "give a new folder its floor here and in the README"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_import_goes_to_a_lower_floor(path):
    own = unit(path)
    upward = sorted(target for target in imported_units(path) - {own} if FLOORS[target] >= FLOORS[own])
    assert not upward, f"{own} (floor {FLOORS[own]}) imports {upward}: floors {[FLOORS[t] for t in upward]}"


def functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def required(node) -> int:
    args = node.args
    positional = args.posonlyargs + args.args
    count = len(positional) - len(args.defaults) + sum(default is None for default in args.kw_defaults)
    return count - (1 if positional and positional[0].arg in ("self", "cls") else 0)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_functions_are_short_and_take_few_required_values(path):
    for node in functions(path):
        where = f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}"
        assert node.end_lineno - node.lineno + 1 <= MAX_LINES, f"{where} is over {MAX_LINES} lines"
        fixed = any(ast.unparse(d).startswith(FIXED_SIGNATURES) for d in node.decorator_list)
        assert fixed or required(node) <= MAX_REQUIRED, f"{where} takes {required(node)} required values"


@pytest.mark.parametrize("name", ["run", "merge", "export_gguf", "export_gguf_lora", "AdapterPool", "load_recipe",
                                  "evaluate"])
def test_the_public_api_documents_its_arguments_with_an_example(name):
    import lora_tuner

    target = getattr(lora_tuner, name)
    doc = (target.__init__ if isinstance(target, type) else target).__doc__ or ""
    doc = (target.__doc__ or "") + doc
    assert "Args:" in doc and "Example" in doc, name
    documented = {line.strip().split(":")[0] for line in doc.split("Args:")[1].splitlines() if ":" in line}
    signature = importlib.import_module("inspect").signature(target)
    assert set(signature.parameters) - {"self"} <= documented, (name, set(signature.parameters) - documented)
