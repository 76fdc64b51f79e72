"""mezo.MeZO, the step as a torch.optim.Optimizer, against mezo_step (the reference) and against hand computations:
the same losses and tensors over K steps, param groups and lr schedulers, state_dict resume, learning on a plain
nn.Module that no transformers code touches, and a NaN loss."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import z_of
from hypothesis import given
from hypothesis import strategies as st

import mezo
from mezo import runs


def mlp(widths, dtype, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(a, b) for a, b in zip(widths, widths[1:])]
    return nn.Sequential(*[m for layer in layers for m in (layer, nn.Tanh())][:-1]).to(dtype)


def regression_loss(model, seed=1):
    """A fixed batch and target: the closure a user would write (a forward, a float back)."""
    g = torch.Generator().manual_seed(seed)
    width_in = model[0].in_features
    x = torch.randn(16, width_in, generator=g).to(next(model.parameters()).dtype)
    y = torch.randn(16, model[-1].out_features, generator=g).to(x.dtype)
    return lambda: F.mse_loss(model(x).float(), y.float())  # a 0-d tensor, as most loss functions return


@given(widths=st.lists(st.integers(1, 9), min_size=2, max_size=4), dtype=st.sampled_from([torch.float32, torch.bfloat16,
       torch.float16, torch.float64]), seed=st.integers(0, 2**63 - 1), n_samples=st.integers(1, 3),
       weight_decay=st.sampled_from([0.0, 0.1]), lr=st.floats(1e-4, 1e-1), steps=st.integers(1, 4))
def test_optimizer_equals_mezo_step(widths, dtype, seed, n_samples, weight_decay, lr, steps):
    """Two copies of one model: one stepped by MeZO, one by mezo_step with the seeds (seed, t, k). Bit for bit."""
    ours, ref = mlp(widths, dtype), mlp(widths, dtype)
    opt = mezo.MeZO(ours.named_parameters(), lr=lr, eps=1e-3, weight_decay=weight_decay, n_samples=n_samples,
                    seed=seed)
    params = mezo.make_trainables(list(ref.named_parameters()))
    loss_ours, loss_ref = regression_loss(ours), regression_loss(ref)
    for t in range(1, steps + 1):
        got = opt.step(loss_ours)
        seeds = [mezo.step_seed(seed, t, k) for k in range(n_samples)]
        samples = mezo.mezo_step(params, lambda: loss_ref().item(), seeds, 1e-3, lr, weight_decay)
        want = runs.step_record(samples, lr)
        assert got == want["loss"] and opt.last == dict(step=t, **want), (opt.last, want)
        for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
            assert torch.equal(a, b), f"step {t}, {name}: max diff {(a.double() - b.double()).abs().max():.3g}"
    assert opt.steps == steps


def test_closure_runs_without_autograd_and_returns_the_loss_at_theta():
    model = mlp([3, 4, 2], torch.float64)
    loss = regression_loss(model)
    grad_modes = []
    opt = mezo.MeZO(model.parameters(), lr=0.0, eps=1e-4)
    got = opt.step(lambda: (grad_modes.append(torch.is_grad_enabled()), loss())[1])
    assert grad_modes == [False, False]  # two forwards, neither recording a graph
    # (L+ + L−)/2 − L = ε²/2·zᵀHz: ε² = 1e-8 times zᵀHz over 26 parameters, under 1e-6 of L
    assert got == pytest.approx(loss().item(), rel=1e-6)  # (L+ + L−)/2 = L(θ) + O(ε²)


def test_param_groups_and_lr_scheduler_take_effect():
    """Per-group lr, moved by a StepLR schedule: each tensor moves by −lr_group·g·z (float64, by hand)."""
    model = mlp([4, 3, 2], torch.float64)
    first, second = model[0], model[2]
    groups = [dict(params=first.parameters(), lr=0.05), dict(params=second.parameters(), lr=0.2, weight_decay=0.5)]
    opt = mezo.MeZO(groups, eps=1e-6, seed=11)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    loss = regression_loss(model)
    params = opt.trainables
    for t in range(1, 4):
        before = [p.tensor.detach().clone() for p in params]
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs == [0.05 * 0.5 ** (t - 1), 0.2 * 0.5 ** (t - 1)]
        opt.step(loss)
        g = opt.last["projected_grad"]
        for p, b in zip(params, before):
            lr, wd = (lrs[0], 0.0) if p.name.startswith("0.") else (lrs[1], 0.5 if p.decay else 0.0)
            want = b - lr * (g * z_of(p, opt.last["seed"]).double() + wd * b)
            # float64: 3 ±ε passes and the update round θ (|θ| < 1) by ≤ 4 ulps: ≪ 1e-12
            assert torch.allclose(p.tensor, want, rtol=0, atol=1e-12), (t, p.name)
        sched.step()
    assert [p.name for p in params] == ["0.0", "0.1", "1.0", "1.1"]  # names made for unnamed parameters


def test_named_parameters_keep_their_names_and_order():
    model = mlp([3, 3, 2], torch.float32)
    opt = mezo.MeZO(model.named_parameters())
    assert [p.name for p in opt.trainables] == [n for n, _ in model.named_parameters()]
    assert [p.offset for p in opt.trainables] == [0, 9, 12, 18]


def test_state_dict_resume_continues_the_identical_trajectory():
    """8 steps straight == 4 steps, state_dict of model and optimizer saved and loaded into fresh objects, 4 more."""
    def fresh():
        model = mlp([5, 6, 3], torch.float32)
        return model, mezo.MeZO(model.parameters(), lr=0.05, eps=1e-3, weight_decay=0.1, n_samples=2, seed=7)
    straight, opt = fresh()
    losses = [opt.step(regression_loss(straight)) for _ in range(8)]
    first, opt1 = fresh()
    resumed = [opt1.step(regression_loss(first)) for _ in range(4)]
    saved_model, saved_opt = first.state_dict(), opt1.state_dict()
    second, opt2 = fresh()
    opt2.seed = 0  # the state_dict carries the seed: a different one here must not matter
    second.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    resumed += [opt2.step(regression_loss(second)) for _ in range(4)]
    assert resumed == losses and opt2.steps == 8
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), second.parameters()))
    with pytest.raises(ValueError, match="not a MeZO state_dict"):
        opt2.load_state_dict(torch.optim.SGD(second.parameters(), lr=0.1).state_dict())


def test_it_learns_a_plain_regression():
    """A linear regression in a plain nn.Module: MeZO alone takes the loss to a tenth of where it started."""
    torch.manual_seed(0)
    x = torch.randn(64, 6)
    y = x @ torch.randn(6, 1) + 0.5
    model = nn.Linear(6, 1)
    opt = mezo.MeZO(model.parameters(), lr=0.05, eps=1e-3, seed=3)
    start = F.mse_loss(model(x), y).item()
    for _ in range(600):
        opt.step(lambda: F.mse_loss(model(x), y))
    assert F.mse_loss(model(x), y).item() < 0.1 * start


def _exact_backends():
    """Each backend that restores θ bit for bit (each says so: `exact`); Triton's on the CPU under its interpreter."""
    from mezo import fast
    triton = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU kernels need TRITON_INTERPRET=1")
    return [pytest.param(lambda: mezo.ExactRestore(mezo.TorchBackend()), id="ExactRestore"),
            pytest.param(lambda: fast.Fused(mezo.ExactRestore(mezo.TorchBackend())), id="Fused-ExactRestore"),
            pytest.param(lambda: fast.TritonBackend(exact=True), id="Triton-exact", marks=triton),
            pytest.param(lambda: fast.Fused(fast.TritonBackend(exact=True)), id="Fused-Triton-exact", marks=triton)]


@pytest.mark.parametrize("make_backend", [pytest.param(None, id="in-place"), *_exact_backends()])
def test_a_nan_loss_raises_the_command_lines_error_and_keeps_theta(make_backend):
    """The closure returns NaN: NonFiniteLoss with the CLI's wording; θ as the last good step left it (within the
    rounding of +ε, −2ε, +ε in place; bit for bit with a backend whose restore is exact, and the message then makes
    no claim of rounding), and the step count unchanged."""
    model = mlp([4, 5, 2], torch.float32)
    exact = make_backend is not None
    opt = mezo.MeZO(model.parameters(), lr=0.1, eps=1e-3, backend=make_backend() if exact else None)
    loss = regression_loss(model)
    opt.step(loss)
    opt.backend.settle(opt.trainables)  # (Fused holds the last update back until θ is read)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(mezo.NonFiniteLoss, match=r"^non-finite loss at step 2 \(loss_plus=nan, loss_minus=nan\); "
                                                 r"θ is as step 1 left it"
                                                 + (r"\. " if exact else r", up to θ ± εz's rounding\. ")):
        opt.step(lambda: float("nan"))
    assert opt.steps == 1
    for p, b, t in zip(model.parameters(), before, opt.trainables):
        bound = 3 * 2.0**-24 * (b.abs() + 2e-3 * z_of(t, mezo.step_seed(0, 2, 0)).abs())
        assert torch.equal(p, b) if exact else bool(((p - b).abs() <= bound).all())
    opt.step(loss)  # and training goes on from there
    assert opt.steps == 2 and math.isfinite(opt.last["loss"])


def interrupt(opt, model, loss, raises_at: int) -> list[torch.Tensor]:
    """opt.step with a closure that raises KeyboardInterrupt at its `raises_at`-th forward (as Ctrl-C would), which
    reaches the caller; the parameters from before that step."""
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def interrupted():
        calls.append(1)
        if len(calls) == raises_at:
            raise KeyboardInterrupt
        return loss()

    with pytest.raises(KeyboardInterrupt):
        opt.step(interrupted)
    return before


@pytest.mark.parametrize("backend", ["reference", "exact", "fused"])
@pytest.mark.parametrize("raises_at", [1, 2])
def test_a_forward_that_raises_leaves_theta_where_it_was_and_the_next_step_is_the_reference(backend, raises_at):
    """Ctrl-C (or out of memory) in the closure's first or second forward: the exception goes on to the caller with θ
    restored (as the step's own restore would: bit for bit with ExactRestore) and settled (fast.Fused holds nothing
    back), the step count unchanged; the next step is then the one an uninterrupted optimizer takes."""
    fast = pytest.importorskip("mezo.fast") if backend == "fused" else None

    def make(model):
        inner = mezo.TorchBackend()
        chosen = dict(reference=inner, exact=mezo.ExactRestore(inner), fused=fast and fast.Fused(inner))[backend]
        return mezo.MeZO(model.parameters(), lr=0.1, eps=1e-3, backend=chosen)

    model, twin = mlp([4, 5, 2], torch.float32), mlp([4, 5, 2], torch.float32)
    opt, twin_opt = make(model), make(twin)
    loss, twin_loss = regression_loss(model), regression_loss(twin)
    for o, f in ((opt, loss), (twin_opt, twin_loss)):
        o.step(f)
    before = interrupt(opt, model, loss, raises_at)
    assert opt.steps == 1
    for p, b, t in zip(model.parameters(), before, opt.trainables):
        bound = 3 * 2.0**-24 * (b.abs() + 2e-3 * z_of(t, mezo.step_seed(0, 2, 0)).abs())
        assert torch.equal(p, b) if backend == "exact" else bool(((p - b).abs() <= bound).all()), (p - b).abs().max()
    if backend == "exact":  # θ is bit for bit the twin's: so is the next step
        opt.step(loss), twin_opt.step(twin_loss)
        twin_opt.backend.settle(twin_opt.trainables)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    else:
        assert opt.step(loss) == pytest.approx(twin_opt.step(twin_loss), rel=1e-5)


@pytest.mark.parametrize("raises_at", [3, 4, 5])
def test_a_candidate_forward_of_the_conservative_rule_that_raises_leaves_theta_as_the_step_found_it(raises_at):
    """--rule conservative runs three more forwards (θ, θ − lr·ĝ, θ + lr·ĝ) after the two of the estimate: one that
    raises leaves θ bit for bit as the rule found it, and the step count unchanged."""
    from mezo import rules
    model = mlp([4, 5, 2], torch.float32)
    opt = mezo.MeZO(model.parameters(), lr=0.1, eps=1e-3, rule=rules.make("conservative"),
                    backend=mezo.ExactRestore(mezo.TorchBackend()))
    loss = regression_loss(model)
    opt.step(loss)
    before = interrupt(opt, model, loss, raises_at)
    assert opt.steps == 1 and all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_a_tensor_that_is_not_contiguous_or_not_floating_point_is_refused_in_one_line():
    """θ is perturbed in place through a flat view: a transposed view cannot take that, and is named."""
    kept = nn.Parameter(torch.randn(3, 4))
    transposed = nn.Parameter(torch.randn(4, 3).t())
    with pytest.raises(ValueError, match=r"^1.0: MeZO trains contiguous floating-point tensors, got torch.float32, "
                                         r"not contiguous$"):
        mezo.MeZO([dict(params=[kept]), dict(params=[transposed])], lr=0.1)
    with pytest.raises(ValueError, match=r"^0.0: .* got torch.complex64$"):
        mezo.MeZO([nn.Parameter(torch.ones(3, dtype=torch.complex64))], lr=0.1)
    mezo.MeZO([kept, nn.Parameter(transposed.data.contiguous())], lr=0.1).step(lambda: torch.tensor(1.0))


def test_a_meta_tensor_is_refused_in_one_line_when_the_optimizer_is_made():
    """A model made on the meta device (torch.device("meta"), accelerate's init_empty_weights) has no values: refused
    where MeZO is made, not as torch's `Tensor.item() cannot be called on meta tensors` at the first step."""
    with torch.device("meta"):
        model = nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"^weight: MeZO trains .* got a meta tensor \(no values: load the weights "
                                         r"first\)$"):
        mezo.MeZO(model.named_parameters(), lr=0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("first", ["cpu", "cuda"])
@pytest.mark.parametrize("rule", [None, "momentum"])
def test_a_model_spread_over_cpu_and_cuda_takes_the_steps_of_one_on_the_cpu(first, rule):
    """A model placed as accelerate's device_map places it, its layers on two devices: z for each tensor is made where
    its chunk's first tensor lives and moved to it, so the steps are those of the same model on the CPU (within the
    rounding of two devices' forwards)."""
    from mezo import rules

    class Spread(nn.Module):
        def __init__(self, devices):
            super().__init__()
            self.devices = devices
            self.a, self.b = (nn.Linear(6, 5).to(devices[0]), nn.Linear(5, 2).to(devices[1]))

        def forward(self, x):
            return self.b(torch.tanh(self.a(x.to(self.devices[0]))).to(self.devices[1])).cpu()

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 2, generator=g)
    spread = Spread([first, "cuda" if first == "cpu" else "cpu"])
    on_cpu = Spread(["cpu", "cpu"])
    on_cpu.load_state_dict({k: v.cpu() for k, v in spread.state_dict().items()})
    lr, steps = 0.05, 5
    losses, grads = [[], []], [[], []]
    for k, model in enumerate((spread, on_cpu)):
        opt = mezo.MeZO(model.named_parameters(), lr=lr, eps=1e-3, rule=rules.make(rule) if rule else None)
        for _ in range(steps):
            losses[k].append(opt.step(lambda: F.mse_loss(model(x), y)))
            grads[k].append(opt.last["projected_grad"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    # The two devices' forwards differ by a few ulps of L±, so projected_grad differs by ulps / 2ε (~3e-5), and θ by
    # lr·Δg·z a step (|z| < 6; the same z: made in float64 and rounded once, on either device), which momentum
    # carries into each later step; plus a few ulps of θ a step from the updates' own rounding.
    bound = lr * 6 * (steps if rule else 1) * sum(abs(a - b) for a, b in zip(*grads))
    for (name, p), q in zip(spread.named_parameters(), on_cpu.parameters()):
        assert p.device.type == dict(a=first, b="cuda" if first == "cpu" else "cpu")[name[0]]  # none moved
        ulps = 4 * steps * 2.0 ** -24 * q.detach().abs().max().item()
        assert (p.detach().cpu() - q.detach()).abs().max().item() <= bound + ulps + 1e-6, name


def test_bad_arguments_are_refused():
    model = nn.Linear(2, 2)
    for kw in (dict(lr=-1.0), dict(eps=0.0), dict(n_samples=0), dict(seed=-1), dict(eps=float("nan")),
               dict(seed=1.5), dict(n_samples=2.0)):
        with pytest.raises(ValueError, match="MeZO needs"):
            mezo.MeZO(model.parameters(), **kw)
    with pytest.raises(ValueError, match="only lr and weight_decay can differ between groups, not \\['eps'\\]"):
        mezo.MeZO([dict(params=model.parameters(), eps=1e-2)])
    with pytest.raises(ValueError, match="needs a closure"):
        mezo.MeZO(model.parameters()).step(None)
    with pytest.raises(ValueError, match="needs a closure"):  # a first-order habit: loss.backward(); opt.step()
        mezo.MeZO(model.parameters()).step()
    # numpy's integers are whole numbers: the same steps as Python's
    steps = []
    for seed, n in ((7, 2), (np.int64(7), np.int32(2))):
        model = nn.Linear(2, 2)
        nn.init.ones_(model.weight)
        mezo.MeZO(model.parameters(), lr=0.1, seed=seed, n_samples=n).step(lambda: model.weight.sum() ** 2)
        steps.append(model.weight.detach().clone())
    assert torch.equal(*steps)


def test_a_users_mistakes_with_the_optimizer_get_one_line_that_names_the_fix_and_theta_is_kept():
    """A string for lr, a rule's name for rule=, a closure that returns None or an unreduced loss: each is refused
    in one line that says what to pass, and a refused step leaves θ bit for bit as it was."""
    model, x = nn.Linear(4, 2), torch.randn(8, 4)
    with pytest.raises(ValueError, match=r"^MeZO needs finite lr >= 0.*got lr='1e-3'"):
        mezo.MeZO(model.parameters(), lr="1e-3")
    with pytest.raises(TypeError, match=r"^MeZO's rule= takes mezo.rules.make\(name\) or None; got 'adam'$"):
        mezo.MeZO(model.parameters(), rule="adam")
    opt, before = mezo.MeZO(model.parameters(), lr=0.1), [p.detach().clone() for p in model.parameters()]
    for closure, got in ((lambda: model(x), r"a tensor of shape \(8, 2\)"), (lambda: None, "None"),
                         (lambda: "0.5", "'0.5'")):  # text (a metric formatted for a log) had been taken as 0.5
        with pytest.raises(TypeError, match=rf"^MeZO.step's closure must return the loss, a number or a one-element "
                                            rf"tensor \(e.g. loss.mean\(\)\); it returned {got}$"):
            opt.step(closure)
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and opt.steps == 0
    # what it asks for works: a one-element tensor, a Python float, a numpy scalar, a 0-d tensor with autograd
    for closure in (lambda: model(x).mean().reshape(1), lambda: float(model(x).mean()),
                    lambda: np.float32(model(x).mean()), lambda: model(x).mean().requires_grad_()):
        assert math.isfinite(opt.step(closure))
    assert opt.steps == 4


@pytest.mark.parametrize("groups", [1, 2])
def test_fast_backend_in_the_optimizer_equals_mezo_step_with_it(groups):
    """backend= takes fast/'s Triton backend (interpreter on a CPU); the numbers are mezo_step's with that backend."""
    fast = pytest.importorskip("mezo.fast")
    ours, ref = mlp([7, 33, 5], torch.float32), mlp([7, 33, 5], torch.float32)
    two = [dict(params=ours[0].parameters()), dict(params=ours[2].parameters(), lr=0.02)]
    opt = mezo.MeZO(two if groups == 2 else ours.parameters(), lr=0.05, seed=5, backend=fast.TritonBackend())
    lrs = [0.05] * 2 + [0.02] * 2 if groups == 2 else 0.05
    params, backend = mezo.make_trainables([(f"{i}", p) for i, p in enumerate(ref.parameters())]), fast.TritonBackend()
    loss_ours, loss_ref = regression_loss(ours), regression_loss(ref)
    for t in range(1, 4):
        got = opt.step(loss_ours)
        samples = mezo.mezo_step(params, lambda: loss_ref().item(), [mezo.step_seed(5, t, 0)], 1e-3, lrs, 0.0, backend)
        assert got == runs.step_record(samples, 0.05)["loss"]
        assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), ref.parameters()))


def test_a_mezo_with_nothing_to_train_is_one_error_not_a_step_that_changes_nothing():
    """Every parameter frozen (a LoRA model whose adapters were never unfrozen): step() refuses in one line rather
    than return a loss and leave the model as it was; once one is unfrozen, the same optimizer steps it."""
    model = torch.nn.Linear(4, 2)
    model.requires_grad_(False)
    opt = mezo.MeZO(model.parameters(), lr=1e-2)
    x = torch.randn(8, 4)
    with pytest.raises(ValueError, match=r"none of MeZO's parameters requires grad: nothing to train"):
        opt.step(lambda: model(x).pow(2).mean())
    model.weight.requires_grad_(True)
    before = model.weight.clone()
    opt.step(lambda: model(x).pow(2).mean())
    assert not torch.equal(model.weight, before) and opt.steps == 1
