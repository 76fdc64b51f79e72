"""The noise is a pure function of (seed, global index), equal to Triton's own tl.randn4x."""
import math

import numpy as np
import pytest
import torch
from conftest import z_of
from hypothesis import given
from hypothesis import strategies as st

import mezo

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402


@triton.jit
def _triton_randn4x(z_ptr, word_ptr, u_ptr, seed, base, n, BLOCK: tl.constexpr):
    # Triton's own generator, element i taking output i % 4 of randn4x(seed, i // 4) as docs/design.md specifies.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    i = base + offs
    lane = i % 4
    n0, n1, n2, n3 = tl.randn4x(seed, i // 4)
    w0, w1, w2, w3 = tl.randint4x(seed, i // 4)
    u0, u1, u2, u3 = tl.rand4x(seed, i // 4)
    mask = offs < n
    tl.store(z_ptr + offs, tl.where(lane == 0, n0, tl.where(lane == 1, n1, tl.where(lane == 2, n2, n3))), mask=mask)
    tl.store(word_ptr + offs, tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3))), mask=mask)
    tl.store(u_ptr + offs, tl.where(lane == 0, u0, tl.where(lane == 1, u1, tl.where(lane == 2, u2, u3))), mask=mask)


def triton_noise(seed: int, base: int, n: int):
    z, words, u = torch.empty(n), torch.empty(n, dtype=torch.int32), torch.empty(n)
    block = 1 << max(4, (n - 1).bit_length())  # one program: the interpreter costs ~9 ms per program
    _triton_randn4x[(1,)](z, words, u, seed, base, n, BLOCK=block)
    return z, words.to(torch.int64) & mezo.MASK32, u


def reference_words_and_uniforms(seed: int, index: torch.Tensor):
    words = torch.stack(mezo.philox(seed, index >> 2), dim=1)[torch.arange(index.numel()), index & 3]
    return words, mezo.uniform(words)


@given(seed=st.integers(0, 2**63 - 1), base=st.one_of(st.integers(0, 10**6), st.integers(2**32 - 3000, 2**40)),
       n=st.integers(1, 3000))
def test_matches_triton_randn4x(seed, base, n):
    """Integer stream and uniforms bit-exact; z within 1e-6 (Triton's log/cos differ from ours by ulps)."""
    z_tri, words_tri, u_tri = triton_noise(seed, base, n)
    index = torch.arange(base, base + n)
    words, u = reference_words_and_uniforms(seed, index)
    bad = (words != words_tri).nonzero()
    assert bad.numel() == 0, f"word mismatch at index {base + bad[0].item()}: {words[bad[0]]} vs {words_tri[bad[0]]}"
    assert torch.equal(u, u_tri), f"uniforms differ at {(u != u_tri).nonzero()[:3].flatten().tolist()}"
    z = mezo.noise(seed, index)
    err = (z - z_tri).abs()
    # Triton's log/cos vs ours: |z| ≤ 5.7 has float32 ulp 4.8e-7, so 1e-6 ≈ 2 ulps of the largest z
    assert err.max() <= 1e-6 * max(1.0, z.abs().max().item()), f"z differs by {err.max()} at {base + err.argmax()}"


@given(seed=st.integers(0, 2**63 - 1), start=st.integers(0, 2**45), n=st.integers(1, 5000),
       chunk=st.integers(1, 4096), data=st.data())
def test_pure_function_of_seed_and_index(seed, start, n, chunk, data):
    """Chunking, order, and contiguous versus scattered indices change nothing: bit-exact."""
    index = torch.arange(start, start + n)
    z = mezo.noise(seed, index)
    old = mezo.NOISE_CHUNK
    try:
        mezo.NOISE_CHUNK = chunk
        assert torch.equal(mezo.noise(seed, index), z), "depends on chunk size"
    finally:
        mezo.NOISE_CHUNK = old
    perm = torch.from_numpy(np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).permutation(n))
    assert torch.equal(mezo.noise(seed, index[perm]), z[perm]), "depends on the order of the indices"
    cut = data.draw(st.integers(0, n))
    assert torch.equal(torch.cat([mezo.noise(seed, index[:cut]) if cut else torch.empty(0),
                                  mezo.noise(seed, index[cut:]) if cut < n else torch.empty(0)]), z)


def test_indices_past_2_32_use_the_high_counter_word():
    seed = 7
    low = mezo.noise(seed, torch.arange(0, 64))
    high = mezo.noise(seed, torch.arange(2**34, 2**34 + 64))  # counter 2^32: lo word 0, hi word 1
    assert not torch.allclose(low, high)
    assert torch.isfinite(mezo.noise(seed, torch.tensor([2**62 - 1]))).all()


def test_moments_of_a_large_draw():
    n = 2_000_000
    z = mezo.noise(12345, torch.arange(n)).double()
    se = 1 / math.sqrt(n)
    assert abs(z.mean().item()) < 5 * se, z.mean()
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2) * se, z.var()
    assert abs(((z - z.mean()) ** 4).mean().item() / z.var().item() ** 2 - 3) < 0.05  # Gaussian kurtosis
    other = mezo.noise(12346, torch.arange(n)).double()
    assert abs(torch.corrcoef(torch.stack([z, other]))[0, 1].item()) < 5 * se, "seeds are correlated"


def _tensors(dtype):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g).to(dtype) for shape in [(3, 5), (7,), (2, 3, 4), (1,), (40, 9)]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_independent_of_tensor_order_and_target_dtype(dtype):
    """A tensor's z is fixed by its global offset: visiting tensors in another order, or grouping them in
    other chunks, gives every element the same z; the target's dtype only changes the final rounding."""
    tensors = _tensors(dtype)
    params = mezo.make_trainables([(f"t{i}", t) for i, t in enumerate(tensors)])
    seen = {}
    for p, _, z in mezo.noise_chunks(params, seed=99):
        seen.setdefault(p.name, []).append(z)
    reordered = [params[i] for i in (4, 2, 0, 3, 1)]
    old = mezo.NOISE_CHUNK
    try:
        mezo.NOISE_CHUNK = 11  # many pieces, crossing tensor boundaries differently
        seen2 = {}
        for p, _, z in mezo.noise_chunks(reordered, seed=99):
            seen2.setdefault(p.name, []).append(z)
    finally:
        mezo.NOISE_CHUNK = old
    for p in params:
        whole = mezo.noise(99, torch.arange(p.offset, p.offset + p.tensor.numel()))
        assert torch.equal(torch.cat(seen[p.name]), whole), p.name
        assert torch.equal(torch.cat(seen2[p.name]), whole), p.name
        assert torch.equal(z_of(p, 99).flatten(), whole)


@given(full=st.lists(st.integers(1, 7), min_size=1, max_size=3), data=st.data())
def test_shard_global_index_is_its_slice_of_the_full_tensor(full, data):
    """A shard (as tensor parallelism makes) gets exactly its slice of the full tensor's z."""
    start = [data.draw(st.integers(0, f - 1)) for f in full]
    stop = [data.draw(st.integers(s + 1, f)) for s, f in zip(start, full)]
    full_z = mezo.noise(5, torch.arange(100, 100 + math.prod(full))).view(full)
    shard = torch.zeros([b - a for a, b in zip(start, stop)])
    p = mezo.Trainable("w", shard, offset=100, decay=True, full_shape=tuple(full), shard_start=tuple(start))
    want = full_z[tuple(slice(a, b) for a, b in zip(start, stop))]
    assert torch.equal(z_of(p, 5), want)


def test_step_seed_is_deterministic_distinct_and_in_range():
    seeds = {mezo.step_seed(s, t, k) for s in range(3) for t in range(200) for k in range(3)}
    assert len(seeds) == 3 * 200 * 3
    assert all(0 <= x < 2**63 for x in seeds)
    assert mezo.step_seed(1, 2, 0) == mezo.step_seed(1, 2, 0)


def test_negative_seed_is_refused():
    with pytest.raises(ValueError, match="seed"):
        mezo.noise(-1, torch.arange(4))


@pytest.mark.parametrize("chunk", [mezo.noise_chunk("cpu"), mezo.noise_chunk("cuda"), 7, 65537])
@pytest.mark.parametrize("start", [5, 2**33 + 3])
def test_the_noise_chunk_size_changes_no_number(chunk, start):
    """The chunk size is the device's choice (mezo.noise_chunk: 2^16 on a CPU, 2^24 on CUDA), never the
    numbers': chunked at each size, at odd offsets and lengths, z equals one single call, bit for bit (CPU
    tensors; a chunk as large as CUDA's makes the whole index in one call)."""
    n = mezo.NOISE_CHUNK + 4099
    if chunk < 64:
        n = 1001  # tiny chunks cost one torch call each: keep them few
    index = torch.arange(start, start + n)
    whole = mezo.noise(11, index, chunk=n)
    assert torch.equal(mezo.noise(11, index, chunk=chunk), whole), f"chunk {chunk} changes z"
    params = mezo.make_trainables([(f"t{i}", torch.zeros(s)) for i, s in enumerate((n // 3, 1, n - n // 3 - 1))])
    got = torch.cat([z for _, _, z in mezo.noise_chunks(params, 11, chunk=chunk)])
    assert torch.equal(got, mezo.noise(11, torch.arange(n), chunk=n)), f"noise_chunks at chunk {chunk}"


def test_noise_chunk_is_large_on_cuda_and_cache_sized_on_cpu():
    assert mezo.noise_chunk("cpu") == mezo.NOISE_CHUNK == 1 << 16
    assert mezo.noise_chunk("cuda") == mezo.noise_chunk(torch.device("cuda", 1)) == mezo.NOISE_CHUNK_CUDA == 1 << 24
