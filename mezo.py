"""
MeZO: fine-tuning a language model with forward passes only.

Malladi, Gao, Nichani, Damian, Lee, Chen, Arora, "Fine-Tuning Language Models with Just Forward
Passes", NeurIPS 2023 (arXiv:2305.17333), Algorithm 1 (and Algorithm 2 for n > 1 samples).

MeZO estimates the gradient along one random direction z ~ N(0, I) from two losses, L(θ + εz) and
L(θ − εz): projected_grad = (L+ − L−) / 2ε ≈ ∇L·z, then steps θ ← θ − lr·projected_grad·z. It never
stores z (it is regenerated from a seed) and never runs backward, so it trains with the memory of
inference.

The reference, top to bottom: the config, the noise, the trainable tensors, perturb and update, one
step, the step as a torch.optim.Optimizer (`MeZO`), the loop, the command line. Variants plug into
its seams and are tested against it: the noise/update backend (fast/), the update rule (rules.py),
the forward (cache/), the placement (tp/); only `variants()` picks them. The rest of a run lives in
modules beside this one (README: reading order).

    python mezo.py --task sst2 [--help]        # offline SmolLM2-135M, LoRA, 16-shot SST-2
"""
from __future__ import annotations

import functools
import math
import numbers
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# `mezo` is this module and the package of the files beside it: the rest of a run is `mezo.runs`,
# `mezo.tasks`, ... (never another project's `runs`; nothing of ours at the top level), next to
# this file in a checkout and, installed, in the folder mezo/ next to it (pyproject.toml).
_HERE = Path(__file__).resolve().parent
__path__ = [str(_HERE / "mezo")] if (_HERE / "mezo" / "runs.py").is_file() else [str(_HERE)]

from mezo.baseline import adam_optimizer, adam_update  # noqa: E402
from mezo.errors import NonFiniteLoss, UsageError, says_mistakes  # noqa: E402
from mezo.models import DTYPES  # noqa: E402
from mezo.options import finite, option  # noqa: E402

from mezo import checkpoints, models, options, prefix, runs, tasks  # noqa: E402

# -----------------------------------------------------------------------------
# Config: one dataclass; each option says what it does (--help shows it). Flags map 1:1 onto it.


@dataclass
class Config:
    # task and data
    task: str = option("sst2", tasks.describe(), choices=tasks.NAMES, parse=tasks.canonical)
    data_dir: str | None = option(
        None, "folder holding sst2/ and lm-bff/ (else $MEZO_DATA, a checkout's data, the cache)")
    k: int = option(
        16, "examples per class, sampled as LM-BFF does; 0 = the whole GLUE train set", min=0)
    data_seed: int = option(42, "split seed (paper: 13, 21, 42, 87, 100)", min=0, below=1 << 32)
    template: str | None = option(
        None, "{sentence} (or {sentence1}, {sentence2}) and {mask}; default: the task's")
    label_words: tuple[str, ...] | None = option(
        None, "one word per class, comma-separated, class 0 first; default: the task's")
    max_length: int = option(
        128, "tokens per example; a longer sentence is cut, the prompt never is", min=8)
    # model
    model: str = option("smollm2-135m", "a local folder, a hub name, or the offline smollm2-135m")
    dtype: str = option("float32", "dtype of the model's tensors", choices=tuple(DTYPES))
    device: str = option("auto", "cpu, cuda, cuda:1, ...; auto = cuda when there is one")
    micro_batch: int = option(
        8, "examples per forward: length-sorted pieces of a batch (less padding)", min=1)
    head: str = option(
        "prompt", "LM head on the label words, or a fresh linear head", choices=("prompt", "cls"))
    mode: str = option("lora", "LoRA, all of θ, a prefix, or the cls head",
                       choices=("lora", "full", "prefix", "head"))
    lora_r: int = option(8, "LoRA rank (paper: 8)", min=1)
    lora_alpha: float = option(16.0, "LoRA alpha; updates scale by alpha / r (paper: 16)", min=0)
    lora_targets: tuple[str, ...] | None = option(
        None, "linear layers to adapt (default query,value or q_proj,v_proj)")
    lora_dtype: str | None = option(
        None, "LoRA's dtype (default the model's)", choices=(None, *DTYPES))
    top_layers: int = option(0, "train only the top K transformer layers (0 = all)", min=0)
    num_prefix: int = option(
        5, "--mode prefix: virtual tokens on every attention layer (paper: 5)", min=1)
    # MeZO
    steps: int = option(400, "optimisation steps (the default run: ~15 min on 2 CPU cores)", min=0)
    batch_size: int = option(8, "examples per step (paper: 16 for OPT, 64 for RoBERTa)", min=1)
    lr: float = option(1e-3, "learning rate", min=0)
    eps: float = option(1e-3, "perturbation scale ε (paper: 1e-3)", above=0)
    weight_decay: float = option(0.0, "weight decay; never on biases and norm weights", min=0)
    n_samples: int = option(1, "directions z per step, averaged (the paper's Algorithm 2)", min=1)
    rule: str = option("sgd", "the update: sgd (MeZO's ZO-SGD), or one of mezo.rules (its doc)",
                       choices=("sgd", "momentum", "adam", "sign", "conservative"))
    beta: float = option(0.9, "--rule momentum's β, --rule adam's β1 (β2: 0.999)", min=0, below=1)
    objective: str = option(
        "ce", "cross-entropy over the label words, or 1 − accuracy", choices=("ce", "accuracy"))
    optimizer: str = option(
        "mezo", "or adam: the first-order baseline, backprop + AdamW", choices=("mezo", "adam"))
    fast: bool = option(False, "the fast backend, same numbers: compiled on CPUs, Triton on GPUs")
    exact_restore: bool = option(
        False, "keep a copy of θ during a step so ±ε never drifts (low-precision full)")
    cache: bool = option(False, "reuse frozen layers' states per example (pays with --top-layers)")
    cache_mb: int = option(
        1024, "--cache memory cap in MiB (least recently used examples go first)", min=1)
    seed: int = option(
        0, "run seed: LoRA init, batch order and every z derive from it", min=0, below=1 << 63)
    # evaluation, logging, checkpoints
    eval_every: int = option(100, "evaluate every N steps (0 = only at the start and end)", min=0)
    eval_max: int = option(
        200, "test rows evaluated in training, evenly spread (0 = all); the end uses all", min=0)
    eval_max_start: int = option(0, "test rows evaluated at step 0 (0 = all)", min=0)
    out: str | None = option(
        None, "folder for log.jsonl, run.json, checkpoint.safetensors, summary.json, adapter/")
    save_every: int = option(0, "checkpoint every N steps too (0: at evaluations, the end)", min=0)
    replay: str | None = option(
        None, "rebuild this run folder's tensors after --steps from its log alone, into --out")
    overwrite: bool = option(False, "let a fresh run or a replay replace the run already in --out")
    threads: int = option(0, "torch CPU threads (0 = torch's default)", min=0)
    # parallel (tp/): launch with `torchrun --nproc-per-node N mezo.py ...`
    tp: int = option(
        1, "tensor-parallel ranks: each holds a slice of every attention and MLP weight", min=1)
    dp: int = option(
        0, "data-parallel ranks: each runs a slice of the batch (0 = processes / tp)", min=0)
    dist_timeout: float = option(
        300.0, "seconds a collective waits for a silent rank before the job fails", above=0)

    def __post_init__(self):
        runs.check_config(self)

# -----------------------------------------------------------------------------
# The noise. z for element i of the run's trainable vector is a pure function of (seed, i):
# output i % 4 of Triton's tl.randn4x(seed, i // 4). So z is never stored, any shard or chunk makes
# its own slice, and a Triton kernel makes the same numbers. Philox4x32-10 gives four 32-bit words
# per counter; Box-Muller turns each pair of words into two normals.

MASK32 = 0xFFFFFFFF
PHILOX_ROUND_A, PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57  # multipliers
PHILOX_KEY_A, PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85  # key increments (golden ratio, sqrt(3) - 1)
# elements of z made at once on a CPU: a chunk's temporaries stay in its cache
NOISE_CHUNK = 1 << 16
# On a GPU, chunks of 65,536 leave it idle between a chunk's few hundred small launches; 2^24
# (about 1 GB of temporaries) keeps it busy. z depends only on the index: no number changes.
NOISE_CHUNK_CUDA = 1 << 24


def noise_chunk(device) -> int:
    """How many elements of z to make at once on `device`."""
    return NOISE_CHUNK_CUDA if torch.device(device).type == "cuda" else NOISE_CHUNK


def _mulhilo(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a·x, for a 32-bit constant a and uint32 values x held in int64. torch
    has no usable uint32 arithmetic on CPU, and a·x can reach 2^64, past int64; so split a into
    16-bit halves, each partial product stays below 2^48."""
    lo_part, hi_part = x * (a & 0xFFFF), x * (a >> 16)  # a·x = hi_part·2^16 + lo_part
    lo = (lo_part + ((hi_part & 0xFFFF) << 16)) & MASK32
    hi = (hi_part + (lo_part >> 16)) >> 16
    return hi, lo


def philox(seed: int, counter: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on counters (lo32(j), hi32(j), 0, 0) with key (lo32(seed), hi32(seed)): four
    uint32 words."""
    c0, c1 = counter & MASK32, counter >> 32
    c2 = c3 = torch.zeros_like(counter)
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(10):
        hi_b, lo_b = _mulhilo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + PHILOX_KEY_A) & MASK32, (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def uniform(word: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float: read the word as int32, fold negatives (x -> -x-1), scale
    into [0, 1)."""
    folded = torch.where(word >= 1 << 31, MASK32 - word, word)  # = -x-1 for the negative int32 x
    return folded.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def _f32(op, x: torch.Tensor) -> torch.Tensor:
    # op in float64, rounded once (the correctly rounded float32): torch's float32 sqrt/log/cos/sin
    # on CPU differ by an ulp between vector and scalar paths, so z would depend on its chunking.
    return op(x.double()).float()


def box_muller(u_a: torch.Tensor, u_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float32 normals from two uniforms, step by step as Triton's pair_uniform_to_normal."""
    u_a = torch.maximum(u_a, torch.tensor(1e-7, dtype=torch.float32))  # log(0) guard
    r = _f32(torch.sqrt, torch.tensor(-2.0, dtype=torch.float32) * _f32(torch.log, u_a))
    theta = torch.tensor(6.283185307179586, dtype=torch.float32) * u_b
    return r * _f32(torch.cos, theta), r * _f32(torch.sin, theta)


def randn4x(seed: int, counter: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Triton's tl.randn4x(seed, counter): four normals per counter."""
    u0, u1, u2, u3 = (uniform(w) for w in philox(seed, counter))
    return (*box_muller(u0, u1), *box_muller(u2, u3))


def noise(seed: int, index: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """z (float32) for each global index: output index % 4 of tl.randn4x(seed, index // 4). Made
    `chunk` elements at a time (default: noise_chunk of index's device), so memory stays flat
    whatever the size of index."""
    if not 0 <= seed < 1 << 63:
        raise ValueError(f"noise seed must be in [0, 2^63), got {seed}")
    index = torch.as_tensor(index).to(torch.int64).reshape(-1)
    chunk = chunk or noise_chunk(index.device)
    z = torch.empty(index.shape, dtype=torch.float32, device=index.device)
    for start in range(0, index.numel(), chunk):
        piece = index[start:start + chunk]
        z[start:start + piece.numel()] = _noise_chunk(seed, piece)
    return z


def _noise_chunk(seed: int, index: torch.Tensor) -> torch.Tensor:
    first, n = int(index[0]), index.numel()
    if int(index[-1]) - first == n - 1 and bool((index.diff() == 1).all()):
        # A contiguous run (the common case): one Philox call serves four consecutive elements.
        j0 = first >> 2
        counters = torch.arange(j0, ((first + n - 1) >> 2) + 1, device=index.device)
        z4 = torch.stack(randn4x(seed, counters), dim=1).reshape(-1)  # (4 * num counters,)
        return z4[first - 4 * j0:first - 4 * j0 + n]
    # Scattered indices (a tensor-parallel shard's rows): one call per element, output index % 4
    n0, n1, n2, n3 = randn4x(seed, index >> 2)
    lane = index & 3
    return torch.where(lane < 2, torch.where(lane == 0, n0, n1), torch.where(lane == 2, n2, n3))


def step_seed(run_seed: int, step: int, sample: int) -> int:
    """The seed of z for (step, sample): a splitmix64 hash, so every rank and a resumed run derive
    it alone."""
    x = run_seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + sample * 0x94D049BB133111EB
    x = (x + 1) & (2**64 - 1)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (x ^ (x >> 31)) >> 1  # 63 bits: a non-negative int64 for torch and Triton alike

# -----------------------------------------------------------------------------
# The trainable tensors, in one canonical order (the unsharded model's), each owning a contiguous
# range of global indices. LoRA is added in place: two parameters and a forward hook on each chosen
# nn.Linear; nothing is renamed.


@dataclass
class Trainable:
    name: str  # qualified name in the unsharded model
    tensor: torch.Tensor  # the parameter itself (or, under tensor parallelism, this rank's shard)
    offset: int  # global index of element 0 of the full tensor
    decay: bool  # weight decay applies: not to biases and norm weights (1-D tensors)
    full_shape: tuple[int, ...] = ()  # shape of the unsharded tensor
    # where this shard starts in the full tensor (all zeros: not sharded)
    shard_start: tuple[int, ...] = ()

    def global_index(self, start: int, end: int, step: int = 1) -> torch.Tensor:
        """Global indices of local flat elements range(start, end, step) (row-major in the full
        tensor)."""
        local = torch.arange(start, end, step, device=self.tensor.device)
        if tuple(self.tensor.shape) == self.full_shape:
            return self.offset + local
        # unravel in the shard's shape, shift, ravel in the full shape
        flat = torch.zeros_like(local)
        for dim, size in enumerate(self.tensor.shape):
            coord = (local // math.prod(self.tensor.shape[dim + 1:])) % size + self.shard_start[dim]
            flat += coord * math.prod(self.full_shape[dim + 1:])
        return self.offset + flat


def noise_chunks(params: list[Trainable], seed: int, chunk: int | None = None):
    """(trainable, flat piece of its tensor, its z), about `chunk` elements at a time (default:
    noise_chunk of the tensors' device). One call of noise() may span many small tensors (LoRA has
    hundreds), which keeps its fixed cost off each; z is a function of the index, so the grouping
    changes nothing. It is made on the first piece's device and moved to each piece's (a model
    spread over devices by device_map)."""
    pieces, size = [], 0
    for p in params:
        flat = p.tensor.data.view(-1)
        n = chunk or noise_chunk(flat.device)
        for start in range(0, flat.numel(), n):
            end = min(start + n, flat.numel())
            pieces.append((p, flat[start:end], p.global_index(start, end)))
            size += end - start
            if size >= n:
                yield from _with_noise(pieces, seed, n)
                pieces, size = [], 0
    yield from _with_noise(pieces, seed, chunk)


def _with_noise(pieces, seed: int, chunk: int | None):
    if pieces:
        z = noise(seed, torch.cat([i.to(pieces[0][2].device) for _, _, i in pieces]), chunk)
        sizes = [theta.numel() for _, theta, _ in pieces]
        for (p, theta, _), z_piece in zip(pieces, z.split(sizes)):
            yield p, theta, z_piece.to(theta.device)


def make_trainables(named_params) -> list[Trainable]:
    """Give each (name, parameter) its global offset: the running total of numel, in the given
    order."""
    params, offset = [], 0
    for name, p in named_params:
        if p.is_meta or not (p.is_contiguous() and p.is_floating_point()):  # via a flat view
            raise ValueError(f"{name}: MeZO trains contiguous floating-point tensors, got " + (
                "a meta tensor (no values: load the weights first)" if p.is_meta else
                f"{p.dtype}{'' if p.is_contiguous() else ', not contiguous'}"))
        whole = dict(full_shape=tuple(p.shape), shard_start=(0,) * p.dim())
        params.append(Trainable(name, p, offset, p.dim() >= 2, **whole))
        offset += p.numel()
    return params


def _lora_hook(module: nn.Linear, inputs, output):
    a, b = module.lora_A, module.lora_B
    x = inputs[0].to(a.dtype)  # (B, T, in); LoRA may be float32 over a low-precision model
    return output + ((x @ a.t() @ b.t()) * module.lora_scaling).to(output.dtype)  # (B, T, out)


def add_lora(model: nn.Module, names: list[str], r: int, alpha: float, seed: int,
             dtype=None) -> None:
    """Add lora_A (r, in) and lora_B (out, r) to each named nn.Linear; B = 0, so the model is
    unchanged. A is initialised as PEFT does (Kaiming-uniform), from a generator seeded by the run
    seed."""
    gen = torch.Generator().manual_seed(seed)
    for name in names:
        layer = model.get_submodule(name)
        like = dict(device=layer.weight.device, dtype=dtype or layer.weight.dtype)
        # kaiming_uniform_(a=sqrt(5)), written out to take a generator
        bound = 1 / math.sqrt(layer.in_features)
        a = (torch.rand(r, layer.in_features, generator=gen) * 2 - 1) * bound
        layer.lora_A = nn.Parameter(a.to(**like))
        layer.lora_B = nn.Parameter(torch.zeros(layer.out_features, r, **like))
        layer.lora_scaling = alpha / r
        layer.register_forward_hook(_lora_hook)


def select_trainables(model: nn.Module, cfg: Config) -> list[Trainable]:
    """Freeze everything, add LoRA or a prefix if asked, and return the trainable tensors in
    canonical order."""
    model.requires_grad_(False)
    # which layers: by name, within the top layers (models.py knows the architectures)
    if cfg.mode == "lora":
        names = models.lora_target_names(model, cfg.lora_targets, cfg.top_layers, cfg.lora_r)
        dtype = DTYPES.get(cfg.lora_dtype)
        add_lora(model, names, cfg.lora_r, cfg.lora_alpha, cfg.seed, dtype)
    # MeZO-prefix: virtual tokens' keys and values on every attention layer (prefix.py)
    elif cfg.mode == "prefix":
        prefix.add_prefix(model, cfg.num_prefix, cfg.seed)
    # what each mode trains, by the end of the tensors' names
    suffixes = {"lora": (".lora_A", ".lora_B"), "prefix": prefix.SUFFIXES}.get(cfg.mode, ())

    def trained(name: str) -> bool:
        # a fresh classification head is always trained
        if name.startswith("cls_head.") or name.endswith(suffixes):
            return True
        return cfg.mode == "full" and models.in_top_layers(name, model, cfg.top_layers)

    chosen = [(name, p) for name, p in model.named_parameters() if trained(name)]
    for _, p in chosen:
        p.requires_grad_(True)  # marks them; the algorithm itself never calls backward
    return make_trainables(chosen)

# -----------------------------------------------------------------------------
# The noise/update backend (seam 1): θ += scale·z in place, and the update. The reference walks
# the tensors in chunks, computes in float32 (float64 stays so) and rounds once into their dtype.


def in_compute_dtype(theta: torch.Tensor) -> torch.Tensor:
    # float32 math, float64 kept as it is
    return theta.to(torch.promote_types(theta.dtype, torch.float32))


class TorchBackend:
    @torch.no_grad()
    def perturb(self, params: list[Trainable], seed: int, scale: float) -> None:
        """θ ← θ + scale·z."""
        for _, theta, z in noise_chunks(params, seed):
            t = in_compute_dtype(theta)
            theta.copy_(t + scale * z.to(t.dtype))

    @torch.no_grad()
    def update(self, params: list[Trainable], seed: int, projected_grad: float, lr: float,
               weight_decay: float) -> None:
        """θ ← θ − lr·(projected_grad·z + weight_decay·θ); no weight decay on biases and norm
        weights."""
        for p, theta, z in noise_chunks(params, seed):
            wd = weight_decay if p.decay else 0.0
            t = in_compute_dtype(theta)
            theta.copy_(t - lr * (projected_grad * z.to(t.dtype) + wd * t))

    def settle(self, params: list[Trainable]) -> None:
        """Make θ exact before it is read (an evaluation, a checkpoint, the end): nothing to do
        here, every pass is done at once; a fused backend (fast.Fused) does its deferred ones."""

# -----------------------------------------------------------------------------
# One MeZO step (Algorithm 1; Algorithm 2 with n samples). loss_fn runs a forward on the step's
# batch and returns a float: the forward seam and the placement seam's loss reduction are inside.


@torch.no_grad()
def mezo_step(params: list[Trainable], loss_fn, seeds: list[int], eps: float, lr, weight_decay,
              backend=None, rule=None) -> list[dict]:
    """One step: a projected gradient per seed (n seeds: Algorithm 2), then the update rule (ZO-SGD
    unless rules.py's). lr and weight_decay: one value, or one per tensor (MeZO's param groups)."""
    backend, rule, samples = backend or TorchBackend(), rule or SGD(), []
    for seed in seeds:
        backend.perturb(params, seed, +eps)  # θ + εz
        at = eps  # where θ stands: a forward that raises (Ctrl-C, out of memory) steps back
        try:
            loss_plus = loss_fn()
            backend.perturb(params, seed, -2 * eps)  # θ − εz
            at = -eps
            loss_minus = loss_fn()
        except BaseException:
            backend.perturb(params, seed, -at)
            backend.settle(params)
            raise
        backend.perturb(params, seed, +eps)  # back to θ (up to rounding; see the tests)
        if not (math.isfinite(loss_plus) and math.isfinite(loss_minus)):
            raise NonFiniteLoss(f"loss_plus={loss_plus}, loss_minus={loss_minus}")
        projected_grad = (loss_plus - loss_minus) / (2 * eps)  # ≈ ∇L·z
        samples.append(dict(seed=seed, loss_plus=loss_plus, loss_minus=loss_minus,
                            projected_grad=projected_grad))
    rule.update(params, samples, rate_groups(params, lr, weight_decay), backend, loss_fn)
    return samples


def sgd_update(backend, samples: list[dict], groups) -> None:
    """ZO-SGD: θ ← θ − lr·(mean_k g_k·z_k + wd·θ), one update pass per sample."""
    for k, s in enumerate(samples):
        for group, group_lr, group_wd in groups:
            # Weight decay is applied once a step, with the first sample's pass.
            wd = group_wd if k == 0 else 0.0
            backend.update(group, s["seed"], s["projected_grad"] / len(samples), group_lr, wd)


class SGD:
    """MeZO's own rule, ZO-SGD: the default of mezo_step. rules.py's rules take the same call."""

    def update(self, params, samples, groups, backend, loss_fn) -> None:
        sgd_update(backend, samples, groups)


def rate_groups(params: list[Trainable], lr,
                weight_decay) -> list[tuple[list[Trainable], float, float]]:
    """(tensors, lr, weight decay) for runs of tensors that share them; one run keeps the list
    (fast/ keys on it)."""
    groups, n = [], len(params)
    lrs, wds = ([*v] if isinstance(v, (list, tuple)) else [v] * n for v in (lr, weight_decay))
    for p, rates in zip(params, zip(lrs, wds)):
        if groups and groups[-1][1:] == rates:
            groups[-1][0].append(p)
        else:
            groups.append(([p], *rates))
    return [(params, *groups[0][1:])] if len(groups) == 1 else groups


class ExactRestore:
    """Drift-free mode (--exact-restore): a copy of θ kept for the step, which each perturbation
    starts from: L± are taken at round(θ ± εz), the restore is the copy, bit-exact in any dtype (in
    place, ±ε loses ~3 % of |θ| in bfloat16 in 50 steps at lr 0: bench/drift.py), for one θ copy."""
    exact = True  # θ comes back bit for bit (TritonBackend(exact=True) says so too)

    def __init__(self, backend):
        self.backend, self.saved, self.scale = backend, None, 0.0

    @torch.no_grad()
    def perturb(self, params: list[Trainable], seed: int, scale: float) -> None:
        if self.saved is None:  # at θ: keep it
            self.saved = [p.tensor.detach().clone() for p in params]
        else:  # back to θ, exactly
            for p, theta in zip(params, self.saved):
                p.tensor.data.copy_(theta)
        self.scale += scale  # +ε, then −ε (= +ε − 2ε), then 0: all exact in floating point
        if self.scale != 0.0:
            self.backend.perturb(params, seed, self.scale)
        else:
            self.saved = None

    def update(self, *args) -> None:
        self.backend.update(*args)  # from θ, which the last perturb restored exactly

    def settle(self, params: list[Trainable]) -> None:
        self.backend.settle(params)

# -----------------------------------------------------------------------------
# MeZO as a torch.optim.Optimizer, for your own model and loop. The step is mezo_step itself, on the
# parameters in the order given (group after group), with seeds from (seed, step count).


def loss_value(loss, must: str = "MeZO.step's closure must return the loss") -> float:
    try:  # a closure's loss (or the Trainer's compute_loss's): a number or a one-element tensor,
        return float(loss if not isinstance(loss, (str, bytes)) else None)  # not text ("0.5")
    except (TypeError, ValueError, RuntimeError):  # None, a vector of losses, ...
        got = f"a tensor of shape {tuple(loss.shape)}" if torch.is_tensor(loss) else repr(loss)[:60]
        raise TypeError(f"{must}, a number or a one-element tensor (e.g. loss.mean()); it "
                        f"returned {got}") from None


class MeZO(torch.optim.Optimizer):
    """opt = MeZO(model.parameters(), lr=1e-3, eps=1e-3); loss = opt.step(lambda: loss_fn(model,
    batch)). params: parameters, (name, parameter) pairs, or groups with their own lr and
    weight_decay (lr schedulers work). step(closure) runs the closure (a forward: a number or a
    one-element tensor) twice per sample without autograd and returns the loss at θ, (L+ + L−)/2;
    `last` holds the step's record. Weight decay skips 1-D tensors. Parameters with
    requires_grad=False are skipped, as torch's optimizers skip those without a gradient.
    state_dict(): step count, seed, the rule's name and buffers. backend= takes fast/'s; rule=
    rules.py's (rules.make)."""

    def __init__(self, params, lr: float = 1e-3, eps: float = 1e-3, weight_decay: float = 0.0,
                 n_samples: int = 1, seed: int = 0, backend=None, rule=None):
        whole = all(isinstance(v, numbers.Integral) for v in (n_samples, seed))
        real = all(finite(v) for v in (lr, eps, weight_decay))  # (not inf or NaN either)
        valid = real and whole and lr >= 0 and eps > 0 and weight_decay >= 0 and n_samples >= 1
        if not (valid and 0 <= seed < 1 << 63):
            raise ValueError(f"MeZO needs finite lr >= 0, eps > 0, weight_decay >= 0, whole "
                             f"numbers n_samples >= 1 and 0 <= seed < 2^63; got {lr=}, {eps=}, "
                             f"{weight_decay=}, {n_samples=}, {seed=}")
        if not (rule is None or callable(getattr(rule, "update", None))):  # e.g. rule="adam"
            raise TypeError(f"MeZO's rule= takes mezo.rules.make(name) or None; got {rule!r}")
        self.eps, self.n_samples, self.seed = eps, int(n_samples), int(seed)
        self.steps, self.last = 0, None
        self.backend, self.rule = backend or TorchBackend(), rule
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    def add_param_group(self, group: dict) -> None:
        """torch's, and: unnamed parameters are named group.index, and the trainables (mezo_step's
        global indices, in group order) are laid out again. Names are kept here, so any torch takes
        (name, tensor)."""
        others = sorted(set(group) - {"params", "lr", "weight_decay"})
        if others:
            raise ValueError(f"MeZO param group {len(self.param_groups)}: only lr and weight_decay "
                             f"can differ between groups, not {others}")
        rates = {key: group.get(key, self.defaults[key]) for key in ("lr", "weight_decay")}
        if not all(finite(v) and v >= 0 for v in rates.values()):  # as the constructor
            raise ValueError(f"MeZO param group {len(self.param_groups)} needs finite lr >= 0 and "
                             f"weight_decay >= 0; got lr={rates['lr']}, "
                             f"weight_decay={rates['weight_decay']}")
        tensors = [group["params"]] if torch.is_tensor(group["params"]) else group["params"]
        # (name, parameter) pairs; a bare parameter is named by its group and place
        named = [p if isinstance(p, tuple) else (f"{len(self.param_groups)}.{j}", p)
                 for j, p in enumerate(tensors)]
        group = dict(group, params=[p for _, p in named], param_names=[n for n, _ in named])
        super().add_param_group(group)
        self.frozen = None  # lay the trainables out again
        self.layout()

    def layout(self) -> list[Trainable]:
        """The trainables: the parameters that require grad, in group order (laid out again when
        that changes)."""
        frozen = tuple(not p.requires_grad for g in self.param_groups for p in g["params"])
        if frozen != self.frozen:
            self.frozen = frozen
            named = [x for g in self.param_groups for x in zip(g["param_names"], g["params"])]
            self.trainables = make_trainables([(name, p) for name, p in named if p.requires_grad])
        return self.trainables

    @torch.no_grad()
    def step(self, closure=None) -> float:
        params = self.layout()  # the trainables, and their rates tensor by tensor:
        if closure is None or not params:  # (frozen ones are skipped, as torch's optimizers do)
            raise ValueError("MeZO.step needs a closure that runs a forward and returns the loss"
                             if params else "none of MeZO's parameters requires grad: nothing to "
                             "train (set requires_grad=True on those to train)")
        lrs = [g["lr"] for g in self.param_groups for p in g["params"] if p.requires_grad]
        wds = [g["weight_decay"] for g in self.param_groups for p in g["params"] if p.requires_grad]
        seeds = [step_seed(self.seed, self.steps + 1, k) for k in range(self.n_samples)]
        try:
            samples = mezo_step(params, lambda: loss_value(closure()), seeds, self.eps, lrs, wds,
                                self.backend, rule=self.rule)
        except NonFiniteLoss as e:
            near = "" if getattr(self.backend, "exact", False) else ", up to θ ± εz's rounding"
            raise NonFiniteLoss(f"non-finite loss at step {self.steps + 1} ({e}); θ is as step "
                                f"{self.steps} left it{near}. Lower lr or eps") from None
        self.steps += 1
        self.last = dict(step=self.steps, **runs.step_record(samples, self.param_groups[0]["lr"]))
        return self.last["loss"]

    def rule_name(self) -> str:
        return type(self.rule).__name__.lower() if self.rule else "sgd"

    def state_dict(self) -> dict:
        rule = self.rule.state(self.layout()) if self.rule else {}
        return super().state_dict() | dict(mezo=dict(steps=self.steps, seed=self.seed, rule=rule,
                                                     rule_name=self.rule_name()))

    def load_state_dict(self, state_dict: dict) -> None:
        if "mezo" not in state_dict:
            raise ValueError("not a MeZO state_dict: it has no 'mezo' entry (step count and seed)")
        # Before anything is loaded: a rule's buffers mean nothing to another rule. (A state_dict
        # older than rule_name has none; then the rule's own load checks its buffers.)
        saved, rule = state_dict["mezo"].get("rule_name", self.rule_name()), self.rule_name()
        if saved != rule:
            make = "rule=None" if saved == "sgd" else f"rule=rules.make({saved!r})"
            raise ValueError(f"the state_dict was saved with another --rule ({saved}), and this "
                             f"MeZO's rule is {rule}: make the MeZO with the rule it was saved "
                             f"with ({make})")
        if self.rule:  # first: buffers of other shapes are refused before anything is loaded
            self.rule.load(state_dict["mezo"].get("rule", {}), self.layout())
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "mezo"})
        self.steps, self.seed = state_dict["mezo"]["steps"], state_dict["mezo"]["seed"]

# -----------------------------------------------------------------------------
# The forward (seam 2): a batch becomes label-word logits, read by the model's own LM head at one
# position (the <mask>, or a causal LM's last token), which keeps the vocabulary projection off
# every other token.


class PromptForward:
    """(batch) -> label-word logits (B, C). The body runs once, the head only where read: each row's
    position, or every token of several-token words, whose log-probabilities sum to the class's
    score (MeZO's OPT code). A forward may also offer prepare(token id lists) and stats() (cache/
    does)."""

    def __init__(self, model: nn.Module, label_ids: list[int],
                 params: list[Trainable] | None = None):
        self.model, self.label_ids = model, torch.tensor(label_ids)
        self.body = model.base_model
        heads = [m for m in model.children() if m is not self.body]
        self.lm_head = heads[0] if len(heads) == 1 else None  # lm_head (Llama, RoBERTa), cls (BERT)

    def __call__(self, batch: dict) -> torch.Tensor:
        out = self.body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return self.head(out.last_hidden_state, batch)  # (B, T, H) -> (B, C)

    def head(self, hidden: torch.Tensor, batch: dict) -> torch.Tensor:
        # several-token words: a row per (example, class)
        rows = batch.get("row", torch.arange(hidden.size(0)))
        h = hidden[rows, batch["position"]]  # (N, H) at the mask / last token / each word token
        if hasattr(self.model, "cls_head"):
            return in_compute_dtype(self.model.cls_head(h))  # (B, C)
        if "target" not in batch:  # (B, V) -> (B, C)
            return in_compute_dtype(self.lm_head(h)[:, self.label_ids.to(h.device)])
        logp = in_compute_dtype(self.lm_head(h)).log_softmax(-1)  # (N, V)
        logp = logp.gather(1, batch["target"][:, None])[:, 0]  # (N,)
        summed = logp.new_zeros(hidden.size(0)).index_add_(0, rows, logp)
        return summed.view(len(batch["labels"]), -1)  # (B, C)


def objective_loss(logits: torch.Tensor, labels: torch.Tensor, objective: str) -> float:
    if objective == "accuracy":  # non-differentiable: MeZO only needs its value
        return 1.0 - (logits.argmax(-1) == labels).float().mean().item()
    return F.cross_entropy(logits, labels).item()  # softmax over the label words only, as LM-BFF

# -----------------------------------------------------------------------------
# Placement (seam 3): where the model's tensors live, which examples this process runs, how a loss
# is reduced, who writes, and whether any process was asked to stop. One process: everything here,
# nothing to reduce. tp/ replaces it under torchrun.


class Placement:
    is_main = True  # this process prints, logs, evaluates into the log and writes checkpoints
    dp = 1  # data-parallel ranks that split a step's batch

    def __init__(self, device: torch.device | None = None):
        self.device = device  # None: --device decides

    def shard(self, model: nn.Module, params: list[Trainable]) -> list[Trainable]:
        return params  # the model stays whole

    def local(self, examples: list[dict]) -> list[dict]:
        return examples  # this process runs every example

    def mean(self, value: float, n: int) -> float:
        return value  # a mean over this process's n examples is the mean over all of them

    def gather(self, params: list[Trainable]) -> list[Trainable]:
        return params  # full tensors, as checkpoints hold them

    def any_rank(self, flag: bool) -> bool:
        return flag  # (a signal's stop: every rank stops after the same step)

    def close(self) -> None:
        pass

# -----------------------------------------------------------------------------
# The training loop: batch → step → log → evaluate/save. runs.Run keeps the bookkeeping (data,
# model, evaluation, checkpoints, timing); what happens to θ is all here.


def train(cfg: Config, resume: str | None = None, *, backend=None, forward=None,
          placement: Placement | None = None, rule=None) -> dict:
    """Train as the command line does and return the run's summary. A seam not given is the one
    the config asks for (variants: --rule, --fast, --cache, and --tp/--dp under torchrun)."""
    if not isinstance(cfg, Config):  # e.g. a dict of settings
        raise TypeError(f"train takes a mezo.Config, not {type(cfg).__name__}: mezo.Config(...)")
    seams = variants(cfg, backend=backend, forward=forward, placement=placement, rule=rule)
    placement, backend, forward, rule = map(seams.get, ("placement", "backend", "forward", "rule"))
    # the task's data, the model and the prompt (runs.py); the tensors to train, this process's
    loaded = runs.load(cfg, placement, resume)
    params = placement.shard(loaded.model, select_trainables(loaded.model, cfg))

    # MeZO's step: the step's seeds (one per sample), then Algorithm 1; the log keeps its numbers
    def mezo_update(step: int, loss) -> dict:
        seeds = [step_seed(cfg.seed, step, k) for k in range(cfg.n_samples)]
        samples = mezo_step(params, loss, seeds, cfg.eps, cfg.lr, cfg.weight_decay, backend, rule)
        return runs.step_record(samples, cfg.lr)

    # --optimizer adam: the first-order baseline (baseline.py), on the same tensors and batches
    adam, update = None, mezo_update
    if cfg.optimizer == "adam":
        adam = adam_optimizer([(p.tensor, p.decay) for p in params], cfg.lr, cfg.weight_decay)
        update = adam_update(adam, cfg.lr)
    forward = forward(loaded.model, loaded.label_ids, params)
    # --out is this run's alone till the end
    with runs.Run(cfg, placement, loaded, params, forward, objective_loss, adam, rule) as run:
        for step in run.steps(resume):
            # the step's loss at θ: a forward on the step's batch (a --replay serves the logged L±)
            loss_fn = run.loss_fn(step)
            # a non-finite loss stops the run (main keeps the last good step)
            with run.timed_step(step):
                record = update(step, loss_fn)
            # θ itself is read next (evaluation, checkpoint): no pass may stay deferred
            if run.saves_at(step):
                backend.settle(params)
            # log.jsonl, the progress bar; evaluate and checkpoint when due
            run.record(step, record)
        return run.finish()

# -----------------------------------------------------------------------------
# Command line: flags map 1:1 onto Config; `variants` picks the seams (the one place importing
# fast/, cache/, tp/). With --resume, the flags given change the checkpoint's config (--steps too).


def parse_args(argv=None) -> tuple[Config, str | None]:
    p = options.parser(Config, "mezo", __doc__.split("\n\n")[0].strip())
    p.add_argument("--resume", default=None, help="go on with this folder's run (--out: a branch)")
    args = vars(p.parse_args(argv))
    resume = runs.user_path(args.pop("resume"))
    if resume and args.get("replay"):  # (a replay from a checkpoint is runs.keep_last_good's)
        raise UsageError("--resume goes on with a run and --replay rebuilds one: drop one of them")
    if resume or args.get("replay"):
        flag = "--resume" if resume else "--replay"
        # the run's config, not its world size (one this version lacks a setting of: refused)
        saved = checkpoints.saved_config(Path(resume or runs.user_path(args["replay"])), flag,
                                         known=Config.__dataclass_fields__)
        args = {**saved, "out": resume, **args}
    return Config(**args), resume


def variants(cfg: Config, **given) -> dict:
    """The seams a config asks for, as train's keyword arguments: backend, forward and placement
    (with the device: --device auto is decided here, once); those given (not None) are kept."""
    given = {name: seam for name, seam in given.items() if seam is not None}
    backend = TorchBackend()
    if cfg.exact_restore:
        backend = ExactRestore(backend)
    device = models.resolve_device(cfg.device)
    seams = dict(backend=backend, forward=PromptForward, placement=Placement(torch.device(device)))
    if cfg.fast and "backend" not in given:  # compiled on CPUs, Triton on GPUs (fast/__init__.py)
        from mezo.fast import choose
        # ZO-SGD's restore, update and next ±εz in one pass (fast.Fused); a rule reads θ between
        seams["backend"] = choose(device, cfg.exact_restore, fuse=cfg.rule == "sgd")
    if cfg.rule != "sgd":  # momentum, Adam, sign, conservative (rules.py)
        from mezo.rules import make
        seams["rule"] = make(cfg.rule, cfg.beta)
    if cfg.cache:
        from mezo.cache import CachedForward
        seams["forward"] = functools.partial(CachedForward, max_bytes=cfg.cache_mb << 20)
    if runs.distributed(cfg) and "placement" not in given:  # (it starts the process group)
        from mezo.tp import DistributedPlacement
        seams["placement"] = DistributedPlacement(cfg)
    return seams | given


def main(argv=None) -> int:
    seams, cfg, trained = {}, None, False
    try:
        cfg, resume = parse_args(argv)
        seams = variants(cfg)
        train(cfg, resume, **seams)
        trained = True
        sys.stdout.flush()  # a closed stdout shows here, not at exit
    # the last good step's exact tensors are kept (rebuilt by a replay of the log)
    except NonFiniteLoss as e:
        e.__traceback__ = None  # (the failed run's model goes before the replay's comes)
        line = runs.keep_last_good(e, cfg, lambda c, r: train(c, r, **variants(c)))
        print(f"mezo: error: {line}", file=sys.stderr)
        return 1
    except UsageError as e:
        if says_mistakes():  # (under torchrun, once a machine)
            print(f"mezo: error: {e}", file=sys.stderr)
        return 2
    except (BrokenPipeError, KeyboardInterrupt) as e:  # `... | head`'s reader left; Ctrl-C; SIGTERM
        print(f"mezo: error: {runs.stopped(cfg, trained, e)}", file=sys.stderr)
        return 1 if isinstance(e, BrokenPipeError) else getattr(e, "code", 130)  # 128 + signal
    except RuntimeError as e:
        # Under torchrun, a collective that failed because another rank died or hung: tp/ knows them
        line = getattr(seams.get("placement"), "peer_failure", lambda e: None)(e)
        if line is None:
            raise
        print(f"mezo: error: {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Run as a script, this file is `__main__`, and its imports above loaded it once more as the
    # package `mezo`, which the variants import. Run that copy: one copy of every class is in play.
    import mezo
    sys.exit(mezo.main())
