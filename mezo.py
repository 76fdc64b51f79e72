"""
MeZO: fine-tuning a language model with forward passes only.

Malladi, Gao, Nichani, Damian, Lee, Chen, Arora, "Fine-Tuning Language Models with Just Forward
Passes", NeurIPS 2023 (arXiv:2305.17333), Algorithm 1 (and Algorithm 2 for n > 1 samples).

MeZO estimates the gradient along one random direction z ~ N(0, I) from two losses, L(θ + εz) and
L(θ − εz): projected_grad = (L+ − L−) / 2ε ≈ ∇L·z, then steps θ ← θ − lr·projected_grad·z. It never stores
z (it is regenerated from a seed) and never runs backward, so it trains with the memory of inference.

The reference, top to bottom: the config, the noise, the trainable tensors, perturb and update, one step, the
step as a torch.optim.Optimizer (`MeZO`), the loop, the command line. Variants plug into its seams and are tested
against it: the noise/update backend (fast/), the update rule (rules.py), the forward (cache/), the placement
(tp/); only `variants()` picks them. The rest of a run lives in modules beside this one (README: reading order).

    python mezo.py --task sst2 [--help]        # offline SmolLM2-135M, LoRA, 16-shot SST-2
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from mezo.baseline import adam_step
from mezo.errors import NonFiniteLoss, UsageError
from mezo.models import DTYPES
from mezo.options import option

from mezo import checkpoints, models, options, prefix, runs, tasks

# -----------------------------------------------------------------------------
# Config: one dataclass; each option says what it does (--help shows it). Flags map 1:1 onto it.


@dataclass
class Config:
    # task and data
    task: str = option("sst2", tasks.describe(), choices=tasks.NAMES, parse=tasks.canonical)
    data_dir: str | None = option(None, "folder holding sst2/ and lm-bff/ (else $MEZO_DATA, ../shared/data, the cache)")
    k: int = option(16, "training examples per class, sampled as LM-BFF does; 0 = the whole GLUE train set", min=0)
    data_seed: int = option(42, "LM-BFF split seed (the paper: 13, 21, 42, 87, 100)", min=0)
    template: str | None = option(None, "{sentence} (or {sentence1}, {sentence2}) and {mask}; default: the task's")
    label_words: tuple[str, ...] | None = option(None, "one word per class, class 0 first; default: the task's")
    max_length: int = option(128, "tokens per example; a longer sentence is cut, the prompt never is", min=8)
    # model
    model: str = option("smollm2-135m", "a local folder, a hub name, or the offline alias smollm2-135m")
    dtype: str = option("float32", "dtype of the model's tensors", choices=tuple(DTYPES))
    device: str = option("auto", "cpu, cuda, cuda:1, ...; auto = cuda when there is one")
    micro_batch: int = option(8, "examples per forward: length-sorted pieces of a batch (less padding)", min=1)
    head: str = option("prompt", "LM head on the label words, or a fresh linear head", choices=("prompt", "cls"))
    mode: str = option("lora", "LoRA, all of θ, a prefix, or the cls head", choices=("lora", "full", "prefix", "head"))
    lora_r: int = option(8, "LoRA rank (paper: 8)", min=1)
    lora_alpha: float = option(16.0, "LoRA alpha; the update is scaled by alpha / r (paper: 16)", min=0)
    lora_targets: tuple[str, ...] | None = option(None, "linear layers to adapt (default query,value or q_proj,v_proj)")
    lora_dtype: str | None = option(None, "LoRA's dtype (default the model's)", choices=(None, *DTYPES))
    top_layers: int = option(0, "train only the top K transformer layers (0 = all)", min=0)
    num_prefix: int = option(5, "--mode prefix: virtual tokens on every attention layer (paper: 5)", min=1)
    # MeZO
    steps: int = option(400, "optimisation steps (the default run takes about 15 minutes on 2 CPU cores)", min=0)
    batch_size: int = option(8, "examples per step (paper: 16 for OPT, 64 for RoBERTa)", min=1)
    lr: float = option(1e-3, "learning rate", min=0)
    eps: float = option(1e-3, "perturbation scale ε (paper: 1e-3)", above=0)
    weight_decay: float = option(0.0, "weight decay; never on biases and norm weights", min=0)
    n_samples: int = option(1, "directions z per step, averaged (the paper's Algorithm 2)", min=1)
    rule: str = option("sgd", "ZO-SGD or rules.py's", choices=("sgd", "momentum", "adam", "sign", "conservative"))
    beta: float = option(0.9, "--rule momentum's β, --rule adam's β1 (its β2 is 0.999)", min=0)
    objective: str = option("ce", "cross-entropy over the label words, or 1 − accuracy", choices=("ce", "accuracy"))
    optimizer: str = option("mezo", "or adam: the first-order baseline, backprop + AdamW", choices=("mezo", "adam"))
    fast: bool = option(False, "fast/'s backend, same numbers: compiled on CPUs, Triton kernels on GPUs")
    exact_restore: bool = option(False, "keep a copy of θ during a step so ±ε never drifts (low-precision full)")
    cache: bool = option(False, "cache/: reuse the frozen layers' states per example (pays with --top-layers)")
    cache_mb: int = option(1024, "--cache memory cap in MiB (least recently used examples go first)", min=1)
    seed: int = option(0, "run seed: LoRA init, batch order and every z derive from it", min=0)
    # evaluation, logging, checkpoints
    eval_every: int = option(100, "evaluate every N steps (0 = only at the start and the end)", min=0)
    eval_max: int = option(200, "test rows evaluated during training (0 = all); the start and the end use all", min=0)
    eval_max_start: int = option(0, "test rows evaluated at step 0 (0 = all)", min=0)
    out: str | None = option(None, "folder for log.jsonl, checkpoint.safetensors, summary.json and the adapter")
    save_every: int = option(0, "also checkpoint every N steps (0 = at each evaluation and at the end)", min=0)
    replay: str | None = option(None, "rebuild this run folder's tensors after --steps from its log alone, into --out")
    threads: int = option(0, "torch CPU threads (0 = torch's default)", min=0)
    # parallel (tp/): launch with `torchrun --nproc-per-node N mezo.py ...`
    tp: int = option(1, "tensor-parallel ranks: each holds a slice of every attention and MLP weight", min=1)
    dp: int = option(0, "data-parallel ranks: each runs a slice of the batch (0 = processes / tp)", min=0)
    dist_timeout: float = option(300.0, "seconds a collective waits for a silent rank before the job fails", above=0)

# -----------------------------------------------------------------------------
# The noise. z for element i of the run's trainable vector is a pure function of (seed, i): output i % 4 of
# Triton's tl.randn4x(seed, i // 4). So z is never stored, any shard or chunk makes its own slice, and a Triton
# kernel makes the same numbers. Philox4x32-10 gives four 32-bit words per counter; Box-Muller turns each pair
# of words into two normals.

MASK32 = 0xFFFFFFFF
PHILOX_ROUND_A, PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57  # multipliers
PHILOX_KEY_A, PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85  # key increments (golden ratio, sqrt(3) - 1)
NOISE_CHUNK = 1 << 16  # elements of z made at once: large calls are dominated by temporaries


def _mulhilo(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a·x, for a 32-bit constant a and uint32 values x held in int64.
    torch has no usable uint32 arithmetic on CPU, and a·x can reach 2^64, past int64; so split a into
    16-bit halves, each partial product stays below 2^48."""
    lo_part, hi_part = x * (a & 0xFFFF), x * (a >> 16)  # a·x = hi_part·2^16 + lo_part
    lo = (lo_part + ((hi_part & 0xFFFF) << 16)) & MASK32
    hi = (hi_part + (lo_part >> 16)) >> 16
    return hi, lo


def philox(seed: int, counter: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on counters (lo32(j), hi32(j), 0, 0) with key (lo32(seed), hi32(seed)): four uint32 words."""
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
    """Triton's uint_to_uniform_float: read the word as int32, fold negatives (x -> -x-1), scale into [0, 1)."""
    folded = torch.where(word >= 1 << 31, MASK32 - word, word)  # = -x-1 for the negative int32 x
    return folded.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def _f32(op, x: torch.Tensor) -> torch.Tensor:
    # op in float64, rounded once: the correctly rounded float32 result. torch's float32 sqrt/log/cos/sin on CPU
    # differ by an ulp between vector and scalar paths, so z would depend on where an element falls in a chunk.
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
    n0, n1 = box_muller(u0, u1)
    n2, n3 = box_muller(u2, u3)
    return n0, n1, n2, n3


def noise(seed: int, index: torch.Tensor) -> torch.Tensor:
    """z (float32) for each global index: output index % 4 of tl.randn4x(seed, index // 4).
    Made NOISE_CHUNK elements at a time, so memory stays flat whatever the size of index."""
    if not 0 <= seed < 1 << 63:
        raise ValueError(f"noise seed must be in [0, 2^63), got {seed}")
    index = torch.as_tensor(index).to(torch.int64).reshape(-1)
    z = torch.empty(index.shape, dtype=torch.float32, device=index.device)
    for start in range(0, index.numel(), NOISE_CHUNK):
        chunk = index[start:start + NOISE_CHUNK]
        z[start:start + chunk.numel()] = _noise_chunk(seed, chunk)
    return z


def _noise_chunk(seed: int, index: torch.Tensor) -> torch.Tensor:
    first, n = int(index[0]), index.numel()
    if int(index[-1]) - first == n - 1 and bool((index.diff() == 1).all()):
        # A contiguous run (the common case): one Philox call serves four consecutive elements.
        j0 = first >> 2
        counters = torch.arange(j0, ((first + n - 1) >> 2) + 1, device=index.device)
        z4 = torch.stack(randn4x(seed, counters), dim=1).reshape(-1)  # (4 * num counters,)
        return z4[first - 4 * j0:first - 4 * j0 + n]
    # Scattered indices (a tensor-parallel shard's rows): one call per element, keep output index % 4.
    n0, n1, n2, n3 = randn4x(seed, index >> 2)
    lane = index & 3
    return torch.where(lane < 2, torch.where(lane == 0, n0, n1), torch.where(lane == 2, n2, n3))


def step_seed(run_seed: int, step: int, sample: int) -> int:
    """The seed of z for (step, sample): a splitmix64 hash, so every rank and a resumed run derive it alone."""
    x = (run_seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + sample * 0x94D049BB133111EB + 1) & (2**64 - 1)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (x ^ (x >> 31)) >> 1  # 63 bits: a non-negative int64 for torch and Triton alike

# -----------------------------------------------------------------------------
# The trainable tensors, in one canonical order (the unsharded model's), each owning a contiguous range of global
# indices. LoRA is added in place: two parameters and a forward hook on each chosen nn.Linear; nothing is renamed.


@dataclass
class Trainable:
    name: str  # qualified name in the unsharded model
    tensor: torch.Tensor  # the parameter itself (or, under tensor parallelism, this rank's shard)
    offset: int  # global index of element 0 of the full tensor
    decay: bool  # weight decay applies: not to biases and norm weights (1-D tensors)
    full_shape: tuple[int, ...] = ()  # shape of the unsharded tensor
    shard_start: tuple[int, ...] = ()  # where this shard starts in the full tensor (all zeros: not sharded)

    def global_index(self, start: int, end: int, step: int = 1) -> torch.Tensor:
        """Global indices of local flat elements range(start, end, step) (row-major in the full tensor)."""
        local = torch.arange(start, end, step, device=self.tensor.device)
        if tuple(self.tensor.shape) == self.full_shape:
            return self.offset + local
        flat = torch.zeros_like(local)  # unravel in the shard's shape, shift, ravel in the full shape
        for dim, size in enumerate(self.tensor.shape):
            coord = (local // math.prod(self.tensor.shape[dim + 1:])) % size + self.shard_start[dim]
            flat += coord * math.prod(self.full_shape[dim + 1:])
        return self.offset + flat


def noise_chunks(params: list[Trainable], seed: int):
    """(trainable, flat piece of its tensor, its z), about NOISE_CHUNK elements at a time. One call of noise()
    may span many small tensors (LoRA has hundreds), which keeps its fixed cost off each; z is a function of
    the index, so the grouping changes nothing."""
    pieces, size = [], 0
    for p in params:
        flat = p.tensor.data.view(-1)
        for start in range(0, flat.numel(), NOISE_CHUNK):
            end = min(start + NOISE_CHUNK, flat.numel())
            pieces.append((p, flat[start:end], p.global_index(start, end)))
            size += end - start
            if size >= NOISE_CHUNK:
                yield from _with_noise(pieces, seed)
                pieces, size = [], 0
    yield from _with_noise(pieces, seed)


def _with_noise(pieces, seed: int):
    if pieces:
        z = noise(seed, torch.cat([index for _, _, index in pieces]))
        for (p, theta, _), z_piece in zip(pieces, z.split([theta.numel() for _, theta, _ in pieces])):
            yield p, theta, z_piece


def make_trainables(named_params) -> list[Trainable]:
    """Give each (name, parameter) its global offset: the running total of numel, in the given order."""
    params, offset = [], 0
    for name, p in named_params:
        params.append(Trainable(name, p, offset, p.dim() >= 2, full_shape=tuple(p.shape), shard_start=(0,) * p.dim()))
        offset += p.numel()
    return params


def _lora_hook(module: nn.Linear, inputs, output):
    a, b = module.lora_A, module.lora_B
    x = inputs[0].to(a.dtype)  # (B, T, in); LoRA may be float32 over a low-precision model
    return output + ((x @ a.t() @ b.t()) * module.lora_scaling).to(output.dtype)  # (B, T, out)


def add_lora(model: nn.Module, names: list[str], r: int, alpha: float, seed: int, dtype=None) -> None:
    """Add lora_A (r, in) and lora_B (out, r) to each named nn.Linear; B = 0, so the model is unchanged.
    A is initialised as PEFT does (Kaiming-uniform), from a generator seeded by the run seed."""
    gen = torch.Generator().manual_seed(seed)
    for name in names:
        layer = model.get_submodule(name)
        w, dtype_ = layer.weight, dtype or layer.weight.dtype
        bound = 1 / math.sqrt(layer.in_features)  # kaiming_uniform_(a=sqrt(5)), written out to take a generator
        a = (torch.rand(r, layer.in_features, generator=gen) * 2 - 1) * bound
        layer.lora_A = nn.Parameter(a.to(w.device, dtype_))
        layer.lora_B = nn.Parameter(torch.zeros(layer.out_features, r, device=w.device, dtype=dtype_))
        layer.lora_scaling = alpha / r
        layer.register_forward_hook(_lora_hook)


def select_trainables(model: nn.Module, cfg: Config) -> list[Trainable]:
    """Freeze everything, add LoRA or a prefix if asked, and return the trainable tensors in canonical order."""
    model.requires_grad_(False)
    if cfg.mode == "lora":  # which layers: by name, within the top layers (models.py knows the architectures)
        names = models.lora_target_names(model, cfg.lora_targets, cfg.top_layers)
        add_lora(model, names, cfg.lora_r, cfg.lora_alpha, cfg.seed, DTYPES[cfg.lora_dtype] if cfg.lora_dtype else None)
    elif cfg.mode == "prefix":  # MeZO-prefix: virtual tokens' keys and values on every attention layer (prefix.py)
        prefix.add_prefix(model, cfg.num_prefix, cfg.seed)
    chosen = [(name, p) for name, p in model.named_parameters()
              if name.startswith("cls_head.")  # a fresh classification head is always trained
              or name.endswith({"lora": (".lora_A", ".lora_B"), "prefix": prefix.SUFFIXES}.get(cfg.mode, ()))
              or (cfg.mode == "full" and models.in_top_layers(name, model, cfg.top_layers))]
    for _, p in chosen:
        p.requires_grad_(True)  # marks them; the algorithm itself never calls backward
    return make_trainables(chosen)

# -----------------------------------------------------------------------------
# The noise/update backend (seam 1): θ += scale·z in place, and the update. The reference walks the tensors
# chunk by chunk, computes in float32 (float64 stays float64), and rounds once into the tensor's own dtype.


def _compute(theta: torch.Tensor) -> torch.Tensor:
    return theta.to(torch.promote_types(theta.dtype, torch.float32))  # float32 math, float64 kept as it is


class TorchBackend:
    @torch.no_grad()
    def perturb(self, params: list[Trainable], seed: int, scale: float) -> None:
        """θ ← θ + scale·z."""
        for _, theta, z in noise_chunks(params, seed):
            t = _compute(theta)
            theta.copy_(t + scale * z.to(t.dtype))

    @torch.no_grad()
    def update(self, params: list[Trainable], seed: int, projected_grad: float, lr: float, weight_decay: float) -> None:
        """θ ← θ − lr·(projected_grad·z + weight_decay·θ); no weight decay on biases and norm weights."""
        for p, theta, z in noise_chunks(params, seed):
            wd = weight_decay if p.decay else 0.0
            t = _compute(theta)
            theta.copy_(t - lr * (projected_grad * z.to(t.dtype) + wd * t))

# -----------------------------------------------------------------------------
# One MeZO step (Algorithm 1; Algorithm 2 with n samples). loss_fn runs a forward on the step's batch and
# returns a float: the forward seam lives inside it, and so does the placement seam's reduction of the loss.


@torch.no_grad()
def mezo_step(params: list[Trainable], loss_fn, seeds: list[int], eps: float, lr, weight_decay, backend=None,
              perturbed: bool = False, next_seed: int | None = None, rule=None) -> list[dict]:
    """One step. lr and weight_decay: one value, or one per tensor (MeZO's param groups). perturbed: θ + εz
    for seeds[0] is already there (the last step's next_seed). next_seed: end at θ_next + εz for that seed,
    which a backend may fuse with the update (fast/ does: 2 passes over θ a step, not 3). Same roundings."""
    backend = backend or TorchBackend()
    groups = _rate_groups(params, lr, weight_decay)
    samples = []
    for k, seed in enumerate(seeds):
        if not (perturbed and k == 0):
            backend.perturb(params, seed, +eps)  # θ + εz
        loss_plus = loss_fn()
        backend.perturb(params, seed, -2 * eps)  # θ − εz
        loss_minus = loss_fn()
        projected_grad = (loss_plus - loss_minus) / (2 * eps)  # ≈ ∇L·z
        samples.append(dict(seed=seed, loss_plus=loss_plus, loss_minus=loss_minus, projected_grad=projected_grad))
        finite = math.isfinite(loss_plus) and math.isfinite(loss_minus)
        if finite and len(seeds) == 1 and len(groups) == 1 and hasattr(backend, "restore_and_update") and not rule:
            # A backend may fuse the restore below with the update and the next +εz: one pass over θ.
            _, group_lr, group_wd = groups[0]
            backend.restore_and_update(params, seed, eps, projected_grad, group_lr, group_wd, next_seed)
            return samples
        backend.perturb(params, seed, +eps)  # back to θ (up to rounding; see the tests)
        if not finite:
            raise NonFiniteLoss(f"loss_plus={loss_plus}, loss_minus={loss_minus}")
    sgd_update(backend, samples, groups) if rule is None else rule.update(params, samples, groups, backend, loss_fn)
    if next_seed is not None:
        backend.perturb(params, next_seed, +eps)
    return samples


def sgd_update(backend, samples: list[dict], groups) -> None:  # θ ← θ − lr·(mean_k g_k·z_k + wd·θ), wd once
    for k, s in enumerate(samples):
        for group, group_lr, group_wd in groups:
            backend.update(group, s["seed"], s["projected_grad"] / len(samples), group_lr, group_wd if k == 0 else 0.0)


def _rate_groups(params: list[Trainable], lr, weight_decay) -> list[tuple[list[Trainable], float, float]]:
    """(tensors, lr, weight decay) for runs of tensors that share them; one run keeps the list (fast/ keys on it)."""
    per = lambda v: list(v) if isinstance(v, (list, tuple)) else [v] * len(params)
    groups = []
    for p, rates in zip(params, zip(per(lr), per(weight_decay))):
        groups[-1][0].append(p) if groups and groups[-1][1:] == rates else groups.append(([p], *rates))
    return [(params, *groups[0][1:])] if len(groups) == 1 else groups


class ExactRestore:
    """Drift-free mode (--exact-restore): keeps a copy of θ for the step, and every perturbation starts from
    it, so L± are taken at round(θ ± εz) and the restore is the copy: bit-exact in any dtype. (In-place ±ε in
    bfloat16 loses ~3 % of |θ| in 50 steps at lr = 0: bench/drift.py.) Costs one copy of the trainable tensors."""

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

# -----------------------------------------------------------------------------
# MeZO as a torch.optim.Optimizer, for your own model and loop. The step is mezo_step itself, on the
# parameters in the order given (group after group), with seeds from (seed, step count).


class MeZO(torch.optim.Optimizer):
    """opt = MeZO(model.parameters(), lr=1e-3, eps=1e-3); loss = opt.step(lambda: loss_fn(model, batch)).
    params: parameters, (name, parameter) pairs, or groups with their own lr and weight_decay (lr schedulers work).
    step(closure) runs the closure (a forward: a float or 0-d tensor) twice per sample without autograd and returns
    the loss at θ, (L+ + L−)/2; `last` holds the step's record. Weight decay skips 1-D tensors, as in mezo_step.
    state_dict(): step count, seed, the rule's buffers. backend= takes fast/'s; rule= rules.py's (rules.make)."""

    def __init__(self, params, lr: float = 1e-3, eps: float = 1e-3, weight_decay: float = 0.0,
                 n_samples: int = 1, seed: int = 0, backend=None, rule=None):
        if not (lr >= 0 and eps > 0 and weight_decay >= 0 and n_samples >= 1 and 0 <= seed < 1 << 63):
            raise ValueError(f"MeZO needs lr >= 0, eps > 0, weight_decay >= 0, n_samples >= 1, 0 <= seed < 2^63; "
                             f"got {lr=}, {eps=}, {weight_decay=}, {n_samples=}, {seed=}")
        self.eps, self.n_samples, self.seed, self.steps, self.last = eps, n_samples, seed, 0, None
        self.backend, self.rule = backend or TorchBackend(), rule
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    def add_param_group(self, group: dict) -> None:
        """torch's, and: unnamed parameters are named group.index, and the trainables (mezo_step's global
        indices, in group order) are laid out again. Names are kept here, so any torch takes (name, tensor)."""
        if set(group) - {"params", "lr", "weight_decay"}:
            raise ValueError(f"MeZO param group {len(self.param_groups)}: only lr and weight_decay can differ "
                             f"between groups, not {sorted(set(group) - {'params', 'lr', 'weight_decay'})}")
        tensors = [group["params"]] if torch.is_tensor(group["params"]) else group["params"]
        named = [p if isinstance(p, tuple) else (f"{len(self.param_groups)}.{j}", p) for j, p in enumerate(tensors)]
        super().add_param_group(dict(group, params=[p for _, p in named], param_names=[n for n, _ in named]))
        self.trainables = make_trainables([x for g in self.param_groups for x in zip(g["param_names"], g["params"])])

    @torch.no_grad()
    def step(self, closure) -> float:
        if closure is None:
            raise ValueError("MeZO.step needs a closure that runs a forward and returns the loss")
        per_tensor = lambda key: [g[key] for g in self.param_groups for _ in g["params"]]
        seeds = [step_seed(self.seed, self.steps + 1, k) for k in range(self.n_samples)]
        try:
            samples = mezo_step(self.trainables, lambda: float(closure()), seeds, self.eps, per_tensor("lr"),
                                per_tensor("weight_decay"), self.backend, rule=self.rule)
        except NonFiniteLoss as e:
            raise NonFiniteLoss(f"non-finite loss at step {self.steps + 1} ({e}); the parameters are as step "
                                f"{self.steps} left them. Lower lr or eps") from None
        self.steps += 1
        self.last = dict(step=self.steps, **runs.step_record(samples, self.param_groups[0]["lr"]))
        return self.last["loss"]

    def state_dict(self) -> dict:
        rule = self.rule.state(self.trainables) if self.rule else {}
        return super().state_dict() | dict(mezo=dict(steps=self.steps, seed=self.seed, rule=rule))

    def load_state_dict(self, state_dict: dict) -> None:
        if "mezo" not in state_dict:
            raise ValueError("not a MeZO state_dict: it has no 'mezo' entry (step count and seed)")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "mezo"})
        self.steps, self.seed = state_dict["mezo"]["steps"], state_dict["mezo"]["seed"]
        if self.rule:
            self.rule.load(state_dict["mezo"].get("rule", {}), self.trainables)

# -----------------------------------------------------------------------------
# The forward (seam 2): a batch becomes label-word logits, read by the model's own LM head at one position (the
# <mask>, or a causal LM's last token), which keeps the vocabulary projection off every other token.


class PromptForward:
    """(batch) -> label-word logits (B, C). The body runs once, the head only where read: each row's position, or
    every token of several-token words, whose log-probabilities sum to the class's score (MeZO's OPT code).
    A forward may also offer prepare(token id lists) and stats() (cache/ does)."""

    def __init__(self, model: nn.Module, label_ids: list[int], params: list[Trainable] | None = None):
        self.model, self.label_ids = model, torch.tensor(label_ids)
        self.body = model.base_model
        heads = [m for m in model.children() if m is not self.body]
        self.lm_head = heads[0] if len(heads) == 1 else None  # e.g. lm_head (Llama, RoBERTa), cls (BERT)

    def __call__(self, batch: dict) -> torch.Tensor:
        return self.head(self.body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                         .last_hidden_state, batch)  # (B, T, H) -> (B, C)

    def head(self, hidden: torch.Tensor, batch: dict) -> torch.Tensor:
        rows = batch.get("row", torch.arange(hidden.size(0)))  # several-token words: a row per (example, class)
        h = hidden[rows, batch["position"]]  # (N, H) at the mask / last token / each word token
        if hasattr(self.model, "cls_head"):
            return _compute(self.model.cls_head(h))  # (B, C)
        if "target" not in batch:
            return _compute(self.lm_head(h)[:, self.label_ids.to(h.device)])  # (B, V) -> (B, C)
        logp = _compute(self.lm_head(h)).log_softmax(-1).gather(1, batch["target"][:, None])[:, 0]  # (N,)
        return logp.new_zeros(hidden.size(0)).index_add_(0, rows, logp).view(len(batch["labels"]), -1)  # (B, C)


def objective_loss(logits: torch.Tensor, labels: torch.Tensor, objective: str) -> float:
    if objective == "accuracy":  # non-differentiable: MeZO only needs its value
        return 1.0 - (logits.argmax(-1) == labels).float().mean().item()
    return F.cross_entropy(logits, labels).item()  # softmax over the label words only, as LM-BFF

# -----------------------------------------------------------------------------
# Placement (seam 3): where the model's tensors live, which examples this process runs, how a loss is
# reduced, and who writes. One process: everything here, nothing to reduce. tp/ replaces it under torchrun.


class Placement:
    is_main = True  # this process prints, logs, evaluates into the log and writes checkpoints
    device = None  # None: --device decides
    dp = 1  # data-parallel ranks that split a step's batch

    def shard(self, model: nn.Module, params: list[Trainable]) -> list[Trainable]:
        return params  # the model stays whole

    def local(self, examples: list[dict]) -> list[dict]:
        return examples  # this process runs every example

    def mean(self, value: float, n: int) -> float:
        return value  # a mean over this process's n examples is the mean over all of them

    def gather(self, params: list[Trainable]) -> list[Trainable]:
        return params  # full tensors, as checkpoints hold them

    def close(self) -> None:
        pass

# -----------------------------------------------------------------------------
# The training loop: batch → step → log → evaluate/save. runs.Run keeps the bookkeeping (data, model,
# evaluation, checkpoints, timing); what happens to θ is all here.


def train(cfg: Config, resume: str | None = None, *, backend=None, forward=PromptForward,
          placement: Placement | None = None, rule=None) -> dict:
    """Train as the command line does and return the run's summary. The seams default to the reference's;
    `variants(cfg)` makes the ones a config asks for (the command line passes them in)."""
    runs.check_config(cfg)  # each option in its range, and no two that cannot go together: else one line
    placement, backend = placement or Placement(), backend or TorchBackend()
    run = runs.Run(cfg, placement, lambda model: placement.shard(model, select_trainables(model, cfg)), forward, rule)
    # A fused backend also makes the next step's +εz in the update's pass (ZO-SGD, one sample), unless θ itself
    # is needed between the steps (an evaluation or a checkpoint; the last step evaluates).
    fuse, perturbed = hasattr(backend, "restore_and_update") and cfg.n_samples < 2 and not (rule or run.optimizer), 0
    for step in run.steps(resume):
        batch = run.batch(step)  # this process's examples of the step

        def loss_fn() -> float:  # one forward at the current θ; data-parallel ranks average, so all see one loss
            return placement.mean(objective_loss(*run.logits(batch), cfg.objective), len(batch))

        next_seed = step_seed(cfg.seed, step + 1, 0) if fuse and not run.saves_at(step) else None
        with run.timed_step(step):  # a non-finite loss stops the run, keeping the last good checkpoint
            if run.optimizer:  # the first-order baseline (baseline.py), on the same tensors and batches
                record = dict(loss=adam_step(run.optimizer, lambda: run.loss_parts(batch)), lr=cfg.lr)
            else:
                seeds = [step_seed(cfg.seed, step, k) for k in range(cfg.n_samples)]
                samples = mezo_step(run.params, run.replayed(step) or loss_fn, seeds, cfg.eps, cfg.lr,  # --replay:
                                    cfg.weight_decay, backend, perturbed, next_seed, rule)  # logged L±
                record, perturbed = runs.step_record(samples, cfg.lr), next_seed is not None
        run.record(step, record)  # log.jsonl, the progress bar; evaluate and checkpoint when due
    return run.finish()

# -----------------------------------------------------------------------------
# Command line: flags map 1:1 onto Config, and `variants` picks the seams (the one place that imports fast/,
# cache/ or tp/). With --resume, the flags given change the checkpoint's config (e.g. --steps to train further).


def parse_args(argv=None) -> tuple[Config, str | None]:
    p = options.parser(Config, "mezo", __doc__.split("\n\n")[0].strip())
    p.add_argument("--resume", default=None, help="continue the run whose --out folder this is")
    args = vars(p.parse_args(argv))
    resume = args.pop("resume")
    if resume or args.get("replay"):
        saved = checkpoints.saved_config(Path(resume or args["replay"]))  # the run's config, not its world size
        args = {**{k: v for k, v in saved.items() if k in Config.__dataclass_fields__}, "out": resume, **args}
    return Config(**args), resume


def variants(cfg: Config) -> dict:
    """The seams a config asks for, as train's keyword arguments: backend, forward and placement."""
    runs.check_config(cfg)  # before anything starts (tp/ joins a process group)
    seams = dict(backend=ExactRestore(TorchBackend()) if cfg.exact_restore else TorchBackend(), forward=PromptForward)
    if cfg.fast:  # the compiled reference on CPUs, Triton kernels on GPUs (fast/__init__.py)
        from mezo.fast import choose
        device = cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
        seams["backend"] = choose(device, cfg.exact_restore)
    if cfg.rule != "sgd":  # momentum, Adam, sign, conservative (rules.py)
        from mezo.rules import make
        seams["rule"] = make(cfg.rule, cfg.beta)
    if cfg.cache:
        from mezo.cache import CachedForward
        seams["forward"] = lambda *args: CachedForward(*args, max_bytes=cfg.cache_mb << 20)
    if cfg.tp > 1 or cfg.dp > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from mezo.tp import DistributedPlacement
        seams["placement"] = DistributedPlacement(cfg)
    return seams


def main(argv=None) -> int:
    seams = {}
    try:
        cfg, resume = parse_args(argv)
        seams = variants(cfg)
        train(cfg, resume, **seams)
    except (UsageError, NonFiniteLoss) as e:
        print(f"mezo: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except RuntimeError as e:  # under torchrun: a collective that failed because another rank died or hung
        if (line := getattr(seams.get("placement"), "peer_failure", lambda e: None)(e)) is None:  # tp/ knows them
            raise
        print(f"mezo: error: {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.modules.setdefault("mezo", sys.modules[__name__])  # variants' `import mezo` gets this module, not a copy
    sys.exit(main())
