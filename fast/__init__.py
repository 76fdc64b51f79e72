"""fast/: fast backends behind mezo.py's noise/update seam, with the reference's numbers.

- `CompiledBackend` (compiled.py), for CPUs: mezo.py's own noise compiled by torch.compile (inductor's C++), the
  arithmetic on θ the reference's own; the restore, the update and the next +εz in one pass.
- `TritonBackend` (kernels.py), for CUDA GPUs (and Triton's interpreter on CPUs, for tests): Triton kernels that
  make z inside the kernel, one launch per dtype, fused passes.

`python mezo.py ... --fast` calls `choose`: the compiled backend on a CPU, Triton on a GPU. The environment variable
MEZO_FAST=compiled or MEZO_FAST=triton picks one by hand (on a CPU, triton is the interpreter: TRITON_INTERPRET=1).
"""
import math
import os

from ..errors import UsageError


def __getattr__(name):  # the backends import triton or torch.compile only when asked for
    if name == "TritonBackend":
        from .kernels import TritonBackend
        return TritonBackend
    if name == "CompiledBackend":
        from .compiled import CompiledBackend
        return CompiledBackend
    raise AttributeError(f"module 'fast' has no attribute {name!r}")


def choose(device: str, exact: bool = False):
    """The backend `--fast` runs on a device ("cpu", "cuda", "cuda:1"); exact: `--exact-restore`'s drift-free mode."""
    want = os.environ.get("MEZO_FAST") or ("triton" if device.startswith("cuda") else "compiled")
    if want not in ("compiled", "triton"):
        raise UsageError(f"MEZO_FAST={want!r}: set it to compiled or triton, or unset it (--fast then picks by device)")
    if want == "compiled":
        from .compiled import compiled_backend
        return compiled_backend(exact)
    if device.startswith("cpu") and os.environ.get("TRITON_INTERPRET") != "1":
        raise UsageError("MEZO_FAST=triton on a CPU runs Triton's interpreter: start with TRITON_INTERPRET=1 set "
                         "(before anything imports triton), or unset MEZO_FAST for the compiled CPU backend")
    from .kernels import TritonBackend
    return TritonBackend(exact=exact)  # ExactRestore's numbers, in fewer passes


def stretches(p) -> list[tuple[int, int, int]]:
    """(local start, length, global offset) of each stretch of p's flat tensor that is also contiguous in the
    global index: the whole tensor; or, for a tensor-parallel shard that cuts dimension d, one stretch per
    index of the dimensions before d (a rowwise weight's shard: one per row)."""
    cut = [d for d, (n, f) in enumerate(zip(p.tensor.shape, p.full_shape)) if n != f]
    if not cut:
        return [(0, p.tensor.numel(), p.offset)]
    length = math.prod(p.tensor.shape[cut[-1]:])  # dimensions after the last cut are whole
    starts = p.global_index(0, p.tensor.numel(), length).tolist()  # global index of each stretch's element 0
    return [(i * length, length, g) for i, g in enumerate(starts)]
