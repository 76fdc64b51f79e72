"""Every Triton kernel fast/ launches compiles for real GPUs (sm_80, sm_90), on this machine without one.

The interpreter the other tests run checks no types: `rule_kernel` ran there and did not compile for a GPU.
The specialisations come from fast/kernels.py's LAUNCHED, the table `launch_checked` checks each launch against;
fast/gpu_compile.py compiles them in a subprocess (with TRITON_INTERPRET=0: under the interpreter `triton.jit`
gives functions that do not compile). Triton's on-disk cache makes a second run take seconds.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton
from mezo.fast import kernels

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("sm_80", "sm_90")
CASES = [(kernel.__name__, constexprs) for kernel, _, constexprs in kernels.compile_cases()]


def _key(kernel: str, constexprs: dict, target: str) -> str:
    return f"{kernel}[{','.join(f'{k}={v}' for k, v in sorted(constexprs.items()))}]@{target}"


@pytest.fixture(scope="module")
def compiled():
    """_key -> gpu_compile's result, both targets compiled at once (one process each)."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "fast" / "gpu_compile.py"), "--json", "--targets", t],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for t in TARGETS
    ]
    out = {}
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=1200)
        lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        assert lines, (
            f"fast/gpu_compile.py printed no results (exit {proc.returncode}):\n{stderr[-3000:]}"
        )
        out.update({_key(r["kernel"], r["constexprs"], r["target"]): r for r in lines})
    return out


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kernel,constexprs", CASES, ids=[_key(k, c, "")[:-1] for k, c in CASES])
def test_kernel_compiles_to_ptx_and_cubin(compiled, kernel, constexprs, target):
    r = compiled.get(_key(kernel, constexprs, target))
    assert r is not None, f"no compile result for {_key(kernel, constexprs, target)}"
    assert r["error"] is None, f"{_key(kernel, constexprs, target)}: {r['error']}"
    assert r["ptx"] > 0 and r["cubin"] > 0, r


def _jit_functions(path: Path) -> dict[str, set[str]]:
    """name -> names it mentions, for each function of a fast/ file decorated with triton.jit."""
    out = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef) and any(
            "jit" in ast.unparse(d) for d in node.decorator_list
        ):
            out[node.name] = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
    return out


def test_every_jit_function_in_fast_is_a_launched_kernel_or_called_by_one():
    """A kernel added to fast/ without an entry in LAUNCHED (so without compile cases) fails here."""
    jit = {}
    for path in sorted((ROOT / "fast").glob("*.py")):
        jit.update(_jit_functions(path))
    reached, todo = set(), [k.__name__ for k in kernels.LAUNCHED]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo += [n for n in jit.get(name, ()) if n in jit]
    assert set(jit) - reached == set(), (
        f"@triton.jit functions no compile case covers: {set(jit) - reached}"
    )
    assert {k.__name__ for k in kernels.LAUNCHED} <= set(jit)


def test_kernels_are_launched_only_through_launch():
    """kernel[grid](...) outside `launch_checked` would skip LAUNCHED's check (and so the compile cases)."""
    where = []
    for path in sorted((ROOT / "fast").glob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef) and fn.name != "launch_checked":
                calls = [
                    n
                    for n in ast.walk(fn)
                    if isinstance(n, ast.Call)
                    and isinstance(n.func, ast.Subscript)
                    and isinstance(n.func.value, ast.Name)
                    and n.func.value.id.endswith("_kernel")
                ]
                where += [f"{path.name}:{fn.name}:{c.lineno}" for c in calls]
    assert where == []


def test_launch_refuses_a_specialisation_not_in_launched():
    with pytest.raises(ValueError, match="not in kernels.LAUNCHED"):
        kernels.launch_checked(kernels.perturb_kernel, None, 1, 0.5, SOURCE=4)
    with pytest.raises(ValueError, match="not in kernels.LAUNCHED"):
        kernels.launch_checked(kernels.update_kernel, None, 1, 0.5, 0.1, 0.0, NEXT=True)


def test_compile_cases_cover_every_dtype_and_mode_and_round_natively():
    cases = list(kernels.compile_cases())
    assert {c["KIND"] for _, _, c in cases} == set(kernels.KINDS.values())
    assert {c["SOURCE"] for _, _, c in cases if "SOURCE" in c} == {0, 1, 2, 3}
    assert {(c["NEXT"], c["EXACT"]) for _, _, c in cases if "NEXT" in c} == {
        (a, b) for a in (0, 1) for b in (0, 1)
    }
    assert {c["ADAM"] for _, _, c in cases if "ADAM" in c} == {False, True}
    # a GPU rounds bfloat16 with its native cast; only the interpreter (these tests' process) rounds by hand
    assert all(c["HAND_ROUND"] is False for _, _, c in cases)
    assert kernels.HAND_ROUND is (os.environ.get("TRITON_INTERPRET") == "1")
    assert isinstance(kernels.perturb_kernel, triton.runtime.JITFunction) is not kernels.HAND_ROUND
