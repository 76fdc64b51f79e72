"""fast/'s Triton kernels against the reference backend: the primitives on odd shapes, one step and a
K-step trajectory. On a CPU the kernels run in Triton's interpreter (MEZO_FAST=triton: `--fast` on a CPU is the
compiled backend otherwise, tests/test_compiled.py); with CUDA and TRITON_INTERPRET=0 they are compiled for the GPU."""
import json
import os

import pytest
import torch
from conftest import offset_st, shard_pair, shards_st, z_of
from hypothesis import given
from hypothesis import strategies as st

import mezo
from mezo import checkpoints

fast = pytest.importorskip("mezo.fast")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="CPU kernels need TRITON_INTERPRET=1")),
           pytest.param("cuda", marks=pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(),
                                                         reason="no CUDA GPU (or TRITON_INTERPRET=1)"))]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    """`--fast` in this file means the Triton kernels, on a CPU too (the interpreter)."""
    monkeypatch.setenv("MEZO_FAST", "triton")


def _pair(shapes, dtype, device, offset0, seed=0):
    """The same tensors twice, as Trainables whose global offsets start at offset0 (past 2^32 if drawn so)."""
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(s, generator=g).to(dtype).to(device) for s in shapes]
    out = []
    for _ in range(2):
        params, offset = [], offset0
        for i, t in enumerate(tensors):
            t = t.clone()
            params.append(mezo.Trainable(f"w{i}", t, offset, t.dim() >= 2, tuple(t.shape), (0,) * t.dim()))
            offset += t.numel()
        out.append(params)
    return out


def _check(ref, got, z_scale, before):
    """Each element within the rounding of its dtype plus the z difference (1e-6): and for low precision,
    almost every element bit-equal (a truncating cast would differ in about half)."""
    for r, g, b in zip(ref, got, before):
        u = UNIT_ROUNDOFF[r.tensor.dtype]
        diff = (r.tensor.double() - g.tensor.double()).abs()
        # one rounding a pass each side (≤ u·|θ| before or after); z within 1e-6, times |z_scale|
        bound = 2 * u * (b.double().abs() + r.tensor.double().abs()) + abs(z_scale) * 2e-6
        bad = (diff > bound).nonzero()
        assert bad.numel() == 0, f"{r.name} {r.tensor.dtype}: {diff.max()} > bound at {bad[0].tolist()}"
        if r.tensor.dtype != torch.float32:
            # a 1e-6 z difference flips a rounding only near a midpoint; truncation: ~half
            assert (diff > 0).float().mean() <= 0.01, f"{r.name}: {(diff > 0).float().mean():.3f} of elements differ"


shapes_st = st.lists(st.lists(st.integers(1, 61), min_size=1, max_size=3).map(tuple), min_size=1, max_size=4)
dtype_st = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


def _compare(shapes, dtype, device, offset0, reference, triton, z_scale):
    """Run reference(params) and triton(params) on the same tensors and check them against each other."""
    ref, got = _pair(shapes, dtype, device, offset0)
    before = [p.tensor.clone() for p in ref]
    reference(ref)
    triton(got)
    _check(ref, got, z_scale, before)


@pytest.mark.parametrize("device", DEVICES)
@given(shapes=shapes_st, dtype=dtype_st, seed=st.integers(0, 2**63 - 1), scale=st.floats(-1.0, 1.0),
       offset0=offset_st)
def test_perturb_kernel_matches_reference(device, shapes, dtype, seed, scale, offset0):
    _compare(shapes, dtype, device, offset0, lambda ps: mezo.TorchBackend().perturb(ps, seed, scale),
             lambda ps: fast.TritonBackend().perturb(ps, seed, scale), scale)


@pytest.mark.parametrize("device", DEVICES)
@given(shapes=shapes_st, dtype=dtype_st, seed=st.integers(0, 2**63 - 1), g=st.floats(-100, 100),
       lr=st.floats(0, 1e-2), wd=st.sampled_from([0.0, 0.1]), offset0=offset_st)
def test_update_kernel_matches_reference(device, shapes, dtype, seed, g, lr, wd, offset0):
    _compare(shapes, dtype, device, offset0, lambda ps: mezo.TorchBackend().update(ps, seed, g, lr, wd),
             lambda ps: fast.TritonBackend().update(ps, seed, g, lr, wd), g * lr)


@pytest.mark.parametrize("device", DEVICES)
@given(shapes=shapes_st, dtype=dtype_st, seed=st.integers(0, 2**63 - 1), g=st.floats(-100, 100),
       lr=st.floats(0, 1e-2), wd=st.sampled_from([0.0, 0.1]), offset0=offset_st)
def test_fused_restore_and_update_matches_reference(device, shapes, dtype, seed, g, lr, wd, offset0):
    """One pass of restore + update equals the reference's perturb(+ε) then update (two roundings)."""
    eps = 1e-3

    def reference(ps):
        mezo.TorchBackend().perturb(ps, seed, eps)
        mezo.TorchBackend().update(ps, seed, g, lr, wd)
    _compare(shapes, dtype, device, offset0, reference,
             lambda ps: fast.TritonBackend().restore_and_update(ps, seed, eps, g, lr, wd), eps + g * lr)


def test_small_tensors_share_one_buffer_and_launch(model_dir):
    """LoRA's tensors become views of one buffer in global-index order: one launch a pass; the model still
    reads them (its outputs follow the buffer)."""
    from conftest import load_tiny
    cfg, model, tok, params, forward = load_tiny(model_dir, "llama", mode="lora")
    backend = fast.TritonBackend()
    runs = backend.runs(params)
    assert len(runs) == 1 and runs[0][0].numel() == sum(p.tensor.numel() for p in params)
    flat = runs[0][0]
    for p in params:
        assert p.tensor.data_ptr() == flat.data_ptr() + p.offset * flat.element_size()
    assert backend.runs(params) is runs  # cached while the storage stays put
    lora_b = next(p for p in params if p.name.endswith("lora_B"))
    flat[lora_b.offset:lora_b.offset + lora_b.tensor.numel()] = 1.0
    assert lora_b.tensor.abs().min() == 1.0
    full = load_tiny(model_dir, "llama", mode="full")[3]  # small too: one launch per run of equal decay rule
    runs = backend.runs(full)
    assert len(runs) == 1 + sum(p.decay != q.decay for p, q in zip(full, full[1:]))
    big = mezo.make_trainables([("big", torch.zeros(3 << 20)), ("bias", torch.zeros(7))])
    ptr = big[0].tensor.data_ptr()
    assert len(backend.runs(big)) == 2 and big[0].tensor.data_ptr() == ptr  # large tensors are not moved
    assert len(backend.launches(big)) == 1  # ... but share the launch: one row each in its table


@pytest.mark.parametrize("device", DEVICES)
def test_one_launch_per_dtype_over_large_and_mixed_tensors(device):
    """Tensors of three dtypes (so not moved into one buffer, as large ones are not), unaligned offsets, decay
    and no decay: one launch per dtype, and each tensor ends as the reference leaves it (perturb, then the
    fused restore+update+next pass)."""
    g = torch.Generator().manual_seed(5)
    specs = [((110, 101), torch.float32), ((3,), torch.bfloat16), ((103, 11), torch.bfloat16),
             ((9, 1201), torch.float16), ((1025, 7), torch.float32), ((5,), torch.float32)]
    tensors = [torch.randn(shape, generator=g).to(dtype).to(device) for shape, dtype in specs]
    pairs = [mezo.make_trainables([(f"w{i}", t.clone()) for i, t in enumerate(tensors)]) for _ in range(2)]
    ref, got = pairs
    backend = fast.TritonBackend()
    assert len(backend.runs(got)) == len(specs) and len(backend.launches(got)) == 3
    before = [p.tensor.clone() for p in ref]
    reference = mezo.TorchBackend()
    for step in (lambda b, ps: b.perturb(ps, 11, 0.5),
                 lambda b, ps: (b.perturb(ps, 11, 1e-3), b.update(ps, 11, 3.0, 1e-2, 0.1), b.perturb(ps, 12, 1e-3))
                 if b is reference else b.restore_and_update(ps, 11, 1e-3, 3.0, 1e-2, 0.1, 12)):
        step(reference, ref)
        step(backend, got)
        # θ moved along z by 0.5, then ±ε twice (2e-3) and lr·g = 1e-2·3 (3e-2)
        _check(ref, got, 0.5 + 2e-3 + 3e-2, before)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_noise_is_the_reference_noise(device):
    """Perturbing zeros by 1 writes z itself: element by element, Triton's randn4x equals mezo.noise."""
    for offset in (0, 1, 2**33 + 3):
        t = torch.zeros(4099, device=device)
        p = mezo.Trainable("z", t, offset, False, (4099,), (0,))
        fast.TritonBackend().perturb([p], 77, 1.0)
        want = mezo.noise(77, torch.arange(offset, offset + 4099)).to(device)
        # Triton's log/cos vs ours: |z| ≤ √(−2 ln 1e-7) = 5.7, ulp 4.8e-7: 1e-6 ≈ 2 ulps
        assert (t - want).abs().max() <= 1e-6, (offset, (t - want).abs().max())


def _run(model_dir, out, flags, device, **kw):
    args = dict(device=device, task="synthetic", model=model_dir("llama"), template="{sentence} It was {mask}",
                label_words=" bad, good", k=8, batch_size=8, steps=5, eval_every=0, eval_max=0, lr=1e-2, out=out)
    args.update(kw)
    argv = [str(x) for k, v in args.items() for x in (f"--{k.replace('_', '-')}", v)]
    # both on the device: on the CPU, the interpreter's kernels against the reference; on a GPU, compiled ones
    argv += flags
    assert mezo.main(argv) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    from safetensors.torch import load_file
    return log, load_file(out / checkpoints.CHECKPOINT)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode,dtype,extra", [("lora", "float32", []), ("full", "float32", []),
                                              ("lora", "bfloat16", []), ("full", "bfloat16", ["--exact-restore"])])
def test_fast_trajectory_equals_the_reference(model_dir, tmp_path, device, mode, dtype, extra):
    """`--fast` against the reference over 5 steps (steps 1-4 carry the next step's +εz in the fused pass):
    every logged loss and projected gradient, and the final tensors, equal within float32 noise (z differs
    by ~1e-6, so bit-equality is not expected)."""
    ref_log, ref_t = _run(model_dir, tmp_path / "ref", extra, mode=mode, dtype=dtype, device=device)
    fast_log, fast_t = _run(model_dir, tmp_path / "fast", ["--fast"] + extra, mode=mode, dtype=dtype, device=device)
    # float32: Δz ≤ 1e-6 moves θ by (ε + lr|g|)·1e-6 a step ≪ 1e-5; bfloat16: ~5 u (2^-8)
    tol = 1e-5 if dtype == "float32" else 2e-2
    for r, f in zip(ref_log, fast_log):
        assert r["step"] == f["step"] and r.get("seed") == f.get("seed")
        for key in ("loss_plus", "loss_minus", "accuracy", "loss"):
            if key in r:
                assert f[key] == pytest.approx(r[key], rel=tol, abs=tol), (r["step"], key, r[key], f[key])
    for name in ref_t:
        assert torch.allclose(ref_t[name].float(), fast_t[name].float(), rtol=tol, atol=tol), name


def test_triton_on_cpu_without_the_interpreter_is_refused(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    argv = ["--task", "synthetic", "--model", model_dir("llama"), "--fast", "--device", "cpu", "--steps", "1",
            "--template", "{sentence} It was {mask}", "--label-words", " bad, good"]
    assert mezo.main(argv) == 2 and "MEZO_FAST=triton on a CPU runs Triton's interpreter" in capsys.readouterr().err
    monkeypatch.setenv("MEZO_FAST", "quick")
    assert mezo.main(argv) == 2 and "MEZO_FAST='quick': set it to compiled or triton" in capsys.readouterr().err


@pytest.mark.parametrize("device", DEVICES)
@given(shapes=shapes_st, dtype=dtype_st, seed=st.integers(0, 2**63 - 1), next_seed=st.integers(0, 2**63 - 1),
       g=st.floats(-100, 100), lr=st.floats(0, 1e-2), wd=st.sampled_from([0.0, 0.1]), offset0=offset_st)
def test_fused_restore_update_and_next_perturbation_matches_reference(device, shapes, dtype, seed, next_seed, g, lr,
                                                                      wd, offset0):
    """One pass of restore + update + the next step's +εz' equals the reference's three calls (three roundings)."""
    eps = 1e-3

    def reference(ps):
        mezo.TorchBackend().perturb(ps, seed, eps)
        mezo.TorchBackend().update(ps, seed, g, lr, wd)
        mezo.TorchBackend().perturb(ps, next_seed, eps)
    _compare(shapes, dtype, device, offset0, reference,
             lambda ps: fast.TritonBackend().restore_and_update(ps, seed, eps, g, lr, wd, next_seed),
             2 * eps + g * lr)


# Exact mode makes 4 launches a seed where the other kernels' tests make 1 to 3, and the interpreter's time is its
# programs (4,096 elements each): tensors of up to 29^3 elements, 6 programs, still span several and end mid-program
exact_shapes_st = st.lists(st.lists(st.integers(1, 29), min_size=1, max_size=3).map(tuple), min_size=1, max_size=4)


@pytest.mark.parametrize("device", DEVICES)
@given(shapes=exact_shapes_st, dtype=dtype_st, seeds=st.lists(st.integers(0, 2**63 - 1), min_size=2,
                                                              max_size=4),
       n=st.integers(1, 2), lr=st.sampled_from([0.0, 1e-2]), fuse=st.booleans(), offset0=offset_st)
def test_exact_mode_matches_exact_restore(device, shapes, dtype, seeds, n, lr, fuse, offset0):
    """TritonBackend(exact=True), which writes θ's copy in the first perturbation and reads it in the next
    passes, against mezo.ExactRestore(TorchBackend()) over steps of n samples (with `fuse`, under fast.Fused:
    the next step's +εz' rides on the update, as in training): the same tensors; at lr = 0, θ comes back bit for bit."""
    ref, got = _pair(shapes, dtype, device, offset0)
    before = [p.tensor.clone() for p in ref]
    steps = [seeds[i:i + n] for i in range(0, len(seeds), n)]
    seen = {}  # the tensors at every loss evaluation: θ ± εz must match too, not only where a step ends
    triton_backend = fast.TritonBackend(exact=True)
    if fuse:
        triton_backend = fast.Fused(triton_backend)
    for params, backend in ((ref, mezo.ExactRestore(mezo.TorchBackend())), (got, triton_backend)):
        losses = iter([1.0, 0.999] * len(seeds))  # fixed: both see the same projected gradients (0.5)
        seen[id(params)] = []

        def loss_fn(params=params, losses=losses):
            seen[id(params)].append([mezo.Trainable(p.name, p.tensor.clone(), 0, False, (), ()) for p in params])
            return next(losses)
        for step_seeds in steps:
            mezo.mezo_step(params, loss_fn, step_seeds, 1e-3, lr, 0.1, backend)
        backend.settle(params)
    for r, g in zip(seen[id(ref)], seen[id(got)], strict=True):
        # θ moved along z by ε and by lr·g = lr·0.5 for each seed
        _check(r, g, 1e-3 + lr * 0.5 * len(seeds), before)
    _check(ref, got, 1e-3 + lr * 0.5 * len(seeds), before)
    if lr == 0.0:
        for p, b in zip(got, before):
            assert torch.equal(p.tensor, b), p.name


@pytest.mark.parametrize("device", DEVICES)
@given(specs=shards_st(), dtype=dtype_st, seed=st.integers(0, 2**63 - 1), next_seed=st.integers(0, 2**63 - 1),
       g=st.floats(-100, 100), lr=st.floats(0, 1e-2))
def test_tensor_parallel_shards_match_reference(device, specs, dtype, seed, next_seed, g, lr):
    """On shards (tp/'s), each kernel against the reference, which maps a shard's elements to global indices
    with Trainable.global_index: +εz, −2εz, then the fused restore + update + next +εz'; and z itself."""
    ref, got = shard_pair(specs, dtype, device)
    before = [p.tensor.clone() for p in ref]
    eps, backend, reference = 1e-3, fast.TritonBackend(), mezo.TorchBackend()
    reference.perturb(ref, seed, eps)
    backend.perturb(got, seed, eps)
    # θ + εz: θ moved along z by ε
    _check(ref, got, eps, before)
    reference.perturb(ref, seed, -2 * eps)
    backend.perturb(got, seed, -2 * eps)
    # then θ − εz: moved by ε twice
    _check(ref, got, 2 * eps, before)
    reference.perturb(ref, seed, eps)
    reference.update(ref, seed, g, lr, 0.1)
    reference.perturb(ref, next_seed, eps)
    backend.restore_and_update(got, seed, eps, g, lr, 0.1, next_seed)
    # then restore, update and +εz': ε three times and lr·|g|
    _check(ref, got, 3 * eps + abs(g) * lr, before)
    zeros = [mezo.Trainable(p.name, torch.zeros_like(p.tensor, dtype=torch.float32), p.offset, p.decay,
                            p.full_shape, p.shard_start) for p in got]
    fast.TritonBackend().perturb(zeros, seed, 1.0)
    for p in zeros:
        # z itself: ≈ 2 float32 ulps of the largest |z| (5.7), as in test_kernel_noise_...
        assert (p.tensor - z_of(p, seed)).abs().max() <= 1e-6, p.name
