"""PTX instructions per element of each Triton kernel, float32 against bfloat16: an offline proxy for a GPU's
element rate, measurable without a GPU (issue 21).

    TRITON_INTERPRET=0 python bench/ptx.py [--target sm_90]

For each kernel (in its first mode of fast/kernels.py's LAUNCHED) it compiles the GPU's variant (bfloat16 by
the native cast) and the interpreter's (bfloat16 rounded by hand, what GPUs ran before issue 21), and counts
the PTX instructions of one thread (directives, labels and braces left out), divided by the elements a thread
handles (4·BLOCK4 over the program's threads). rule_kernel's loop body counts once (one sample). It also
counts global loads and stores of θ's width and whether they are vector ones (ld.global.v*).
"""

import os
import re
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("bench/ptx.py compiles for GPUs: run it with TRITON_INTERPRET=0 (or unset)")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _cli  # bench/_cli.py, beside this file: the shared command line
from mezo.fast import gpu_compile, kernels

INSTRUCTION = re.compile(r"^\s*(@!?%p\d+\s+)?[a-z]")
MEMORY = re.compile(r"\b(ld|st)\.global(\.nc)?(\.v\d)?\.b(16|32)\b")


def instructions(ptx: str) -> int:
    """Instruction lines of a PTX listing: not directives (.reg, .param), labels, braces or comments."""
    return sum(
        1 for line in ptx.splitlines() if INSTRUCTION.match(line) and line.rstrip().endswith(";")
    )


def main() -> None:
    ap = _cli.parser(__doc__.splitlines()[0])
    ap.add_argument("--target", default="sm_90", choices=sorted(gpu_compile.TARGETS))
    args = ap.parse_args()
    target = gpu_compile.TARGETS[args.target]
    print(
        f"{'kernel':24s} {'dtype':9s} {'bf16 rounding':14s} {'instr/elem':>10s} {'ld/st':>6s} vector"
    )
    seen = set()
    for hand in (True, False):
        for kernel, signature, constexprs in kernels.compile_cases(hand_round=hand):
            kind = constexprs["KIND"]
            # the first mode of each kernel; float16 left out; float32 does not round, so once
            if kind == 2 or (kind == 0 and hand) or (kernel, kind, hand) in seen:
                continue
            seen.add((kernel, kind, hand))
            compiled = gpu_compile.compile_case(kernel, signature, constexprs, target)
            ptx = compiled.asm["ptx"]
            per_thread = 4 * constexprs["BLOCK4"] / (compiled.metadata.num_warps * 32)
            memory = MEMORY.findall(ptx)
            vector = sum(1 for m in memory if m[2])
            dtype = "float32" if kind == 0 else "bfloat16"
            rounding = "-" if kind == 0 else ("by hand" if hand else "native cast")
            print(
                f"{kernel.__name__:24s} {dtype:9s} {rounding:14s} {instructions(ptx) / per_thread:10.1f} "
                f"{len(memory):6d} {vector}",
                flush=True,
            )


if __name__ == "__main__":
    _cli.main(main)
