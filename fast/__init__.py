"""fast/: Triton kernels behind mezo.py's noise/update backend seam.

How this differs from the reference (`mezo.TorchBackend`): z is made inside the kernel by Triton's own
`tl.randn4x`, the function that `mezo.noise` reimplements in torch, so only θ crosses memory (one read and
one write per element per pass) instead of index, counter, word and z temporaries. One Philox call serves
four consecutive elements (`tl.interleave` puts them in place). Arithmetic is float32 with one rounding to
the storage dtype, as in the reference; bfloat16 rounds to nearest even by hand, because Triton's
interpreter truncates float32 -> bfloat16 casts.

Same numbers as the reference: the integer stream and uniforms are bit-identical, z agrees within ~1e-6
(Triton's log/cos versus correctly rounded ones), tensors within a rounding of their dtype (tests/test_fast.py).

Use: `python mezo.py ... --fast`, or `mezo.mezo_step(..., backend=fast.TritonBackend())`. On a CPU the
kernels run in Triton's interpreter: set TRITON_INTERPRET=1 before anything imports triton.
"""
import torch
import triton
import triton.language as tl

BLOCK4 = 1024  # Philox counters per program: 4096 elements (the interpreter costs ~9 ms per program)


@triton.jit
def _z_block(seed, offset, n, BLOCK4: tl.constexpr):
    """z for the program's 4·BLOCK4 global indices, their local positions, and which lie in [0, n)."""
    offset = offset.to(tl.int64)
    first = offset // 4 + tl.program_id(0).to(tl.int64) * BLOCK4  # first Philox counter of this program
    n0, n1, n2, n3 = tl.randn4x(seed, first + tl.arange(0, BLOCK4))
    z = tl.interleave(tl.interleave(n0, n2), tl.interleave(n1, n3))  # n0 n1 n2 n3 of counter 0, then 1, ...
    local = first * 4 + tl.arange(0, 4 * BLOCK4) - offset  # element i of the tensor has global index offset + i
    return z, local, (local >= 0) & (local < n)


@triton.jit
def _store_rounded(ptr, local, mask, t, IS_BF16: tl.constexpr):
    if IS_BF16:  # round to nearest even by hand: the interpreter's cast truncates
        bits = t.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        tl.store(ptr + local, tl.where(t == t, rounded, t.to(tl.bfloat16)), mask=mask)  # NaN stays NaN
    else:
        tl.store(ptr + local, t.to(ptr.dtype.element_ty), mask=mask)


# offset and seed are never specialised: Triton would turn a value of 1 into a compile-time constant (and
# compile a kernel per divisibility class), and each program computes with them as int64 tensors.
@triton.jit(do_not_specialize=["n", "offset", "seed"])
def _perturb_kernel(theta_ptr, n, offset, seed, scale, BLOCK4: tl.constexpr, IS_BF16: tl.constexpr):
    """θ ← θ + scale·z."""
    z, local, mask = _z_block(seed, offset, n, BLOCK4)
    t = tl.load(theta_ptr + local, mask=mask, other=0.0).to(tl.float32)
    _store_rounded(theta_ptr, local, mask, t + scale * z, IS_BF16)


@triton.jit(do_not_specialize=["n", "offset", "seed"])
def _update_kernel(theta_ptr, n, offset, seed, projected_grad, lr, wd, BLOCK4: tl.constexpr, IS_BF16: tl.constexpr):
    """θ ← θ − lr·(projected_grad·z + wd·θ)."""
    z, local, mask = _z_block(seed, offset, n, BLOCK4)
    t = tl.load(theta_ptr + local, mask=mask, other=0.0).to(tl.float32)
    _store_rounded(theta_ptr, local, mask, t - lr * (projected_grad * z + wd * t), IS_BF16)


def _launch(kernel, p, *args):
    theta = p.tensor.data
    if tuple(theta.shape) != p.full_shape or not theta.is_contiguous():
        raise ValueError(f"{p.name}: the Triton backend takes whole contiguous tensors; use TorchBackend for shards")
    if theta.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{p.name}: the Triton backend takes float32, bfloat16 or float16, not {theta.dtype}")
    n = theta.numel()
    counters = (p.offset + n - 1) // 4 - p.offset // 4 + 1
    kernel[(triton.cdiv(counters, BLOCK4),)](theta, n, p.offset, *args, BLOCK4=BLOCK4,
                                              IS_BF16=theta.dtype == torch.bfloat16)


class TritonBackend:
    """The noise/update backend of mezo.py, in Triton: one launch per tensor."""

    name = "triton"

    @torch.no_grad()
    def perturb(self, params, seed: int, scale: float) -> None:
        for p in params:
            _launch(_perturb_kernel, p, seed, float(scale))

    @torch.no_grad()
    def update(self, params, seed: int, projected_grad: float, lr: float, weight_decay: float) -> None:
        for p in params:
            _launch(_update_kernel, p, seed, float(projected_grad), float(lr), float(weight_decay if p.decay else 0.0))
