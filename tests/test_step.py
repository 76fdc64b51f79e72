"""The MeZO step: perturb/restore, the projected gradient against autograd, unbiasedness, n samples."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import load_tiny, z_of
from hypothesis import given
from hypothesis import strategies as st
from mezo.tasks import prompts

import mezo
from mezo import models

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float64: 2.0**-53}


def _params(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return mezo.make_trainables([(f"w{i}", nn.Parameter((torch.randn(s, generator=g) * 0.5).to(dtype)))
                                 for i, s in enumerate(shapes)])


shapes_st = st.lists(st.lists(st.integers(1, 37), min_size=1, max_size=3).map(tuple), min_size=1, max_size=4)
dtype_st = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


@given(shapes=shapes_st, dtype=dtype_st, seed=st.integers(0, 2**63 - 1), eps=st.floats(1e-5, 1e-1))
def test_perturb_then_unperturb_returns_within_rounding(shapes, dtype, seed, eps):
    """+ε then −ε: each of the two in-place updates rounds once to the storage dtype, an error of at most
    half an ulp of its result; so |θ' − θ| ≤ 2·u·(|θ| + ε|z|) elementwise, u the unit roundoff."""
    params = _params(shapes, dtype)
    before = [p.tensor.detach().clone() for p in params]
    backend = mezo.TorchBackend()
    backend.perturb(params, seed, +eps)
    backend.perturb(params, seed, -eps)
    u = UNIT_ROUNDOFF[dtype]
    for p, b in zip(params, before):
        z = z_of(p, seed)
        bound = 2 * u * (b.double().abs() + eps * z.double().abs())
        err = (p.tensor.double() - b.double()).abs()
        assert (err <= bound + 1e-30).all(), f"{p.name}: error {err.max()} > bound at {(err - bound).argmax()}"


@given(dtype=dtype_st, seed=st.integers(0, 1000), steps=st.integers(1, 8))
def test_steps_with_lr_zero_return_within_rounding(dtype, seed, steps):
    """A step with lr = 0 is +ε, −2ε, +ε and an exact no-op update: three roundings per step, so after K
    steps |θ' − θ| ≤ 3K·u·(|θ| + 2ε|z|max)."""
    params = _params([(13, 7), (5,)], dtype, seed)
    before = [p.tensor.detach().clone() for p in params]
    eps = 1e-3
    loss_fn = lambda: sum(float(p.tensor.float().square().sum()) for p in params)
    for t in range(steps):
        mezo.mezo_step(params, loss_fn, [mezo.step_seed(seed, t, 0)], eps, lr=0.0, weight_decay=0.1)
    u = UNIT_ROUNDOFF[dtype]
    for p, b in zip(params, before):
        zmax = max(z_of(p, mezo.step_seed(seed, t, 0)).abs().max().item() for t in range(steps))
        bound = 3 * steps * u * (b.double().abs() + 2 * eps * zmax)
        err = (p.tensor.double() - b.double()).abs()
        assert (err <= bound).all(), f"{p.name}: {err.max()} > {bound.min()}"


def test_lr_zero_update_is_bit_exact_in_float32():
    params = _params([(31, 3)], torch.float32)
    before = params[0].tensor.detach().clone()
    mezo.TorchBackend().update(params, 123, projected_grad=5.0, lr=0.0, weight_decay=0.5)
    assert torch.equal(params[0].tensor, before)


# --- the projected gradient is the directional derivative ∇L·z -------------------------------------------


def _linear():
    torch.manual_seed(0)
    model = nn.Linear(6, 3).double()
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
    return list(model.named_parameters()), lambda: F.mse_loss(model(x), y)


def _mlp():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    return list(model.named_parameters()), lambda: F.cross_entropy(model(x), y)


def _tiny(kind, mode):
    def build(model_dir):
        cfg, model, tok, params, forward = load_tiny(model_dir, kind, mode=mode, top_layers=0)
        model.double()
        if mode == "lora":  # B = 0 makes ∇_A L vanish; give B values so every direction counts
            with torch.no_grad():
                for p in params:
                    if p.name.endswith("lora_B"):
                        p.tensor.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
        sents = ["the movie was great .", "a dull film .", "what a superb story !", "the plot is bad ."]
        kind_ = models.model_kind(model)
        ex = [dict(zip(("ids", "position"), prompts.encode(tok, s, cfg.template, kind_, 64)), label=i % 2)
              for i, s in enumerate(sents)]
        batch = prompts.collate(ex, 0)
        return [(p.name, p.tensor) for p in params], lambda: F.cross_entropy(forward(batch).double(), batch["labels"])
    return build


# Each model with the ε where the ε² term dominates: small enough that εz (|z| ~ sqrt(d)) stays a small
# step, large enough that rounding stays below it (Llama's RMSNorm computes in float32 even in a float64
# model, which puts a floor of ~1e-8/ε under its differences).
MODELS = {"linear": (lambda d: _linear(), 1e-2), "mlp": (lambda d: _mlp(), 1e-2),
          "roberta-lora": (_tiny("roberta", "lora"), 1e-2), "roberta-full": (_tiny("roberta", "full"), 1e-3),
          "llama-lora": (_tiny("llama", "lora"), 1e-2), "llama-full": (_tiny("llama", "full"), 1e-3)}


def _projected_grad_and_autograd(named, loss_t, seed, eps):
    params = mezo.make_trainables(named)
    samples = mezo.mezo_step(params, lambda: loss_t().item(), [seed], eps, lr=0.0, weight_decay=0.0)
    with torch.enable_grad():
        for _, t in named:
            t.requires_grad_(True)
            t.grad = None
        loss_t().backward()
    directional = sum((p.tensor.grad.double() * z_of(p, seed).double()).sum().item() for p in params)
    return samples[0]["projected_grad"], directional


@pytest.mark.parametrize("name", list(MODELS))
def test_projected_grad_is_the_directional_derivative(name, model_dir):
    """Central differences: g - ∇L·z = ε²/6 · (third derivative along z) + O(ε^4): halving ε quarters the error."""
    build, eps = MODELS[name]
    named, loss_t = build(model_dir)
    errors = []
    for e in (eps, eps / 2):
        g, dd = _projected_grad_and_autograd(named, loss_t, seed=2024, eps=e)
        # |∇L·z| this small would make the relative bounds below meaningless
        assert abs(dd) > 1e-6, "degenerate direction"
        errors.append(abs(g - dd))
    # central differences err by ε²/6·L'''(z): under 1% of ∇L·z at MODELS' ε
    assert errors[1] <= 1e-2 * abs(dd), f"{name}: g={g} vs ∇L·z={dd} at eps={eps / 2}"
    if name == "linear":  # a quadratic loss: central differences are exact up to rounding
        # quadratic: exact but for float64 rounding of L± (ulps of |L|) over 2ε, ≪ 1e-12
        assert max(errors) < 1e-12 * max(1.0, abs(dd)), errors
    else:
        assert 0.15 < errors[1] / errors[0] < 0.35, f"{name}: error ratio {errors[1] / errors[0]}, not O(eps^2)"


def test_projected_grad_times_z_is_unbiased():
    """E[(∇L·z) z] = ∇L for z ~ N(0, I). Averaged over N fixed seeds the estimate is within 5 standard
    errors (se_i² = (|∇L|² + ∇L_i²)/N) of the autograd gradient, and a wrong estimator is not."""
    named, loss_t = _mlp()
    named = named[2:]  # the output layer: 51 values keep N large enough within seconds
    params = mezo.make_trainables(named)
    with torch.enable_grad():
        loss_t().backward()
    grad = torch.cat([p.tensor.grad.flatten() for p in params])
    n = 1500
    total = torch.zeros_like(grad)
    for k in range(n):
        seed = mezo.step_seed(77, k, 0)
        (s,) = mezo.mezo_step(params, lambda: loss_t().item(), [seed], 1e-4, lr=0.0, weight_decay=0.0)
        total += s["projected_grad"] * torch.cat([z_of(p, seed).flatten().double() for p in params])
    estimate = total / n
    se = ((grad.square().sum() + grad.square()) / n).sqrt()
    z_scores = (estimate - grad) / se
    assert z_scores.abs().max() < 5, f"max |z-score| {z_scores.abs().max():.2f} at {z_scores.abs().argmax()}"
    cos = F.cosine_similarity(estimate, grad, dim=0).item()
    assert cos > 0.8, cos


@given(n=st.integers(2, 4), wd=st.sampled_from([0.0, 0.1]), seed=st.integers(0, 2**40))
def test_n_sample_step_is_the_mean_of_single_estimates(n, wd, seed):
    """Algorithm 2: θ ← θ − lr·(mean_k g_k z_k + wd·θ), each g_k measured at the same θ."""
    named, loss_t = _mlp()
    params = mezo.make_trainables(named)
    theta0 = [p.tensor.detach().clone() for p in params]
    seeds = [mezo.step_seed(seed, 1, k) for k in range(n)]
    singles = []
    for s in seeds:  # one-sample estimates at θ0, restoring θ0 exactly between them
        (r,) = mezo.mezo_step(params, lambda: loss_t().item(), [s], 1e-3, lr=0.0, weight_decay=0.0)
        singles.append(r["projected_grad"])
        for p, t in zip(params, theta0):
            p.tensor.data.copy_(t)
    lr = 0.05
    samples = mezo.mezo_step(params, lambda: loss_t().item(), seeds, 1e-3, lr=lr, weight_decay=wd)
    # float64 L± at θ ± εz, θ restored up to ulps: ΔL/2ε within 1e-9 relative
    assert [s["projected_grad"] for s in samples] == pytest.approx(singles, rel=1e-9, abs=1e-12)
    for p, t in zip(params, theta0):
        step = sum(g * z_of(p, s).double() for g, s in zip(singles, seeds)) / n
        want = t - lr * (step + (wd if p.decay else 0.0) * t)
        # float64: n·3 ±ε passes and an update round θ (|θ| = O(1)) by ~1e-16 each: ≪ 1e-12
        assert torch.allclose(p.tensor, want, rtol=0, atol=1e-12), p.name


def test_weight_decay_skips_biases_and_norm_weights(model_dir):
    cfg, model, tok, params, forward = load_tiny(model_dir, "llama", mode="full")
    by_name = {p.name: p for p in params}
    assert not by_name["model.norm.weight"].decay and not by_name["model.layers.0.input_layernorm.weight"].decay
    assert by_name["model.layers.0.self_attn.q_proj.weight"].decay
    bias = mezo.make_trainables([("b", nn.Parameter(torch.ones(5)))])
    mezo.TorchBackend().update(bias, 1, projected_grad=0.0, lr=1.0, weight_decay=0.5)
    assert torch.equal(bias[0].tensor, torch.ones(5))


def test_non_finite_loss_stops_the_step_and_restores():
    params = _params([(4, 4)], torch.float32)
    before = params[0].tensor.detach().clone()
    with pytest.raises(mezo.NonFiniteLoss):
        mezo.mezo_step(params, lambda: math.nan, [1], 1e-3, lr=1.0, weight_decay=0.0)
    # θ + εz then −εz in float32: 2 roundings of |θ| < 4 (2.4e-7 each) ≤ 5e-7 < 1e-6
    assert torch.allclose(params[0].tensor, before, atol=1e-6)


def test_float32_lora_over_a_bfloat16_model_does_not_drift(model_dir):
    """--lora-dtype float32: the LoRA tensors are float32 while the model is bfloat16, so K steps at lr = 0
    stay within float32's rounding bound, where bfloat16 LoRA tensors drift by bfloat16's."""
    def drift(lora_dtype):
        cfg, model, tok, params, forward = load_tiny(model_dir, "llama", dtype="bfloat16", lora_dtype=lora_dtype)
        with torch.no_grad():
            for p in params:  # a trained-looking adapter, so that B is not all zeros
                p.tensor.copy_(torch.randn(p.tensor.shape, generator=torch.Generator().manual_seed(1)) * 0.02)
        before = [p.tensor.detach().clone() for p in params]
        batch = prompts.collate([dict(zip(("ids", "position"), prompts.encode(tok, "the movie was great", cfg.template,
                                                                        "causal", 64)), label=1)], 0)
        loss_fn = lambda: F.cross_entropy(forward(batch), batch["labels"]).item()
        for t in range(10):
            mezo.mezo_step(params, loss_fn, [mezo.step_seed(0, t, 0)], 1e-3, lr=0.0, weight_decay=0.0)
        assert {p.tensor.dtype for p in params} == {mezo.DTYPES[lora_dtype]}
        return max(((p.tensor.double() - b.double()).abs().max() / b.double().abs().max()).item()
                   for p, b in zip(params, before))
    assert drift("float32") < 30 * 2.0**-24, drift("float32")  # 3 roundings a step, 10 steps
    assert drift("bfloat16") > 100 * drift("float32")


@given(dtype=dtype_st, seed=st.integers(0, 2**40), lr=st.floats(0, 1e-2), n=st.integers(1, 2),
       settle_at=st.integers(0, 3))
def test_deferred_passes_are_the_same_trajectory(dtype, seed, lr, n, settle_at):
    """fast.Fused holds the restore and the update back and makes them with the next step's +εz: over 4 steps
    (n samples each, θ read once in the middle as an evaluation would), the same losses and tensors bit for bit
    as the reference's four passes a step. Exact equality: the same roundings in the same order."""
    from mezo import fast

    runs = []
    for backend in (mezo.TorchBackend(), fast.Fused(mezo.TorchBackend())):
        params = _params([(9, 5), (7,)], dtype, seed)
        loss_fn = lambda: sum(float(p.tensor.float().sin().sum()) for p in params)
        losses, read = [], None
        for t in range(4):
            s = mezo.mezo_step(params, loss_fn, [mezo.step_seed(seed, t, k) for k in range(n)], 1e-3, lr, 0.1,
                               backend)
            losses.append([(x["loss_plus"], x["loss_minus"]) for x in s])
            if t == settle_at:
                backend.settle(params)
                read = [p.tensor.detach().clone() for p in params]
        backend.settle(params)
        runs.append((losses, read, [p.tensor.detach().clone() for p in params]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    assert all(torch.equal(a, b) for a, b in zip(runs[0][2], runs[1][2]))


@given(dtype=dtype_st, seed=st.integers(0, 2**40), steps=st.integers(1, 6), n=st.integers(1, 2))
def test_exact_restore_does_not_drift(dtype, seed, steps, n):
    """--exact-restore: at lr = 0 the tensors come back bit-for-bit after any number of steps, in every
    dtype; and L± are taken at round(θ ± εz), each one rounding away from θ."""
    params = _params([(13, 7), (5,)], dtype, seed)
    before = [p.tensor.detach().clone() for p in params]
    eps, seen = 1e-3, []
    loss_fn = lambda: seen.append([p.tensor.detach().clone() for p in params]) or 0.0
    backend = mezo.ExactRestore(mezo.TorchBackend())
    for t in range(steps):
        seeds = [mezo.step_seed(seed, t, k) for k in range(n)]
        mezo.mezo_step(params, loss_fn, seeds, eps, lr=0.0, weight_decay=0.1, backend=backend)
    for p, b in zip(params, before):
        assert torch.equal(p.tensor, b), f"{p.name} moved by {(p.tensor.double() - b.double()).abs().max()}"
    plus, minus = seen[0], seen[1]  # the first step's first sample
    for p, b, tp, tm in zip(params, before, plus, minus):
        z = z_of(p, mezo.step_seed(seed, 0, 0)).float()
        assert torch.equal(tp, (b.float() + eps * z).to(dtype)) and torch.equal(tm, (b.float() - eps * z).to(dtype))
    assert backend.saved is None  # nothing held between steps


def test_exact_restore_trains_like_the_reference():
    """The two modes differ only by roundings; in float64 (kept by the backend) their 5-step trajectories
    agree to 1e-9 with lr > 0, so the copy-and-restore bookkeeping changes nothing else."""
    out = []
    for backend in (mezo.TorchBackend(), mezo.ExactRestore(mezo.TorchBackend())):
        params = _params([(11, 6), (6,)], torch.float64, 3)
        loss_fn = lambda: sum(float(p.tensor.cos().sum()) for p in params)
        steps = [mezo.mezo_step(params, loss_fn, [mezo.step_seed(1, t, 0)], 1e-3, 1e-2, 0.1, backend)[0]
                 for t in range(5)]
        out.append(([s["projected_grad"] for s in steps], [p.tensor.clone() for p in params]))
    # float64: the modes differ by restore roundings (1e-16) over 2ε: ~1e-13; 1e-9
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-9)
    # tensors: 5 steps of lr·Δg·z with Δg ~1e-13 plus float64 roundings of θ: ≪ 1e-9
    assert all(torch.allclose(a, b, rtol=0, atol=1e-9) for a, b in zip(out[0][1], out[1][1]))
