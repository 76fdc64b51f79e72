"""Update rules beside ZO-SGD (mezo.py's): `--rule`, and `mezo.MeZO(..., rule=rules.make(name))`.

Every rule starts from MeZO's estimate of the step's gradient, made again from the samples' seeds:

    ĝ = mean_k g_k·z_k + wd·θ   (g_k: sample k's projected gradient; wd only on tensors of ≥ 2 dims)

ZO-SGD moves θ ← θ − lr·ĝ. The rules here (ZO-Bench, Zhang et al. 2024, arXiv:2402.11592, compares
them on LLMs; MeZO-Adam is in the MeZO paper's Table 18):

    rule          step                                           memory beyond ZO-SGD's
    momentum      m ← β·m + ĝ;  θ ← θ − lr·m                     a float32 buffer the size of θ
    adam          m ← β1·m + (1−β1)·ĝ;  v ← β2·v + (1−β2)·ĝ²;    two such buffers
                  θ ← θ − lr·m̂ / (√v̂ + δ),  m̂ = m / (1−β1^t), v̂ = v / (1−β2^t)
    sign          θ ← θ − lr·(mean_k sign(g_k)·z_k + wd·θ)       none
    conservative  θ ← the lowest-loss of θ, θ − lr·ĝ, θ + lr·ĝ   a copy of θ during the step;
                                                                 3 more forwards

z stays a function of (seed, index): a rule walks θ chunk by chunk as the reference backend does
(mezo.noise_chunks, float32 math, float64 kept, one rounding into θ's dtype), so z is never whole
and any shard makes its own slice. sign and conservative move θ with the backend's own update
(fast/'s too). Momentum and Adam make z with the reference's noise, or the compiled CPU backend's
(the same bits, faster), so --fast on a CPU changes no number; on fast/'s Triton kernels they are
one pass over θ and the buffers with z made inside (TritonBackend.rule_update), within 1e-6 of the
reference's z (docs/fast.md), the bound the kernels' ±εz already has. Buffers are float32 whatever
θ's dtype (float64 for float64 tensors) and are checkpointed with θ.
"""
from __future__ import annotations

import math

import torch

import mezo

RULES = ("momentum", "adam", "sign", "conservative")
# Adam's second-moment decay and its denominator's guard (torch's defaults)
BETA2, DELTA = 0.999, 1e-8


def make(name: str, beta: float = 0.9):
    """The rule called name; beta is momentum's β or Adam's β1."""
    if name not in RULES:
        raise ValueError(f"unknown update rule {name!r}; the rules are sgd (mezo.py's) and "
                         f"{', '.join(RULES)}")
    if name in ("momentum", "adam") and not 0 <= beta < 1:
        raise ValueError(f"--rule {name} needs 0 <= beta < 1, got {beta}")
    return {"momentum": lambda: Momentum(beta), "adam": lambda: Adam(beta), "sign": Sign,
            "conservative": Conservative}[name]()


def noise_pieces(params: list[mezo.Trainable], seeds: list[int], backend=None):
    """(trainable, flat piece of θ, [its z for each seed]): from the backend where it makes z faster
    (fast/'s compiled CPU backend: the same bits), else from the reference's noise_chunks."""
    inner = getattr(backend, "backend", backend)  # under ExactRestore
    if hasattr(inner, "noise_pieces"):
        yield from inner.noise_pieces(params, seeds)
        return
    for pieces in zip(*(mezo.noise_chunks(params, seed) for seed in seeds)):
        yield pieces[0][0], pieces[0][1], [z for _, _, z in pieces]


def fused_backend(backend):
    """The backend (under ExactRestore, its inner one) if it does momentum's and Adam's step in one
    pass of its own (fast/'s Triton kernels: rule_update), else None."""
    inner = getattr(backend, "backend", backend)
    return inner if hasattr(inner, "rule_update") else None


def estimate(params: list[mezo.Trainable], samples: list[dict], weight_decay: float, backend=None):
    """(trainable, flat piece of θ, θ's piece in compute precision, ĝ's piece) chunk by chunk."""
    n = len(samples)
    for p, theta, zs in noise_pieces(params, [s["seed"] for s in samples], backend):
        t = mezo.in_compute_dtype(theta)
        g = torch.zeros_like(t)
        for s, z in zip(samples, zs):
            g += (s["projected_grad"] / n) * z.to(t.dtype)
        yield p, theta, t, g + (weight_decay if p.decay else 0.0) * t


def buffer_dtype(p: mezo.Trainable) -> torch.dtype:
    # float32, or float64 for float64 tensors
    return torch.promote_types(p.tensor.dtype, torch.float32)


class Stateful:
    """Buffers per trainable tensor (a shard's own slice under tp/), named '<buffer>:<tensor name>'
    in state()."""

    buffer_names: tuple[str, ...] = ()
    extra_forwards = 0

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}  # flat, made at the first step
        self.t = 0  # steps taken

    def piece(self, name: str, p: mezo.Trainable, theta: torch.Tensor) -> torch.Tensor:
        """The buffer's piece that matches θ's piece (a view into p's flat tensor)."""
        key = f"{name}:{p.name}"
        if key not in self.buffers:
            self.buffers[key] = torch.zeros(p.tensor.numel(), dtype=buffer_dtype(p),
                                            device=p.tensor.device)
        start = theta.storage_offset() - p.tensor.storage_offset()
        return self.buffers[key][start:start + theta.numel()]

    def state(self, params: list[mezo.Trainable]) -> dict[str, torch.Tensor]:
        """The buffers in each tensor's (local) shape, and the step count 't': what a checkpoint
        keeps."""
        if not self.buffer_names:
            return {}
        out = {}
        for name in self.buffer_names:
            for p in params:
                buf = self.buffers.get(f"{name}:{p.name}")
                buf = torch.zeros(p.tensor.numel(), dtype=buffer_dtype(p)) if buf is None else buf
                out[f"{name}:{p.name}"] = buf.view(p.tensor.shape)
        return out | {"t": torch.tensor(self.t, dtype=torch.int64)}

    def load(self, state: dict[str, torch.Tensor], params: list[mezo.Trainable]) -> None:
        """Take state()'s tensors back (full tensors are cut to this shard's slice), all of them or,
        where one does not fit, none."""
        if not self.buffer_names:
            return
        missing = [f"{name}:{p.name}" for name in self.buffer_names for p in params
                   if f"{name}:{p.name}" not in state]
        if missing or "t" not in state:
            raise ValueError(f"the saved state has no {type(self).__name__.lower()} buffers "
                             f"({', '.join(missing[:2])}{'...' if len(missing) > 2 else ''}): it "
                             "was saved with another --rule")
        loaded = {}
        for name in self.buffer_names:
            for p in params:
                full = state[f"{name}:{p.name}"]
                if tuple(full.shape) not in (tuple(p.tensor.shape), tuple(p.full_shape)):
                    raise ValueError(f"the saved buffer {name}:{p.name} has shape "
                                     f"{tuple(full.shape)} and the parameter "
                                     f"{tuple(p.full_shape)}: the state was saved for other "
                                     "parameters (another model, or other LoRA settings)")
                local = full if tuple(full.shape) == tuple(p.tensor.shape) else \
                    full[tuple(slice(s, s + n) for s, n in zip(p.shard_start, p.tensor.shape))]
                loaded[f"{name}:{p.name}"] = local.to(p.tensor.device,
                                                      buffer_dtype(p)).reshape(-1).clone()
        self.buffers.update(loaded)
        self.t = int(state["t"])

    @torch.no_grad()
    def update(self, params, samples, groups, backend, loss_fn) -> None:
        """One step of the rule: θ's pieces one after another, each θ ← step(θ, ĝ) with the piece's
        buffers (or fast/'s one pass over each tensor, when the backend has it)."""
        self.t += 1
        fused = fused_backend(backend)
        for group, lr, wd in groups:
            if fused:
                fused.rule_update(self, group, samples, lr, wd)
                continue
            for p, theta, t, g in estimate(group, samples, wd, backend):
                theta.copy_(self.step(p, theta, t, g, lr))

    def step(self, p: mezo.Trainable, theta: torch.Tensor, t: torch.Tensor, g: torch.Tensor,
             lr: float) -> torch.Tensor:
        """θ's new piece from its piece t in compute precision and ĝ's piece g."""
        raise NotImplementedError


class Momentum(Stateful):
    """m ← β·m + ĝ;  θ ← θ − lr·m (torch.optim.SGD's momentum, on MeZO's estimate)."""

    buffer_names = ("m",)

    def __init__(self, beta: float = 0.9):
        super().__init__()
        self.beta = beta

    def fused(self) -> tuple:
        """What fast/'s one-pass kernel needs: (Adam?, β1, β2, bias corrections c1 and c2, δ)."""
        return False, self.beta, 0.0, 1.0, 1.0, 0.0

    def step(self, p, theta, t, g, lr) -> torch.Tensor:
        m = self.piece("m", p, theta)
        m.mul_(self.beta).add_(g)
        return t - lr * m


class Adam(Stateful):
    """MeZO-Adam: Adam with bias correction on MeZO's estimate ĝ (weight decay inside ĝ, as MeZO-SGD
    has it)."""

    buffer_names = ("m", "v")

    def __init__(self, beta1: float = 0.9, beta2: float = BETA2, delta: float = DELTA):
        super().__init__()
        self.beta1, self.beta2, self.delta = beta1, beta2, delta

    def fused(self) -> tuple:
        return (True, self.beta1, self.beta2, 1 - self.beta1 ** self.t, 1 - self.beta2 ** self.t,
                self.delta)

    def step(self, p, theta, t, g, lr) -> torch.Tensor:
        c1, c2 = 1 - self.beta1 ** self.t, 1 - self.beta2 ** self.t  # bias corrections
        m, v = self.piece("m", p, theta), self.piece("v", p, theta)
        m.mul_(self.beta1).add_((1 - self.beta1) * g)
        v.mul_(self.beta2).add_((1 - self.beta2) * g * g)
        return t - lr * (m / c1) / ((v / c2).sqrt() + self.delta)


class Sign(Stateful):
    """θ ← θ − lr·(mean_k sign(g_k)·z_k + wd·θ): ZO-SGD on the signs of the projected gradients."""

    @torch.no_grad()
    def update(self, params, samples, groups, backend, loss_fn) -> None:
        signs = [dict(s, projected_grad=math.copysign(1.0, s["projected_grad"])
                      if s["projected_grad"] else 0.0)
                 for s in samples]
        mezo.sgd_update(backend, signs, groups)


class Conservative(Stateful):
    """ZO-Bench's ZO-SGD-Cons: the loss at θ, θ − lr·ĝ and θ + lr·ĝ, and θ moves to the lowest (θ on
    a tie first, then θ − lr·ĝ). Three forwards more a step; the candidates start from a copy of θ,
    so no drift."""

    extra_forwards = 3
    CANDIDATES = ("stay", "minus", "plus")

    @torch.no_grad()
    def update(self, params, samples, groups, backend, loss_fn) -> None:
        saved = [p.tensor.detach().clone() for p in params]

        def restore():
            for p, theta in zip(params, saved):
                p.tensor.copy_(theta)

        try:
            losses = [loss_fn()]  # θ
            mezo.sgd_update(backend, samples, groups)  # θ − lr·ĝ
            losses.append(loss_fn())
            restore()
            mezo.sgd_update(backend, samples, [(g, -lr, wd) for g, lr, wd in groups])  # θ + lr·ĝ
            losses.append(loss_fn())
        except BaseException:  # a forward that raises (Ctrl-C, out of memory): θ as it was
            restore()
            raise
        best = min(range(3), key=lambda i: (losses[i] if math.isfinite(losses[i]) else math.inf, i))
        if best != 2:
            restore()
            if best == 1:
                mezo.sgd_update(backend, samples, groups)
        samples[0].update(kept=self.CANDIDATES[best], candidate_losses=losses)
