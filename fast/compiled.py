"""fast/compiled.py: the reference's own noise and update, compiled for CPUs with torch.compile
(inductor's C++).

How this differs from the reference (`mezo.TorchBackend`):

- z for a window of consecutive global indices is `mezo.randn4x` itself, compiled by inductor into
one loop: one Philox call serves four elements, and no index, counter or word temporaries go through
memory. Windows have two fixed sizes (mezo.NOISE_CHUNK, and SMALL for short stretches), so the
function compiles twice per process, and inductor's on-disk cache makes a later process load it
instead of compiling it again.
- The arithmetic on θ is the reference's own eager expressions on the same z, so every rounding is
the same (tests/test_compiled.py checks z and the tensors bit for bit, in every dtype).
- `restore_and_update` does the restore after L−, the update and the next step's +εz' in one pass
over θ, as fast/'s kernels do: with mezo_step's fused path a step makes two passes over θ instead of
four.

A window spans consecutive trainable tensors (LoRA's hundreds of small ones share windows); a
tensor-parallel shard's stretches (fast.stretches) each start a window of their own.
`compiled_backend()` builds and checks it and, where the C++ toolchain or inductor is missing, says
so in one line and returns the reference backend.
"""
from __future__ import annotations

import functools
import sys
import threading
import time

import torch

import mezo
from mezo import NOISE_CHUNK, in_compute_dtype

from . import stretches

# the short window: a stretch of at most this many values does not pay for NOISE_CHUNK's noise
SMALL = 2048


@functools.cache
def _window(n: int):
    """A compiled function (seed, g) -> z of the n global indices g, g + 1, ..., from int64 0-d
    tensors (tensors, so that a new seed or offset does not compile again)."""
    def window(seed: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        # the Philox counters the window touches
        counters = (g >> 2) + torch.arange(n // 4 + 1, dtype=torch.int64)
        # (4 · counters,): index 4j + k
        z4 = torch.stack(mezo.randn4x(seed, counters), dim=1).reshape(-1)
        # (n,): output index % 4 of counter index // 4, from g on
        return z4[(g & 3) + torch.arange(n)]
    return torch.compile(window, dynamic=False, fullgraph=True)


def window_noise(seed: int, g: int, n: int) -> torch.Tensor:
    """z (float32) of the global indices g .. g + n − 1, n ≤ NOISE_CHUNK: the same numbers as
    mezo.noise."""
    size = SMALL if n <= SMALL else NOISE_CHUNK
    seed_t, g_t = torch.tensor(seed, dtype=torch.int64), torch.tensor(g, dtype=torch.int64)
    return _window(size)(seed_t, g_t)[:n]


class CompiledBackend:
    """mezo.py's noise/update backend for CPUs, the numbers of mezo.TorchBackend. Construct it
    through compiled_backend(), which compiles both window sizes and checks them against mezo.noise
    first."""

    name = "compiled"

    def _windows(self, params, seeds: list[int]):
        """([(trainable, flat piece of θ)], [z of the pieces, one per seed]) for each window: pieces
        whose global indices follow each other, at most NOISE_CHUNK of them."""
        pieces, first, size = [], None, 0
        for p in params:
            flat = p.tensor.data.view(-1)
            for start, length, offset in stretches(p):
                for at in range(0, length, NOISE_CHUNK):
                    n = min(NOISE_CHUNK, length - at)
                    if pieces and (first + size != offset + at or size + n > NOISE_CHUNK):
                        yield self._with_noise(pieces, first, size, seeds)
                        pieces, size = [], 0
                    if not pieces:
                        first = offset + at
                    pieces.append((p, flat[start + at:start + at + n]))
                    size += n
        if pieces:
            yield self._with_noise(pieces, first, size, seeds)

    @staticmethod
    def _with_noise(pieces, first: int, size: int, seeds: list[int]):
        sizes = [theta.numel() for _, theta in pieces]
        return pieces, [window_noise(seed, first, size).split(sizes) for seed in seeds]

    def noise_pieces(self, params, seeds: list[int]):
        """(trainable, flat piece of θ, [its z for each seed]) window by window: mezo.noise's z,
        made compiled, for the update rules (rules.py), which walk θ with several seeds' z at once.
        """
        for pieces, zs in self._windows(params, seeds):
            for (p, theta), *z in zip(pieces, *zs):
                yield p, theta, z

    @torch.no_grad()
    def perturb(self, params, seed: int, scale: float) -> None:
        """θ ← θ + scale·z, as TorchBackend.perturb."""
        for pieces, (zs,) in self._windows(params, [seed]):
            for (_, theta), z in zip(pieces, zs):
                t = in_compute_dtype(theta)
                theta.copy_(t + scale * z.to(t.dtype))

    @torch.no_grad()
    def update(self, params, seed: int, projected_grad: float, lr: float,
               weight_decay: float) -> None:
        """θ ← θ − lr·(projected_grad·z + weight_decay·θ), as TorchBackend.update."""
        for pieces, (zs,) in self._windows(params, [seed]):
            for (p, theta), z in zip(pieces, zs):
                wd = weight_decay if p.decay else 0.0
                t = in_compute_dtype(theta)
                theta.copy_(t - lr * (projected_grad * z.to(t.dtype) + wd * t))

    def settle(self, params) -> None:
        """Every pass is made when asked for: nothing to do (fast.Fused holds passes back)."""

    @torch.no_grad()
    def restore_and_update(self, params, seed: int, eps: float, projected_grad: float, lr: float,
                           weight_decay: float, next_seed: int | None = None) -> None:
        """perturb(+eps), update(...) and, given next_seed, perturb(+eps) with it, in one pass over
        θ: each value is rounded to θ's dtype where the three calls store it, so the numbers are
        theirs."""
        seeds = [seed] if next_seed is None else [seed, next_seed]
        for pieces, zs in self._windows(params, seeds):
            for (p, theta), *z in zip(pieces, *zs):
                wd = weight_decay if p.decay else 0.0
                t = in_compute_dtype(theta)
                # the restore, stored
                t = in_compute_dtype((t + eps * z[0].to(t.dtype)).to(theta.dtype))
                t = t - lr * (projected_grad * z[0].to(t.dtype) + wd * t)  # the update
                if next_seed is not None:
                    # stored, then the next +εz'
                    t = in_compute_dtype(t.to(theta.dtype)) + eps * z[1].to(t.dtype)
                theta.copy_(t)


# The thread that compiled first. torch 2.11's dynamo crashes the process (SIGSEGV in
# FakeTensor.__enter__) when it compiles again after that thread has ended, e.g. a thread pool's
# worker; torch 2.13 does not (tests/test_compiled.py).
_compiled_by: threading.Thread | None = None


def compiled_backend(exact: bool = False):
    """A CompiledBackend (wrapped in mezo.ExactRestore for --exact-restore), compiled and checked
    against mezo.noise now; where that fails, one line on stderr and the reference backend (same
    numbers, slower)."""
    global _compiled_by
    try:
        old = torch.torch_version.TorchVersion(torch.__version__) < (2, 13)
        if old and _compiled_by is not None and not _compiled_by.is_alive():
            raise RuntimeError(f"torch {torch.__version__} can crash compiling again once the "
                               "thread that compiled first has ended; torch 2.13 does not")
        t = time.perf_counter()
        # both window sizes, an offset past 2^32
        for n, g in ((SMALL, 1 << 33 | 3), (NOISE_CHUNK, 5)):
            got = window_noise(12345, g, n)
            if not torch.equal(got, mezo.noise(12345, torch.arange(g, g + n))):
                raise RuntimeError("the compiled noise differs from mezo.noise")
        backend, seconds = CompiledBackend(), time.perf_counter() - t
        _compiled_by = _compiled_by or threading.current_thread()
        print(f"mezo: --fast: compiled CPU backend ready in {seconds:.1f} s", file=sys.stderr)
    except Exception as e:  # no C++ compiler, no inductor, or numbers that are not the reference's
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        print(f"mezo: --fast: cannot use the compiled CPU backend ({type(e).__name__}: {reason}); "
              "using the reference backend (same numbers, slower)", file=sys.stderr)
        backend = mezo.TorchBackend()
    return mezo.ExactRestore(backend) if exact else backend
