"""The layout the README promises: the harness imports neither the reference nor a variant, the reference and its
loop import no variant except in `variants()`, the one place the command line picks them, and mezo.py stays a
file a reader finishes in one sitting."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ["tasks/__init__.py", "tasks/files.py", "tasks/lmbff.py", "tasks/prompts.py", "tasks/synthetic.py",
           "models.py", "checkpoints.py", "runs.py", "baseline.py", "options.py", "errors.py", "prefix.py"]
VARIANTS = {"fast", "tp", "cache", "rules"}


def imports(path: Path) -> list[tuple[str, str | None]]:
    """(top-level module imported, name of the function it is imported in, or None at module level)."""
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Import):
                found.extend((a.name.split(".")[0], function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0:
                found.append((child.module.split(".")[0], function))
            visit(child, inner)
    visit(ast.parse(path.read_text()), None)
    return found


@pytest.mark.parametrize("module", HARNESS)
def test_the_harness_imports_neither_the_reference_nor_a_variant(module):
    bad = [(name, where) for name, where in imports(ROOT / module) if name in VARIANTS | {"mezo"}]
    assert not bad, f"{module} imports {bad}"


def test_the_reference_imports_variants_only_where_the_command_line_picks_them():
    variant_imports = [(name, where) for name, where in imports(ROOT / "mezo.py") if name in VARIANTS]
    assert variant_imports and all(where == "variants" for _, where in variant_imports), variant_imports
    assert {name for name, _ in variant_imports} == VARIANTS


def test_the_reference_is_one_sitting():
    source = (ROOT / "mezo.py").read_text()
    assert len(source.splitlines()) <= 600
    train = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert train.end_lineno - train.lineno + 1 <= 80
