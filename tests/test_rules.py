"""--rule momentum / adam / sign / conservative (rules.py) against plain float64 implementations that materialise
z; the same rules through mezo_step on fast/'s backends and in mezo.MeZO; resumed and replayed runs bit for bit;
and the refusals."""
import math
import os

import pytest
import torch
from conftest import expect_error, records, run, tiny_args, z_of
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import mezo
from mezo import checkpoints, rules

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# θ stored once in its dtype, unit roundoff u = 2^-24, 2^-53, 2^-8, 2^-11: the halves' TOL
# is 2.6u (bfloat16) and 4u (float16); float32's 170u, float64's 9000u cover z's sums
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def make_params(shapes, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    named = [(f"t{i}", torch.randn(shape, generator=gen).to(dtype)) for i, shape in enumerate(shapes)]
    return mezo.make_trainables(named)


def plain_estimate(params, theta64, samples, wd):
    """ĝ per tensor in float64, z materialised whole."""
    n = len(samples)
    return [sum(s["projected_grad"] / n * z_of(p, s["seed"]).double() for s in samples)
            + (wd if p.decay else 0.0) * t for p, t in zip(params, theta64)]


shapes_st = st.lists(st.sampled_from([(3,), (5, 4), (2, 3, 4), (70_000,), (1, 1)]), min_size=1, max_size=3)


@settings(max_examples=25, deadline=None)
@given(shapes=shapes_st, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**63 - 1),
       beta=st.floats(0.0, 0.99), n=st.integers(1, 3), wd=st.sampled_from([0.0, 0.1]),
       name=st.sampled_from(["momentum", "adam"]), lr=st.sampled_from([1e-3, 0.05]))
def test_momentum_and_adam_follow_their_formulas_over_steps(shapes, dtype, seed, beta, n, wd, name, lr):
    """K = 3 steps of the rule against float64 buffers and updates computed from the same θ each step (θ is stored
    in its dtype, so each step starts from the rule's own rounded θ); the buffers are carried in float64."""
    params = make_params(shapes, dtype, seed % 1000)
    rule = rules.make(name, beta)
    m = [torch.zeros(p.tensor.shape, dtype=torch.float64) for p in params]
    v = [torch.zeros(p.tensor.shape, dtype=torch.float64) for p in params]
    gen = torch.Generator().manual_seed(seed % 997)
    for step in range(1, 4):
        samples = [dict(seed=mezo.step_seed(seed, step, k), projected_grad=float(torch.randn(1, generator=gen)))
                   for k in range(n)]
        theta64 = [p.tensor.double().clone() for p in params]
        g = plain_estimate(params, theta64, samples, wd)
        rule.update(params, samples, mezo.rate_groups(params, lr, wd), mezo.TorchBackend(), None)
        for i, p in enumerate(params):
            if name == "momentum":
                m[i] = beta * m[i] + g[i]
                want = theta64[i] - lr * m[i]
            else:
                m[i] = beta * m[i] + (1 - beta) * g[i]
                v[i] = rules.BETA2 * v[i] + (1 - rules.BETA2) * g[i] ** 2
                mhat, vhat = m[i] / (1 - beta ** step), v[i] / (1 - rules.BETA2 ** step)
                want = theta64[i] - lr * mhat / (vhat.sqrt() + rules.DELTA)
            scale = max(1.0, float(want.abs().max()))
            # one rounding of θ to dtype: TOL (derived there), relative to max(1, |θ|)
            torch.testing.assert_close(p.tensor.double(), want, rtol=TOL[dtype], atol=TOL[dtype] * scale)
            buf = rule.state(params)[f"m:{p.name}"].double()
            # m is float32, ĝ summed in float32: 3 steps × a few ulps (6e-8): 1e-5 relative
            torch.testing.assert_close(buf, m[i], rtol=1e-5, atol=1e-6 * max(1.0, float(m[i].abs().max())))
    assert int(rule.state(params)["t"]) == 3


@settings(max_examples=25, deadline=None)
@given(shapes=shapes_st, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**63 - 1), n=st.integers(1, 3),
       wd=st.sampled_from([0.0, 0.1]), lr=st.sampled_from([1e-3, 0.05]))
def test_sign_moves_by_the_signs_of_the_projected_gradients(shapes, dtype, seed, n, wd, lr):
    params = make_params(shapes, dtype, seed % 1000)
    gen = torch.Generator().manual_seed(seed % 991)
    samples = [dict(seed=mezo.step_seed(seed, 1, k), projected_grad=float(torch.randn(1, generator=gen)) * 100)
               for k in range(n)]
    theta64 = [p.tensor.double().clone() for p in params]
    signs = [dict(s, projected_grad=math.copysign(1.0, s["projected_grad"])) for s in samples]
    g = plain_estimate(params, theta64, signs, wd)
    rules.make("sign").update(params, samples, mezo.rate_groups(params, lr, wd), mezo.TorchBackend(), None)
    for p, t, gi in zip(params, theta64, g):
        want = t - lr * gi
        # one rounding of θ to dtype: TOL is a few ulps of each dtype, relative to max(1, |θ|)
        torch.testing.assert_close(p.tensor.double(), want, rtol=TOL[dtype], atol=TOL[dtype] * max(1.0, float(
            want.abs().max())))
    assert all(s["projected_grad"] != 1.0 for s in samples)  # the caller's samples are left as they were


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**63 - 1), n=st.integers(1, 2), wd=st.sampled_from([0.0, 0.1]),
       centre=st.sampled_from([-1.0, 0.0, 1.0]), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_conservative_keeps_the_lowest_of_three_candidates(seed, n, wd, centre, dtype):
    """The loss (a quadratic) at θ, θ − lr·ĝ and θ + lr·ĝ in float64; the rule ends at the argmin, tensors equal to
    that candidate computed plainly, and it used three forwards."""
    params = make_params([(4, 3), (5,)], dtype, seed % 1000)
    target = [torch.full(p.tensor.shape, centre, dtype=torch.float64) for p in params]
    calls = []

    def loss_fn():
        calls.append(1)
        return float(sum(((p.tensor.double() - c) ** 2).sum() for p, c in zip(params, target)))

    lr = 0.05
    samples = [dict(seed=mezo.step_seed(seed, 1, k), projected_grad=float(k + 1) * (-1) ** (seed % 2))
               for k in range(n)]
    theta64 = [p.tensor.double().clone() for p in params]
    g = plain_estimate(params, theta64, samples, wd)
    candidates = [theta64, [t - lr * gi for t, gi in zip(theta64, g)], [t + lr * gi for t, gi in zip(theta64, g)]]
    losses = [float(sum(((x.to(dtype).double() - c) ** 2).sum() for x, c in zip(cand, target)))
              for cand in candidates]
    rules.make("conservative").update(params, samples, mezo.rate_groups(params, lr, wd), mezo.TorchBackend(),
                                      loss_fn)
    best = min(range(3), key=lambda i: (losses[i], i))
    assert len(calls) == 3 and samples[0]["kept"] == ("stay", "minus", "plus")[best]
    for p, want in zip(params, candidates[best]):
        # the kept candidate is θ ± εz rounded once to dtype: within TOL (a few ulps of each dtype)
        torch.testing.assert_close(p.tensor.double(), want, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.fixture(scope="module")
def compiled():
    from mezo.fast import compiled as c
    made = c.compiled_backend()  # compiled once a process (its windows are cached)
    if not isinstance(made, c.CompiledBackend):
        pytest.skip("compiled_backend() fell back to the reference here (its line on stderr says why: no C++ "
                    "toolchain, or torch < 2.13 after a compiling thread ended)")
    return made


def _trajectory(backend, name, dtype=torch.float32, n=1, wd=0.0, steps=3):
    params = make_params([(64, 8), (8,), (3, 5)], dtype, 0)
    rule = rules.make(name, 0.8)
    weights = [torch.linspace(-1, 1, p.tensor.numel()).view(p.tensor.shape) for p in params]
    loss_fn = lambda: float(sum((p.tensor.float() * w).sum() ** 2 for p, w in zip(params, weights)))
    logs = [mezo.mezo_step(params, loss_fn, [mezo.step_seed(5, t, k) for k in range(n)], 1e-2, 0.02, wd, backend,
                           rule=rule) for t in range(1, steps + 1)]
    return [p.tensor.clone() for p in params], rule.state(params), logs


@pytest.mark.parametrize("name", rules.RULES)
def test_each_rule_on_the_triton_kernels_follows_the_reference(name):
    """fast/'s Triton backend (the interpreter on a CPU) under each rule. Its z is the reference's within 1e-6
    (Triton's own sin/cos/log; tests/test_fast.py), so the trajectory follows the reference's within that: tensors,
    buffers and losses, over 3 steps, to a relative 1e-4 (float32) and 2 % (bfloat16)."""
    pytest.importorskip("triton")
    from mezo import fast
    for dtype, n, wd, tol in ((torch.float32, 1, 0.0, 1e-4), (torch.bfloat16, 2, 0.1, 2e-2)):
        ref = _trajectory(mezo.TorchBackend(), name, dtype, n, wd)
        got = _trajectory(fast.TritonBackend(), name, dtype, n, wd)
        for a, b in zip(ref[0], got[0]):
            # z within 1e-6 (≈ 2 ulps of |z| ≤ 5.7) feeds every step: the docstring's tol
            torch.testing.assert_close(b.double(), a.double(), rtol=tol, atol=tol * float(a.abs().max()))
        assert ref[1].keys() == got[1].keys()
        for k in ref[1]:
            # buffers: the same float32 ĝ up to the 1e-6 of z, relative to max(1, |buffer|)
            torch.testing.assert_close(got[1][k].double(), ref[1][k].double(), rtol=tol,
                                       atol=tol * max(1.0, float(ref[1][k].double().abs().max())))
        for r, g in zip(ref[2], got[2]):
            # losses at θ moved by the tensors' differences above: the same relative tol
            assert [x["loss_plus"] for x in g] == pytest.approx([x["loss_plus"] for x in r], rel=tol)
        start = make_params([(64, 8), (8,), (3, 5)], dtype, 0)
        assert any(not torch.equal(a, p.tensor) for a, p in zip(ref[0], start)) or name == "conservative"


def _lora_like_and_shards(dtype, device):
    """Tensors that share one of the Triton backend's runs (consecutive, same weight-decay rule: LoRA's A and B),
    then two tp/ shards: a rowwise weight's columns 5..9 (one stretch per row) and a colwise weight's rows 3..5."""
    gen = torch.Generator().manual_seed(7)
    rand = lambda *shape: torch.randn(shape, generator=gen).to(dtype).to(device)
    lora = mezo.make_trainables([("a", rand(4, 8)), ("b", rand(8, 3)), ("norm", rand(5)), ("c", rand(2, 7))])
    return [lora, [mezo.Trainable("row", rand(6, 5), 1000, True, (6, 10), (0, 5)),
                   mezo.Trainable("col", rand(3, 4), 1067, True, (6, 4), (3, 0))]]


INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="CPU kernels need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(),
                                                  reason="no CUDA GPU (or TRITON_INTERPRET=1)"))])
@pytest.mark.parametrize("name", ["momentum", "adam"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_rule_update_is_one_pass_and_follows_the_reference(name, dtype, device, monkeypatch):
    """TritonBackend.rule_update, the buffer and θ update in one kernel with z made inside it (the reference's
    noise is never called): 2 samples, weight decay, over tensors that share a run (their buffers must lie side
    by side, each tensor's a view that its checkpoint reads), over tp/ shards, and across a state saved after step 2
    and loaded into a fresh rule. Against the reference rule over 3 steps: tensors and buffers to 1e-4 (float32),
    2 % (bfloat16)."""
    pytest.importorskip("triton")
    from mezo import fast
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for ref_params, got_params in zip(_lora_like_and_shards(dtype, device), _lora_like_and_shards(dtype, device)):
        ref, got, backend = rules.make(name, 0.8), rules.make(name, 0.8), fast.TritonBackend()
        for step in range(1, 4):
            samples = [dict(seed=mezo.step_seed(3, step, k), projected_grad=(-1.5) ** (step + k)) for k in range(2)]
            ref.update(ref_params, samples, mezo.rate_groups(ref_params, 0.02, 0.1), mezo.TorchBackend(), None)
            if step == 3:  # a resumed run: the buffers come back as separate tensors and are laid side by side again
                state, got = got.state(got_params), rules.make(name, 0.8)
                got.load(state, got_params)
            with monkeypatch.context() as patch:
                patch.setattr(mezo, "noise_chunks", lambda *a: pytest.fail("z made outside the kernel"))
                got.update(got_params, samples, mezo.rate_groups(got_params, 0.02, 0.1), backend, None)
            for a, b in zip(ref_params, got_params):
                # θ: the kernel's z within 1e-6, one rounding to dtype (tol per dtype above)
                torch.testing.assert_close(b.tensor.double(), a.tensor.double(), rtol=tol,
                                           atol=tol * float(a.tensor.abs().max()))
            want, have = ref.state(ref_params), got.state(got_params)
            assert want.keys() == have.keys() and int(have["t"]) == step
            for k in want:
                # float32 buffers: the same ĝ up to the 1e-6 of z, relative to max(1, |buffer|)
                torch.testing.assert_close(have[k].double(), want[k].double(), rtol=tol,
                                           atol=tol * max(1.0, float(want[k].double().abs().max())))


@pytest.mark.parametrize("name", rules.RULES)
def test_each_rule_on_the_compiled_cpu_backend_equals_the_reference(name, compiled):
    for dtype, n, wd in ((torch.float32, 1, 0.1), (torch.float16, 2, 0.0)):
        ref = _trajectory(mezo.TorchBackend(), name, dtype, n, wd)
        got = _trajectory(compiled, name, dtype, n, wd)
        assert all(torch.equal(a, b) for a, b in zip(ref[0], got[0])), (name, dtype)
        assert all(torch.equal(ref[1][k], got[1][k]) for k in ref[1]) and ref[2] == got[2]


@pytest.mark.parametrize("name", rules.RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_restore_under_each_rule_starts_every_update_from_theta_exactly(name, dtype):
    """--exact-restore with a rule: each step's update is the rule applied to θ exactly as the step found it (no
    ±ε drift), bit for bit: against the rule called alone on a copy of θ with the step's samples, 3 steps."""
    params, copy = (make_params([(64, 8), (8,), (3, 5)], dtype, 0) for _ in range(2))
    weights = [torch.linspace(-1, 1, p.tensor.numel()).view(p.tensor.shape) for p in params]
    loss_of = lambda ps: lambda: float(sum((p.tensor.float() * w).sum() ** 2 for p, w in zip(ps, weights)))
    rule, alone = rules.make(name, 0.8), rules.make(name, 0.8)
    backend = mezo.ExactRestore(mezo.TorchBackend())
    for t in range(1, 4):
        samples = mezo.mezo_step(params, loss_of(params), [mezo.step_seed(5, t, 0)], 1e-2, 0.02, 0.1, backend,
                                 rule=rule)
        alone.update(copy, [{k: v for k, v in s.items() if k in ("seed", "projected_grad")} for s in samples],
                     mezo.rate_groups(copy, 0.02, 0.1), mezo.TorchBackend(), loss_of(copy))
        assert all(torch.equal(a.tensor, b.tensor) for a, b in zip(params, copy)), (name, t)


def test_the_optimizer_takes_a_rule_and_its_state_resumes_the_same_trajectory():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    loss = lambda m: torch.nn.functional.mse_loss(m(x), y)
    import copy
    other = copy.deepcopy(model)
    opt = mezo.MeZO(model.parameters(), lr=1e-2, seed=3, rule=rules.make("adam", 0.9))
    for _ in range(3):
        opt.step(lambda: loss(model))
    state = opt.state_dict()
    assert set(state["mezo"]["rule"]) == {"m:0.0", "m:0.1", "m:0.2", "m:0.3", "v:0.0", "v:0.1", "v:0.2", "v:0.3", "t"}
    # the same 3 steps by mezo_step with the same rule, then the state carried into a fresh optimizer
    rule = rules.make("adam", 0.9)
    params = mezo.make_trainables([(f"0.{i}", p) for i, p in enumerate(other.parameters())])
    for t in range(1, 4):
        mezo.mezo_step(params, lambda: float(loss(other)), [mezo.step_seed(3, t, 0)], 1e-3, 1e-2, 0.0, rule=rule)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
    resumed = mezo.MeZO(other.parameters(), lr=1e-2, seed=0, rule=rules.make("adam", 0.9))
    resumed.load_state_dict(state)
    for _ in range(2):
        opt.step(lambda: loss(model))
        resumed.step(lambda: loss(other))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
    with pytest.raises(ValueError, match="another --rule"):
        mezo.MeZO(other.parameters(), rule=rules.make("momentum")).load_state_dict(
            mezo.MeZO(other.parameters()).state_dict())
    # the same number of parameters, of other shapes: the buffers are refused at the load, not at the next step
    wider = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    with pytest.raises(ValueError, match=r"the saved buffer m:0.0 has shape \(4, 6\) and the parameter \(5, 6\): "
                                         r"the state was saved for other parameters"):
        (fresh := mezo.MeZO(wider.parameters(), rule=rules.make("adam", 0.9))).load_state_dict(state)
    assert fresh.steps == 0 and fresh.rule.t == 0 and not fresh.rule.buffers  # and nothing of it was loaded


def _tensors(folder):
    return load_file(folder / checkpoints.CHECKPOINT)


@pytest.mark.parametrize("name", rules.RULES)
def test_a_resumed_run_and_a_replay_follow_the_unbroken_run_bit_for_bit(name, model_dir, tmp_path, capsys):
    """6 steps straight; 3 steps, then --resume to 6; and the straight run's log replayed to 6 (buffers rebuilt
    too). The checkpoints, buffers included, are equal."""
    straight, broken, replayed = tmp_path / "straight", tmp_path / "broken", tmp_path / "replayed"
    flags = ["--rule", name, "--weight-decay", "0.1"]
    assert run(tiny_args(model_dir, straight, steps=6) + flags, capsys)[0] == 0
    assert run(tiny_args(model_dir, broken, steps=3) + flags, capsys)[0] == 0
    assert run(["--resume", broken, "--steps", 6], capsys)[0] == 0
    code, _, err = run(["--replay", straight, "--out", replayed], capsys)
    assert code == 0, err
    a = _tensors(straight)
    assert (any(k.startswith("rule.m:") for k in a) and "rule.t" in a) == (name in ("momentum", "adam"))
    for other in (broken, replayed):
        b = _tensors(other)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (name, other)
    steps = [r for r in records(straight) if "seed" in r]
    if name == "conservative":
        assert all(r["kept"] in ("stay", "minus", "plus") and len(r["candidate_losses"]) == 3 for r in steps)


def test_conservative_counts_five_forwards_a_step(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(tiny_args(model_dir, out, steps=4, eval_every=0) + ["--rule", "conservative"], capsys)[0] == 0
    import json
    assert json.loads((out / "summary.json").read_text())["forwards"] == 5 * 4


def test_rule_refusals_are_one_line(model_dir, tmp_path, capsys):
    expect_error(capsys, tiny_args(model_dir, tmp_path / "a", optimizer="adam", rule="momentum"),
                 r"--rule momentum is a zeroth-order update rule; --optimizer adam is the first-order baseline")
    expect_error(capsys, tiny_args(model_dir, tmp_path / "b", rule="nesterov"), r"--rule")
    sgd = tmp_path / "sgd"
    assert run(tiny_args(model_dir, sgd, steps=2), capsys)[0] == 0
    expect_error(capsys, ["--resume", sgd, "--steps", 4, "--rule", "adam"],
                 r"trained with --rule sgd; resume it with the same rule")
    with pytest.raises(ValueError, match="0 <= beta < 1"):
        rules.make("momentum", 1.0)
