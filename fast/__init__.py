"""fast/: fast backends behind mezo.py's noise/update seam, with the reference's numbers.

- `CompiledBackend` (compiled.py), for CPUs: mezo.py's own noise compiled by torch.compile
(inductor's C++), the arithmetic on θ the reference's own; the restore, the update and the next +εz
in one pass.
- `TritonBackend` (kernels.py), for CUDA GPUs (and Triton's interpreter on CPUs, for tests): Triton
kernels that make z inside the kernel, one launch per dtype, fused passes.

`python mezo.py ... --fast` calls `choose`: the compiled backend on a CPU, Triton on a GPU. The
environment variable MEZO_FAST=compiled or MEZO_FAST=triton picks one by hand (on a CPU, triton is
the interpreter: TRITON_INTERPRET=1).
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


def choose(device: str, exact: bool = False, fuse: bool = False):
    """The backend `--fast` runs on a device ("cpu", "cuda", "cuda:1"); exact: `--exact-restore`'s
    drift-free mode; fuse: wrapped in `Fused` (2 passes over θ a step instead of 4) where the
    backend can, for ZO-SGD."""
    backend = _choose(device, exact)
    if fuse and hasattr(backend, "restore_and_update"):
        return Fused(backend)
    return backend


def _choose(device: str, exact: bool):
    want = os.environ.get("MEZO_FAST") or ("triton" if device.startswith("cuda") else "compiled")
    if want not in ("compiled", "triton"):
        raise UsageError(f"MEZO_FAST={want!r}: set it to compiled or triton, or unset it (--fast "
                         "then picks by device)")
    if want == "compiled":
        from .compiled import compiled_backend
        return compiled_backend(exact)
    if device.startswith("cpu") and os.environ.get("TRITON_INTERPRET") != "1":
        raise UsageError("MEZO_FAST=triton on a CPU runs Triton's interpreter: start with "
                         "TRITON_INTERPRET=1 set (before anything imports triton), or unset "
                         "MEZO_FAST for the compiled CPU backend")
    from .kernels import TritonBackend
    return TritonBackend(exact=exact)  # ExactRestore's numbers, in fewer passes


def stretches(p) -> list[tuple[int, int, int]]:
    """(local start, length, global offset) of each stretch of p's flat tensor that is also
    contiguous in the global index: the whole tensor; or, for a tensor-parallel shard that cuts
    dimension d, one stretch per index of the dimensions before d (a rowwise weight's shard: one per
    row)."""
    cut = [d for d, (n, f) in enumerate(zip(p.tensor.shape, p.full_shape)) if n != f]
    if not cut:
        return [(0, p.tensor.numel(), p.offset)]
    length = math.prod(p.tensor.shape[cut[-1]:])  # dimensions after the last cut are whole
    # global index of each stretch's element 0
    starts = p.global_index(0, p.tensor.numel(), length).tolist()
    return [(i * length, length, g) for i, g in enumerate(starts)]


class Fused:
    """A backend that defers passes over θ and fuses them: how this differs from the reference.

    mezo_step makes four passes a step: +εz, −2εz, +εz (the restore) and the update. The restore and
    the update need no forward between them, and neither does the update and the next step's +εz'.
    So the restore is held back; the update that follows it for the same seed is held back with it;
    and the next +εz' makes all three in one pass (the backend's `restore_and_update`, with the
    roundings of the three calls): 2 passes a step. Whatever else comes first makes the held passes
    as they were asked for, so any sequence gives the reference's numbers. `settle` makes θ exact
    before it is read: the loop calls it before an evaluation, a checkpoint and the end. For ZO-SGD
    only: a rule (rules.py) reads θ between the calls.
    """

    def __init__(self, backend):
        self.backend = backend
        # a restore held back: (seed, eps, params); then, with its update:
        # (seed, eps, params, projected_grad, lr, weight_decay)
        self.restore, self.update_args = None, None
        self.last = None  # the last perturbation made: (seed, scale)

    @property
    def exact(self) -> bool:
        """θ comes back bit for bit: the backend's own restore is (the held passes are its)."""
        return getattr(self.backend, "exact", False)

    def perturb(self, params, seed: int, scale: float) -> None:
        held = self.update_args
        if held is not None and held[2] is params and scale == held[1]:
            # the next step's +εz': restore, update and this perturbation in one pass
            held_seed, eps, _, projected_grad, lr, weight_decay = held
            self._restore_and_update(params, held_seed, eps, projected_grad, lr, weight_decay, seed)
            self.update_args, self.last = None, (seed, scale)
            return
        self.settle(params)
        if self.last == (seed, -2 * scale) and scale > 0:
            # the restore after L−: hold it back, to make it with the update
            self.restore, self.last = (seed, scale, params), None
            return
        self.backend.perturb(params, seed, scale)
        self.last = (seed, scale)

    def update(self, params, seed: int, projected_grad: float, lr: float,
               weight_decay: float) -> None:
        if self.restore is not None and self.restore[0] == seed and self.restore[2] is params:
            self.update_args = (seed, self.restore[1], params, projected_grad, lr, weight_decay)
            self.restore = None
            return
        self.settle(params)
        self.backend.update(params, seed, projected_grad, lr, weight_decay)
        self.last = None

    def settle(self, params=None) -> None:
        """Make the held passes, so that θ is exact."""
        if self.restore is not None:
            seed, eps, held = self.restore
            self.restore = None
            self.backend.perturb(held, seed, eps)
        if self.update_args is not None:
            seed, eps, held, projected_grad, lr, weight_decay = self.update_args
            self.update_args = None
            self._restore_and_update(held, seed, eps, projected_grad, lr, weight_decay, None)
        self.last = None

    def _restore_and_update(self, params, seed, eps, projected_grad, lr, weight_decay,
                            next_seed) -> None:
        if hasattr(self.backend, "restore_and_update"):
            self.backend.restore_and_update(params, seed, eps, projected_grad, lr, weight_decay,
                                            next_seed)
            return
        # A backend without the fused pass (the reference, in tests): the same passes one by one
        self.backend.perturb(params, seed, eps)
        self.backend.update(params, seed, projected_grad, lr, weight_decay)
        if next_seed is not None:
            self.backend.perturb(params, next_seed, eps)
