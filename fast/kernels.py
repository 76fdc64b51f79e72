"""fast/kernels.py: Triton kernels behind mezo.py's noise/update backend seam (GPUs; Triton's
interpreter on CPUs).

How this differs from the reference (`mezo.TorchBackend`): z is made inside the kernel by Triton's
own `tl.randn4x`, the function that `mezo.noise` reimplements in torch, so only θ crosses memory
(one read and one write per element per pass) instead of index, counter, word and z temporaries. One
Philox call serves four consecutive elements (`tl.interleave` puts them in place). Arithmetic is
float32 with one rounding to the storage dtype, as in the reference. On a GPU bfloat16 rounds with
the native cast (to nearest even); under Triton's interpreter, which truncates float32 -> bfloat16
casts, it rounds to nearest even by hand (HAND_ROUND).

Same numbers as the reference: the integer stream and uniforms are bit-identical, z agrees within
~1e-6 (Triton's log/cos versus correctly rounded ones), tensors within a rounding of their dtype
(tests/test_fast.py). Two things the reference does not do: many small tensors (LoRA's) are moved
once into one buffer so that a pass over them is one launch, and the restore after L− is fused with
the update and with the next step's +εz (one pass instead of three: a step makes two passes over θ,
not four).

rules.py's momentum and Adam take one pass too (`rule_update`): z of every sample made in the
kernel, the buffers (float32, each run's side by side) and θ updated in the same pass, instead of z
made chunk by chunk in torch.

TritonBackend(exact=True) is --exact-restore's drift-free mode with its copy of θ read and written
inside the same passes. Tensor-parallel shards (tp/) work too: a shard is cut into stretches of
consecutive global indices (one per row of a rowwise weight's shard), each a row of the launch's
table.

Use: `python mezo.py ... --fast` on a GPU, or `mezo.mezo_step(..., backend=fast.TritonBackend())`.
On a CPU the kernels run in Triton's interpreter (`MEZO_FAST=triton`, and TRITON_INTERPRET=1 set
before anything imports triton).
"""
import itertools

import torch
import triton
import triton.language as tl

from . import stretches

# Philox counters per program: 4096 elements (the interpreter costs ~9 ms per program)
BLOCK4 = 1024
# the smallest block, for a short stretch of a tensor-parallel shard (see _launches)
MIN_BLOCK4 = 16

# Names for the numbers the kernels are given. Triton lets a kernel read a module global only if it
# is a tl.constexpr, so these are; the launch code on the host reads their .value.

# A launch's `tensors` table (int64): row t describes tensor t (or a run of tensors), in these
# columns.
COL_THETA = tl.constexpr(0)  # θ's address
COL_NUMEL = tl.constexpr(1)  # its number of elements
COL_OFFSET = tl.constexpr(2)  # the global index of its element 0
COL_DECAY = tl.constexpr(3)  # 1 if weight decay applies to it, else 0
# exact mode's saved copy of θ (else θ's address again); rule_kernel: the rule's first buffer m
COL_SAVED = tl.constexpr(4)
N_COLS = tl.constexpr(5)
# A launch's `programs` table (int64): row p names the tensor (a row of `tensors`) and block of
# program p.
PROG_TENSOR = tl.constexpr(0)
PROG_BLOCK = tl.constexpr(1)
N_PROG_COLS = tl.constexpr(2)

# KIND: θ's storage dtype (see KINDS).
KIND_FLOAT32 = tl.constexpr(0)
KIND_BFLOAT16 = tl.constexpr(1)
KIND_FLOAT16 = tl.constexpr(2)

# SOURCE: what perturb_kernel adds scale·z to, and what it keeps (the last three: exact mode only).
# θ ← θ + scale·z
SOURCE_THETA = tl.constexpr(0)
# θ ← saved + scale·z (from the step's copy of θ)
SOURCE_SAVED = tl.constexpr(1)
# saved ← θ, then θ ← θ + scale·z (the step's first perturbation keeps its copy)
SOURCE_KEEP = tl.constexpr(2)
# θ ← saved (the restore; no noise)
SOURCE_RESTORE = tl.constexpr(3)


@triton.jit
def _block(offset, n, block, BLOCK4: tl.constexpr):
    """The 4·BLOCK4 elements of a run's block number `block`: its first Philox counter, their local
    positions, and which lie in [0, n). Blocks are aligned to Philox counters: element i has global
    index offset + i."""
    first = offset // 4 + block * BLOCK4
    local = first * 4 + tl.arange(0, 4 * BLOCK4) - offset
    return first, local, (local >= 0) & (local < n)


@triton.jit
def _z(seed, first, BLOCK4: tl.constexpr):
    """z of the 4·BLOCK4 elements whose Philox counters start at `first`."""
    n0, n1, n2, n3 = tl.randn4x(seed, first + tl.arange(0, BLOCK4))
    # n0 n1 n2 n3 of counter 0, then of counter 1, ...
    return tl.interleave(tl.interleave(n0, n2), tl.interleave(n1, n3))


@triton.jit
def _z_block(seed, offset, n, block, BLOCK4: tl.constexpr):
    """z of the block's elements (see _block), with their local positions and mask."""
    first, local, mask = _block(offset, n, block, BLOCK4)
    return _z(seed, first, BLOCK4), local, mask


@triton.jit
def _pointer(address, KIND: tl.constexpr):
    """An int64 address as a pointer to the storage dtype KIND."""
    if KIND == KIND_BFLOAT16:
        return address.to(tl.pointer_type(tl.bfloat16))
    elif KIND == KIND_FLOAT16:
        return address.to(tl.pointer_type(tl.float16))
    else:
        return address.to(tl.pointer_type(tl.float32))


@triton.jit
def _my_tensor(tensors, programs, KIND: tl.constexpr):
    """One launch covers many tensors: this program's row of `programs` names its tensor and block,
    and the tensor's row of `tensors` its θ, numel, global offset, weight-decay flag and saved copy
    (the COL_ columns). Returns (θ pointer, saved pointer, numel, offset, decay, block)."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(programs + N_PROG_COLS * pid + PROG_TENSOR)
    block = tl.load(programs + N_PROG_COLS * pid + PROG_BLOCK)
    row = tensors + N_COLS * t
    theta_ptr = _pointer(tl.load(row + COL_THETA), KIND)
    saved_ptr = _pointer(tl.load(row + COL_SAVED), KIND)
    n, offset = tl.load(row + COL_NUMEL), tl.load(row + COL_OFFSET)
    return theta_ptr, saved_ptr, n, offset, tl.load(row + COL_DECAY), block


@triton.jit
def _round(t, KIND: tl.constexpr, HAND_ROUND: tl.constexpr):
    """t (float32) rounded to the storage dtype KIND, as float32."""
    if KIND == KIND_BFLOAT16:
        if HAND_ROUND:
            # to nearest even with integer ops: the interpreter's cast truncates
            bits = t.to(tl.uint32, bitcast=True)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            # NaN stays NaN
            return tl.where(t == t, rounded.to(tl.float32, bitcast=True), t)
        else:
            # on a GPU the cast itself rounds to nearest even, in one instruction
            return t.to(tl.bfloat16).to(tl.float32)
    elif KIND == KIND_FLOAT16:
        return t.to(tl.float16).to(tl.float32)
    else:
        return t


@triton.jit
def _store(ptr, local, mask, t, KIND: tl.constexpr, HAND_ROUND: tl.constexpr):
    if HAND_ROUND:
        # rounded first: the interpreter's truncating cast is then exact
        t = _round(t, KIND, HAND_ROUND)
    # on a GPU one native cast rounds to nearest even: no round trip through float32
    tl.store(ptr + local, t.to(ptr.dtype.element_ty), mask=mask)


# seed is never specialised: Triton would turn a value of 1 into a compile-time constant.
@triton.jit(do_not_specialize=["seed"])
def perturb_kernel(
    # the launch's tables (see _my_tensor)
    tensors, programs,
    # z's seed, and how far θ moves along z
    seed, scale,
    # block size, storage dtype, bfloat16 rounding by hand (the interpreter)
    BLOCK4: tl.constexpr, KIND: tl.constexpr, HAND_ROUND: tl.constexpr,
    # what scale·z is added to, and what is kept (SOURCE_THETA ... SOURCE_RESTORE)
    SOURCE: tl.constexpr,
):
    """θ ← θ + scale·z, or exact mode's variants of it (see the SOURCE_ constants)."""
    theta_ptr, saved_ptr, n, offset, _, block = _my_tensor(tensors, programs, KIND)
    if SOURCE == SOURCE_RESTORE:
        _, local, mask = _block(offset, n, block, BLOCK4)
        tl.store(theta_ptr + local, tl.load(saved_ptr + local, mask=mask), mask=mask)
    else:
        z, local, mask = _z_block(seed, offset, n, block, BLOCK4)
        if SOURCE == SOURCE_SAVED:
            t = tl.load(saved_ptr + local, mask=mask, other=0.0)
        else:
            t = tl.load(theta_ptr + local, mask=mask, other=0.0)
        if SOURCE == SOURCE_KEEP:
            tl.store(saved_ptr + local, t, mask=mask)
        _store(theta_ptr, local, mask, t.to(tl.float32) + scale * z, KIND, HAND_ROUND)


@triton.jit(do_not_specialize=["seed"])
def update_kernel(
    # the launch's tables (see _my_tensor)
    tensors, programs,
    # z's seed, and the step's scalars
    seed, projected_grad, lr, wd,
    # block size, storage dtype, bfloat16 rounding by hand (the interpreter)
    BLOCK4: tl.constexpr, KIND: tl.constexpr, HAND_ROUND: tl.constexpr,
):
    """θ ← θ − lr·(projected_grad·z + wd·θ); wd only where the tensor's decay flag is set."""
    theta_ptr, _, n, offset, decay, block = _my_tensor(tensors, programs, KIND)
    z, local, mask = _z_block(seed, offset, n, block, BLOCK4)
    t = tl.load(theta_ptr + local, mask=mask, other=0.0).to(tl.float32)
    t = t - lr * (projected_grad * z + wd * decay.to(tl.float32) * t)
    _store(theta_ptr, local, mask, t, KIND, HAND_ROUND)


@triton.jit(do_not_specialize=["seed", "next_seed"])
def restore_update_kernel(
    # the launch's tables (see _my_tensor)
    tensors, programs,
    # z's seed, and the step's scalars
    seed, eps, projected_grad, lr, wd,
    # the next step's seed (used with NEXT)
    next_seed,
    # block size, storage dtype, bfloat16 rounding by hand (the interpreter)
    BLOCK4: tl.constexpr, KIND: tl.constexpr, HAND_ROUND: tl.constexpr,
    # also perturb for the next step; exact mode (θ made from the saved copy)
    NEXT: tl.constexpr, EXACT: tl.constexpr,
):
    """The restore (θ + εz, rounded as the reference stores it; in exact mode the saved copy itself)
    and the update, in one pass over θ; with NEXT, also the next step's θ + εz', rounded once more:
    the reference's three roundings, one pass. Exact mode with NEXT keeps the updated θ as the next
    step's saved copy."""
    theta_ptr, saved_ptr, n, offset, decay, block = _my_tensor(tensors, programs, KIND)
    first, local, mask = _block(offset, n, block, BLOCK4)
    z = _z(seed, first, BLOCK4)
    if EXACT:
        t = tl.load(saved_ptr + local, mask=mask, other=0.0).to(tl.float32)
    else:
        t = tl.load(theta_ptr + local, mask=mask, other=0.0).to(tl.float32)
        t = _round(t + eps * z, KIND, HAND_ROUND)
    t = t - lr * (projected_grad * z + wd * decay.to(tl.float32) * t)
    if NEXT:
        z_next = _z(next_seed, first, BLOCK4)
        t = _round(t, KIND, HAND_ROUND)
        if EXACT:
            _store(saved_ptr, local, mask, t, KIND, HAND_ROUND)
        t = t + eps * z_next
    _store(theta_ptr, local, mask, t, KIND, HAND_ROUND)


@triton.jit(do_not_specialize=["n_samples"])
def rule_kernel(
    # the launch's tables (see _my_tensor; COL_SAVED holds m's address), and v's address per table
    # row
    tensors, programs, second,
    # each sample's seed and coefficient (projected_grad / n_samples), and how many samples
    seeds, coefs, n_samples,
    # the step's scalars, and the rule's constants (rules.py's fused())
    lr, wd, beta1, beta2, c1, c2, delta,
    # block size, storage dtype, bfloat16 rounding by hand (the interpreter)
    BLOCK4: tl.constexpr, KIND: tl.constexpr, HAND_ROUND: tl.constexpr,
    # Adam (else momentum)
    ADAM: tl.constexpr,
):
    """rules.py's momentum and Adam, buffers and θ in one pass, z made here for every sample: ĝ =
    Σ_k coefs[k]·z(seeds[k]) + wd·θ;  momentum: m ← β1·m + ĝ, θ ← θ − lr·m;  Adam: m ← β1·m +
    (1−β1)·ĝ, v ← β2·v + (1−β2)·ĝ², θ ← θ − lr·(m/c1) / (√(v/c2) + δ). m and v are float32."""
    theta_ptr, _, n, offset, decay, block = _my_tensor(tensors, programs, KIND)
    row = tl.load(programs + N_PROG_COLS * tl.program_id(0).to(tl.int64) + PROG_TENSOR)
    m_ptr = tl.load(tensors + N_COLS * row + COL_SAVED).to(tl.pointer_type(tl.float32))
    first, local, mask = _block(offset, n, block, BLOCK4)
    t = tl.load(theta_ptr + local, mask=mask, other=0.0).to(tl.float32)
    g = tl.zeros_like(t)
    # the loop assigns only g and k: Triton types every loop-carried name, and a reused `_` (int64
    # here, a mask inside) did not compile for a GPU (the interpreter checks no types). A while, not
    # range(n_samples): Triton 3.6's interpreter (torch 2.11's) reads a run-time int's range with
    # int() of a 1-element array, a TypeError under NumPy 2.4; its `while` reads bool(), which works
    k = 0
    while k < n_samples:
        g += tl.load(coefs + k) * _z(tl.load(seeds + k), first, BLOCK4)
        k += 1
    g = g + wd * decay.to(tl.float32) * t
    m = tl.load(m_ptr + local, mask=mask, other=0.0)
    if ADAM:
        v_ptr = tl.load(second + row).to(tl.pointer_type(tl.float32))
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * tl.load(v_ptr + local, mask=mask, other=0.0) + (1 - beta2) * g * g
        tl.store(v_ptr + local, v, mask=mask)
        move = (m / c1) / (tl.sqrt(v / c2) + delta)
    else:
        m = beta1 * m + g
        move = m
    tl.store(m_ptr + local, m, mask=mask)
    _store(theta_ptr, local, mask, t - lr * move, KIND, HAND_ROUND)


KINDS = {torch.float32: KIND_FLOAT32.value, torch.bfloat16: KIND_BFLOAT16.value,
         torch.float16: KIND_FLOAT16.value}
# Under Triton's interpreter (TRITON_INTERPRET=1 when triton was imported) the kernels are
# interpreted functions, and bfloat16 must be rounded by hand; compiled for a GPU, the native cast
# rounds.
HAND_ROUND = not isinstance(perturb_kernel, triton.runtime.JITFunction)

# Every kernel the backend launches: the Triton types of its run-time arguments after the two
# tables, and the values each of its own constexprs takes. `launch_checked` refuses any other
# launch, and `compile_cases` makes from it every specialisation a GPU can be asked for
# (tests/test_kernels.py compiles each for sm_80 and sm_90). Seeds are 64-bit (step_seed's hash); a
# Python float is passed as fp32.
TABLES = ("*i64", "*i64")
SOURCES = tuple(s.value for s in (SOURCE_THETA, SOURCE_SAVED, SOURCE_KEEP, SOURCE_RESTORE))
LAUNCHED = {
    perturb_kernel: (("i64", "fp32"), {"SOURCE": SOURCES}),
    update_kernel: (("i64", "fp32", "fp32", "fp32"), {}),
    restore_update_kernel: (("i64", "fp32", "fp32", "fp32", "fp32", "i64"),
                             {"NEXT": (False, True), "EXACT": (False, True)}),
    rule_kernel: (("*i64", "*i64", "*fp32", "i32") + ("fp32",) * 7, {"ADAM": (False, True)}),
}


def compile_cases(hand_round: bool = False, block4s=(BLOCK4,)):
    """(kernel, Triton signature, constexprs) of every launch `launch_checked` accepts: each kernel
    of LAUNCHED, each storage dtype (KINDS) and each value of the kernel's own constexprs.
    hand_round: the interpreter's variant (a GPU launches hand_round=False). block4s: the block
    sizes (a shard's short stretch takes a smaller one)."""
    for kernel, (types, own) in LAUNCHED.items():
        names = kernel.arg_names
        runtime = [a for a in names if a not in ("BLOCK4", "KIND", "HAND_ROUND", *own)]
        signature = dict(zip(runtime, TABLES + types, strict=True))
        for block4, kind, values in itertools.product(block4s, sorted(set(KINDS.values())),
                                                      itertools.product(*own.values())):
            constexprs = {"BLOCK4": block4, "KIND": kind, "HAND_ROUND": hand_round,
                          **dict(zip(own, values))}
            yield kernel, {**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs
# up to this many values in tensors of 1M on average (LoRA's) share one buffer
COALESCE_MAX_NUMEL = 1 << 26


def _row(theta, offset, decay, copy) -> list[int]:
    """A row of a launch's `tensors` table (see the COL_ constants)."""
    row = [0] * N_COLS.value
    row[COL_THETA.value] = theta.data_ptr()
    row[COL_NUMEL.value] = theta.numel()
    row[COL_OFFSET.value] = offset
    row[COL_DECAY.value] = int(decay)
    row[COL_SAVED.value] = copy.data_ptr()
    return row


def _launches(runs, saved=None):
    """Group the runs by dtype, device and block size: one launch each, whatever the number of runs.
    A launch is (tensors table, programs table, number of programs, KIND, BLOCK4); see _my_tensor. A
    stretch of a shard (e.g. a row: many, all short) gets the smallest block that holds it, other
    runs BLOCK4, so an unsharded model makes one launch per dtype. saved: a buffer per run (exact
    mode's copy of θ)."""
    groups = {}
    for i, (theta, offset, decay, stretch) in enumerate(runs):
        # Philox counters its indices touch
        counters = (offset + theta.numel() - 1) // 4 - offset // 4 + 1
        block4 = (min(BLOCK4, max(MIN_BLOCK4, triton.next_power_of_2(counters))) if stretch
                  else BLOCK4)
        copy = theta if saved is None else saved[i]
        groups.setdefault((theta.dtype, theta.device, block4), []).append((theta, offset, decay,
                                                                           copy, counters))
    launches = []
    for (dtype, device, block4), group in groups.items():
        rows, programs = [], []
        for t, (theta, offset, decay, copy, counters) in enumerate(group):
            rows.append(_row(theta, offset, decay, copy))
            blocks = triton.cdiv(counters, block4)
            program = torch.empty(blocks, N_PROG_COLS.value, dtype=torch.int64)
            program[:, PROG_TENSOR.value] = t
            program[:, PROG_BLOCK.value] = torch.arange(blocks)
            programs.append(program)
        programs = torch.cat(programs).to(device=device, dtype=torch.int64).contiguous()
        launches.append((torch.tensor(rows, dtype=torch.int64, device=device), programs,
                         programs.shape[0], KINDS[dtype], block4))
    return launches


def launch_checked(kernel, launch, *args, **constexprs):
    types, own = LAUNCHED[kernel]
    if (set(constexprs) != set(own) or any(constexprs[k] not in own[k] for k in own)
            or len(args) != len(types)):
        # a launch outside LAUNCHED would be compiled for a GPU by no test
        raise ValueError(f"{kernel.__name__}: launch not in kernels.LAUNCHED: {constexprs}, "
                         f"{len(args)} arguments")
    tensors, programs, count, kind, block4 = launch
    kernel[(count,)](tensors, programs, *args, BLOCK4=block4, KIND=kind, HAND_ROUND=HAND_ROUND,
                     **constexprs)


def _runs(params):
    """(flat tensor, global offset of its element 0, decay, stretch) for each run: memory whose
    global indices are consecutive. Many small whole tensors (LoRA) are moved once into one buffer,
    in global-index order, each parameter becoming a view of it: then a run of them with the same
    weight-decay rule is one row of a launch's table (and one contiguous stretch of memory). Large
    tensors keep their own storage and row; tensor-parallel shards keep theirs (a shard's storage
    belongs to its DTensor) and give a row per stretch (see fast.stretches; `stretch` says the run
    is one)."""
    for p in params:
        if not p.tensor.is_contiguous() or p.tensor.dtype not in KINDS:
            raise ValueError(f"{p.name}: the Triton backend takes contiguous "
                             f"float32/bfloat16/float16 tensors (got {p.tensor.dtype}"
                             f"{'' if p.tensor.is_contiguous() else ', not contiguous'}); "
                             "use mezo.TorchBackend for others")
    whole = all(tuple(p.tensor.shape) == tuple(p.full_shape) for p in params)
    adjacent = all(q.offset == p.offset + p.tensor.numel() for p, q in zip(params, params[1:]))
    uniform = len({(p.tensor.dtype, p.tensor.device) for p in params}) == 1
    total = sum(p.tensor.numel() for p in params)
    # moving them costs a copy
    small = total <= COALESCE_MAX_NUMEL and total < (1 << 20) * max(1, len(params))
    if not (params and whole and adjacent and uniform and small):
        return [(p.tensor.data.view(-1)[start:start + n], offset, p.decay, n != p.tensor.numel())
                for p in params for start, n, offset in stretches(p)]
    flat = torch.cat([p.tensor.data.reshape(-1) for p in params])
    runs, start = [], 0
    for p in params:
        n = p.tensor.numel()
        # the Parameter stays; its storage moves
        p.tensor.data = flat[start:start + n].view(p.tensor.shape)
        if runs and runs[-1][2] == p.decay:
            runs[-1][0] += n
        else:
            runs.append([n, p.offset, p.decay])
        start += n
    out, start = [], 0
    for n, offset, decay in runs:
        out.append((flat[start:start + n], offset, decay, False))
        start += n
    return out


def _saved_buffers(runs):
    """Exact mode's copy of θ: one buffer per dtype and device, a slice of it per run."""
    sizes = {}
    for theta, *_ in runs:
        sizes[theta.dtype, theta.device] = sizes.get((theta.dtype, theta.device), 0) + theta.numel()
    buffers = {key: torch.empty(n, dtype=key[0], device=key[1]) for key, n in sizes.items()}
    used, saved = dict.fromkeys(sizes, 0), []
    for theta, *_ in runs:
        key = theta.dtype, theta.device
        saved.append(buffers[key][used[key]:used[key] + theta.numel()])
        used[key] += theta.numel()
    return saved


class TritonBackend:
    """The noise/update backend of mezo.py, in Triton, plus the fused restore-and-update that
    mezo_step uses when a backend offers it. Each pass is one kernel launch per dtype, over every
    trainable tensor (under tensor parallelism, one more per length of a shard's row).

    exact=True is mezo.ExactRestore's drift-free mode (--fast --exact-restore), the same numbers in
    fewer passes: the copy of θ is written by the step's first perturbation, θ − εz is made from it,
    and the restore is fused with the update (and the next step's +εz', which also writes the next
    copy). A step then moves 10 bytes per bfloat16 value, not the 24 of
    ExactRestore(TritonBackend()): copy, +ε, copy back, −ε, copy back, update. The copy lives as
    long as the backend (ExactRestore frees it after each step): one copy of the trainable tensors
    either way."""

    name = "triton"

    def __init__(self, exact: bool = False):
        self.exact = exact
        # (params and where they live, runs, launches, saved copies)
        self._cache = (None, None, None, None)
        # exact mode: θ = saved + _scale·z for the current seed; None: θ is itself
        self._scale = None
        # (where θ and a rule's buffers are, their launches): rule_update's
        self._rule_cache = (None, None)

    def _layout(self, params):
        where = lambda: (id(params), tuple(p.tensor.data_ptr() for p in params))
        if self._cache[0] != where():  # new tensors, or storage moved since: lay out the runs again
            # may move the tensors into one buffer: key the cache by where they are now
            runs = _runs(params)
            saved = _saved_buffers(runs) if self.exact else None
            self._cache = (where(), runs, _launches(runs, saved), saved)
            self._scale = None
        return self._cache

    def runs(self, params):
        """(flat tensor, global offset, decay, stretch) for each run of tensors (see _runs)."""
        return self._layout(params)[1]

    def launches(self, params):
        return self._layout(params)[2]

    @torch.no_grad()
    def perturb(self, params, seed: int, scale: float) -> None:
        launches = self.launches(params)
        source = SOURCE_THETA
        if self.exact:
            # the calls of a step: +ε (keep θ), −2ε (θ − εz from the copy), +ε (θ is the copy)
            if self._scale is None:
                source, self._scale = SOURCE_KEEP, scale
            else:
                source, self._scale = SOURCE_SAVED, self._scale + scale
            if self._scale == 0.0:
                # θ ← its copy: a copy kernel, one launch for any number of runs
                source, self._scale = SOURCE_RESTORE, None
            scale = self._scale or 0.0
        for launch in launches:
            launch_checked(perturb_kernel, launch, seed, float(scale), SOURCE=source.value)

    @torch.no_grad()
    def update(self, params, seed: int, projected_grad: float, lr: float,
               weight_decay: float) -> None:
        for launch in self.launches(params):
            launch_checked(update_kernel, launch, seed, float(projected_grad), float(lr),
                           float(weight_decay))

    def _rule_buffers(self, rule, name: str, params, runs) -> list[torch.Tensor]:
        """The rule's buffer `name` as one flat tensor per run (see _runs), each tensor's own buffer
        (rule.buffers, what its checkpoint keeps) a view of it: LoRA's many tensors share a run, so
        their buffers must lie side by side as θ does. Buffers made elsewhere (a resumed run's) are
        copied in once."""
        out = []
        for theta, *_ in runs:
            lo, size = theta.data_ptr(), theta.element_size()
            inside = [p for p in params if lo <= p.tensor.data_ptr() < lo + theta.numel() * size]
            # the run is one tensor, or a stretch of one (a tp/ shard's row)
            if len(inside) == 1 or not inside:
                p = inside[0] if inside else next(p for p in params if p.tensor.data_ptr() <= lo <
                                                   p.tensor.data_ptr() + p.tensor.numel() * size)
                out.append(rule.piece(name, p, theta))
                continue
            where = [(p, (p.tensor.data_ptr() - lo) // size) for p in inside]
            keys = [f"{name}:{p.name}" for p in inside]
            first = rule.buffers.get(keys[0])
            if first is None or not all(k in rule.buffers
                                        and rule.buffers[k].data_ptr() == first.data_ptr() + 4 * at
                                        for k, (_, at) in zip(keys, where)):
                whole = torch.zeros(theta.numel(), dtype=torch.float32, device=theta.device)
                for k, (p, at) in zip(keys, where):
                    if k in rule.buffers:
                        whole[at:at + p.tensor.numel()].copy_(rule.buffers[k])
                    rule.buffers[k] = whole[at:at + p.tensor.numel()]
                first = rule.buffers[keys[0]]
            out.append(first.as_strided((theta.numel(),), (1,)))
        return out

    @torch.no_grad()
    def rule_update(self, rule, params, samples: list[dict], lr: float,
                    weight_decay: float) -> None:
        """rules.py's momentum or Adam step (rule.fused(): its constants) in one pass over θ and the
        buffers, z made in the kernel for every sample: no z in memory, one launch per dtype. θ is
        the step's θ (restored)."""
        adam, beta1, beta2, c1, c2, delta = rule.fused()
        runs = self.runs(params)  # refuses dtypes the kernels do not take, in one line
        names = rule.buffer_names
        firsts, seconds = (self._rule_buffers(rule, name, params, runs)
                           for name in (names[0], names[-1]))
        device = runs[0][0].device
        seeds = torch.tensor([s["seed"] for s in samples], dtype=torch.int64, device=device)
        coefs = torch.tensor([s["projected_grad"] / len(samples) for s in samples],
                             dtype=torch.float32, device=device)
        key = (self._cache[0], [b.data_ptr() for b in firsts + seconds])
        # the tables, as long as θ and the buffers stay where they are
        if self._rule_cache[0] != key:
            # the second buffers' table gives `second`: v's address for each row (its COL_SAVED)
            launches = zip(_launches(runs, firsts), _launches(runs, seconds))
            seconds_column = [(launch, other[0][:, COL_SAVED.value].contiguous())
                              for launch, other in launches]
            self._rule_cache = (key, seconds_column)
        for launch, second in self._rule_cache[1]:
            launch_checked(rule_kernel, launch, second, seeds, coefs, len(samples), float(lr),
                           float(weight_decay), beta1, beta2, c1, c2, delta, ADAM=adam)

    def settle(self, params) -> None:
        """Every pass is made when asked for: nothing to do (fast.Fused holds passes back)."""

    @torch.no_grad()
    def restore_and_update(self, params, seed: int, eps: float, projected_grad: float, lr: float,
                           weight_decay: float, next_seed: int | None = None) -> None:
        """perturb(+eps), update(...) and, given next_seed, perturb(+eps) with it, in one pass over
        θ: the same roundings as the three calls, a third (or half) of the traffic."""
        launches = self.launches(params)
        if self.exact and self._scale != -eps:  # mezo_step calls it after perturb(+ε), perturb(−2ε)
            raise RuntimeError("restore_and_update in exact mode expects θ − εz, "
                               f"not {self._scale}·z (ε = {eps})")
        for launch in launches:
            launch_checked(restore_update_kernel, launch, seed, float(eps), float(projected_grad),
                           float(lr), float(weight_decay), 0 if next_seed is None else next_seed,
                           NEXT=next_seed is not None, EXACT=self.exact)
        if self.exact:
            self._scale = None if next_seed is None else eps
