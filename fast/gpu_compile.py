"""fast/gpu_compile.py: compile every Triton kernel that fast/ launches for real GPUs, on a machine
without one.

Triton's interpreter (what the CPU tests run) checks no types, so a kernel that the interpreter runs
may still fail to compile for a GPU. Triton's compiler needs no GPU to make PTX and a cubin: this
compiles each specialisation of `fast.kernels.compile_cases()` (the same table `launch_checked`
checks every launch against) for each target, without launching anything.

    TRITON_INTERPRET=0 python fast/gpu_compile.py         # a line per kernel, target (make kernels)
    TRITON_INTERPRET=0 python fast/gpu_compile.py --json  # a JSON object per specialisation, target

It must run with TRITON_INTERPRET unset or 0 (under the interpreter `triton.jit` gives interpreted
functions, which do not compile): tests/test_kernels.py runs it in a subprocess.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("fast/gpu_compile.py compiles for GPUs: run it with TRITON_INTERPRET=0 (or unset)")
# Triton 3.9 warns once when this is unset; fusion stays on, as at launch
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
import triton.compiler  # noqa: E402
from mezo.fast import kernels  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

# sm_80 (A100) and sm_90 (H100/H200); 32 threads a warp
TARGETS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_90": GPUTarget("cuda", 90, 32)}


def compile_case(kernel, signature, constexprs, target):
    """Triton's compiled kernel (its .asm holds "ptx" and "cubin"), made without a GPU."""
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=target)


def results(targets=tuple(TARGETS), hand_round=False, block4s=(kernels.BLOCK4,)):
    """A dict per specialisation and target: kernel, constexprs, target, seconds, ptx and cubin
    sizes, error."""
    for kernel, signature, constexprs in kernels.compile_cases(hand_round, block4s):
        for name in targets:
            start, out = (
                time.perf_counter(),
                {"kernel": kernel.__name__, "constexprs": constexprs, "target": name},
            )
            try:
                asm = compile_case(kernel, signature, constexprs, TARGETS[name]).asm
                out.update(
                    ptx=len(asm.get("ptx", "")), cubin=len(asm.get("cubin", b"")), error=None
                )
            except Exception as e:  # reported per case: one failing kernel must not hide the others
                out.update(ptx=0, cubin=0, error=f"{type(e).__name__}: {e}".splitlines()[0][:300])
            out["seconds"] = round(time.perf_counter() - start, 2)
            yield out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--json", action="store_true", help="one JSON object per specialisation and target"
    )
    ap.add_argument(
        "--targets", default=",".join(TARGETS), help="comma-separated, from " + ", ".join(TARGETS)
    )
    args = ap.parse_args(argv)
    summary, failed = {}, 0
    for r in results(tuple(args.targets.split(","))):
        failed += r["error"] is not None
        if args.json:
            print(json.dumps(r), flush=True)
            continue
        key = r["kernel"], r["target"]
        n, bad, seconds = summary.get(key, (0, [], 0.0))
        summary[key] = (
            n + 1,
            bad + ([(r["constexprs"], r["error"])] if r["error"] else []),
            seconds + r["seconds"],
        )
    for (kernel, target), (n, bad, seconds) in summary.items():
        status = "ok" if not bad else f"FAILED {len(bad)}: {bad[0][0]}: {bad[0][1]}"
        print(f"{kernel:24s} {target}  {n:2d} specialisations  {seconds:5.1f} s  {status}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
