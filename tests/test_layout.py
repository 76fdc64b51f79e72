"""The layout the README promises: the harness imports neither the reference nor a variant, the reference and its
loop import no variant except in `variants()`, the one place the command line picks them, and mezo.py stays a
file a reader finishes in one sitting."""
import ast
import os
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ["tasks/__init__.py", "tasks/files.py", "tasks/lmbff.py", "tasks/prompts.py", "tasks/synthetic.py",
           "models.py", "checkpoints.py", "runs.py", "baseline.py", "options.py", "errors.py", "prefix.py"]
VARIANTS = {"fast", "tp", "cache", "rules"}


# What the project installs (pyproject.toml): `mezo` and, inside it, mezo.runs, mezo.tasks, mezo.fast, ...
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
PROJECT = {name.split(".")[-1] for name in SETUPTOOLS["py-modules"] + SETUPTOOLS["packages"]}


def imports(path: Path) -> list[tuple[str, str | None]]:
    """(project module imported, name of the function it is imported in, or None at module level). A name of
    mezo.py's own (e.g. `from mezo import Trainable`) counts as "mezo", the reference; `mezo.runs` as "runs"."""
    found = []

    def project_name(dotted: str | None, names: list[str]) -> list[str]:
        parts = dotted.split(".") if dotted else []
        if parts[:1] == ["mezo"]:
            parts = parts[1:]
        if parts:
            return [parts[0]]
        return [n if n in PROJECT else "mezo" for n in names]

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Import):
                # `import mezo` is the reference itself
                found.extend(((project_name(a.name, []) or ["mezo"])[0], function) for a in child.names
                             if a.name.split(".")[0] in PROJECT)
            elif isinstance(child, ast.ImportFrom) and (child.level or child.module.split(".")[0] in PROJECT):
                names = project_name(child.module, [a.name for a in child.names])
                found.extend((name, function) for name in names)
            visit(child, inner)
    visit(ast.parse(path.read_text()), None)
    return found


def own_sources(root: Path = ROOT) -> list[str]:
    """The project's .py files, tracked or not, under root: not a virtual environment kept in the checkout (a folder
    with pyvenv.cfg, however named: its site-packages hold thousands of other projects' files, some not even Python
    3), hidden folders, build/ or the runs."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("build", "runs", "__pycache__")
                   and not (Path(folder) / d / "pyvenv.cfg").exists()]
        found += [(Path(folder) / f).relative_to(root).as_posix() for f in files if f.endswith(".py")]
    return sorted(found)


def test_the_sources_checked_leave_out_a_venv_in_the_checkout_hidden_folders_build_and_runs(tmp_path):
    for name in ("mezo.py", "tasks/lmbff.py", "env/lib/python3.11/site-packages/six.py", ".venv/lib/x.py",
                 "build/lib/mezo.py", "runs/sst2/notes.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("import models\n")
    (tmp_path / "env" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    assert own_sources(tmp_path) == ["mezo.py", "tasks/lmbff.py"]


@pytest.mark.parametrize("path", own_sources())
def test_the_project_is_imported_as_mezo_never_by_a_bare_top_level_name(path):
    """A user's own `models.py` or `tasks/` must not be able to stand in for ours, nor ours for theirs."""
    bare = []
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        if isinstance(node, ast.Import):
            bare += [a.name for a in node.names if a.name.split(".")[0] in PROJECT - {"mezo"}]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            bare += [node.module] if node.module.split(".")[0] in PROJECT - {"mezo"} else []
    assert not bare, f"{path} imports {bare}: write `from mezo import ...` (or a relative import inside mezo)"


@pytest.mark.parametrize("module", HARNESS)
def test_the_harness_imports_neither_the_reference_nor_a_variant(module):
    bad = [(name, where) for name, where in imports(ROOT / module) if name in VARIANTS | {"mezo"}]
    assert not bad, f"{module} imports {bad}"


def test_the_reference_imports_variants_only_where_the_command_line_picks_them():
    variant_imports = [(name, where) for name, where in imports(ROOT / "mezo.py") if name in VARIANTS]
    assert variant_imports and all(where == "variants" for _, where in variant_imports), variant_imports
    assert {name for name, _ in variant_imports} == VARIANTS


def test_the_reference_is_one_sitting():
    """Width, not length: no line of mezo.py past 100 columns (a cap on lines pushed code sideways), and a
    file still read in one sitting."""
    source = (ROOT / "mezo.py").read_text()
    wide = [(n, len(line)) for n, line in enumerate(source.splitlines(), 1) if len(line) > 100]
    assert not wide, f"mezo.py lines past 100 columns (line, width): {wide}"
    assert len(source.splitlines()) <= 800
    tree = ast.parse(source)
    lengths = {n.name: n.end_lineno - n.lineno + 1 for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert lengths["train"] <= 40 and lengths["mezo_step"] <= 25, lengths
