"""Step time against forward time: R = step / (2 x forward), for the noise/update backends in one run.

    python bench/step.py --sizes 135m --dtype float32     # CPU: the compiled backend against the reference
    python bench/step.py --device cuda --sizes 135m,1b    # GPU: compiled Triton kernels
    python bench/step.py --sizes tiny --modes lora --backends original,reference   # seconds, not minutes

(a) original: the original MeZO code's semantics (per tensor torch.manual_seed + torch.normal, out-of-place
    update), written as a backend object for mezo_step; (b) reference: mezo.TorchBackend; (c) fast:
    fast.TritonBackend, two passes over θ a step (−2εz; restore + update + the next step's +εz); "+exact"
    rows are --exact-restore (a copy of θ per step, no drift): mezo.ExactRestore around (b), and
    fast.TritonBackend(exact=True), which writes the copy and reads it in its fused passes; on a CPU, (d)
    compiled: fast.compiled (`--fast` there), the reference's numbers, two passes a step, and "+exact" around it.
Models are Llama shapes with random weights (speed does not depend on the weights);
    LoRA r=8 on q/v of every layer, or every parameter. Medians over --repeat steps after warm-up.
R near 1 means the step costs its two forwards and nothing else. Memory: peak of a step / peak of a forward
(GPU only; on a CPU see bench/memory.py). Perturbation: one θ += εz pass over the trainable tensors, as GB/s
(a read and a write of θ) and as a share of the device's memory bandwidth (--peak-gbs; known for H100 and
H200). The forwards at the default batch are launch-bound on a GPU: for realistic R also run, e.g.,
--batch-size 16 --seq-len 256 (the paper's batch of 16). Noise: elements of z a second for each backend's way of
making it, against torch.randn's (which makes other numbers: the yardstick, not a candidate).
"""
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _cli  # bench/_cli.py, beside this file: the shared command line

import mezo  # noqa: E402
from mezo import models  # noqa: E402

SIZES = {  # hidden, layers, heads, kv heads, intermediate (Llama shapes)
    "tiny": (256, 4, 4, 2, 704), "smol": (576, 8, 9, 3, 1536),
    "135m": (576, 30, 9, 3, 1536),  # SmolLM2-135M
    "1b": (2048, 22, 32, 4, 5632),  # TinyLlama-1.1B
}


PEAK_GBS = {"H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H200": 4800}  # memory bandwidth (NVIDIA's data sheets)


def peak_gbs(device_name: str) -> float | None:
    """The memory bandwidth of a known GPU, GB/s (None: unknown)."""
    return next((gbs for key, gbs in PEAK_GBS.items() if key in device_name), None)


class OriginalBackend:
    """The original MeZO code's noise and update: torch.manual_seed(seed), then one torch.normal per tensor in
    order, applied out of place (param.data = param.data + scale * z)."""

    name = "original"

    @torch.no_grad()
    def perturb(self, params, seed, scale):
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(0, 1, size=p.tensor.shape, device=p.tensor.device, dtype=p.tensor.dtype)
            p.tensor.data = p.tensor.data + scale * z

    @torch.no_grad()
    def update(self, params, seed, projected_grad, lr, weight_decay):
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(0, 1, size=p.tensor.shape, device=p.tensor.device, dtype=p.tensor.dtype)
            wd = weight_decay if p.decay else 0.0
            p.tensor.data = p.tensor.data - lr * (projected_grad * z + wd * p.tensor.data)


def build(size, mode, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    h, layers, heads, kv, inter = SIZES[size]
    smol = size == "135m"  # SmolLM2-135M itself: its vocabulary and tied embeddings, 134.5M values
    cfg = LlamaConfig(vocab_size=49152 if smol else 32000, hidden_size=h, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter,
                      tie_word_embeddings=smol)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.config.architectures = ["LlamaForCausalLM"]
    params = mezo.select_trainables(model, mezo.Config(mode=mode))
    return model, params


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device, repeat):
    times = []
    for i in range(repeat + 1):
        sync(device)
        t = time.perf_counter()
        fn(i)
        sync(device)
        if i:  # the first call warms up (compilation, allocator)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def noise_rates(repeat: int, window_noise, n: int = 1 << 22) -> None:
    """Elements of z a second: the reference's torch integer ops, the compiled window, the original code's
    torch.normal, and torch.randn, over n values in the reference's chunks."""
    chunk = mezo.NOISE_CHUNK
    ways = {"reference (mezo.noise)": lambda i: [mezo.noise(i, torch.arange(s, s + chunk)) for s in range(0, n, chunk)],
            "compiled (fast.compiled)": lambda i: [window_noise(i, s, chunk) for s in range(0, n, chunk)],
            "original (torch.normal)": lambda i: torch.normal(0, 1, size=(n,)),
            "torch.randn": lambda i: torch.randn(n)}
    rates = {name: n / median_time(fn, torch.device("cpu"), repeat) for name, fn in ways.items()}
    print(f"noise, {n:,} values, {torch.get_num_threads()} threads: " + "; ".join(
        f"{name} {rate / 1e6:.0f} M/s ({rate / rates['torch.randn']:.2f}x randn)" for name, rate in rates.items()))


def main():
    p = _cli.parser(__doc__)
    p.add_argument("--device", type=_cli.device, default="cpu")
    p.add_argument("--sizes", type=_cli.listed(str, list(SIZES)), default="tiny,smol",
                   help=f"comma-separated, from {', '.join(SIZES)}")
    p.add_argument("--dtype", default="float32", choices=list(models.DTYPES))
    p.add_argument("--batch-size", type=_cli.count(1), default=8)
    p.add_argument("--seq-len", type=_cli.count(1), default=64)
    p.add_argument("--repeat", type=_cli.count(1), default=5)
    p.add_argument("--peak-gbs", type=_cli.number(above=0), default=None,
                   help="memory bandwidth, GB/s (default: known GPUs)")
    p.add_argument("--max-reference-values", type=_cli.number(low=0), default=2e8,
                   help="skip the reference backend above this many trainable values (it is the specification)")
    p.add_argument("--modes", type=_cli.listed(str, ("lora", "full")), default="lora,full",
                   help="comma-separated: lora, full")
    p.add_argument("--backends", default="",
                   help="comma-separated names to time (default: all; compiled takes minutes to build on a CPU)")
    args = p.parse_args()
    wanted = set(filter(None, args.backends.split(",")))
    device, dtype = torch.device(args.device), models.DTYPES[args.dtype]
    timed_fast = device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
    backends = {"original": OriginalBackend(), "reference": mezo.TorchBackend()}
    backends["reference+exact"] = mezo.ExactRestore(backends["reference"])  # --exact-restore: a copy of θ
    try:
        from mezo import fast
        backends["fast"] = fast.TritonBackend()
        backends["fast+exact"] = fast.TritonBackend(exact=True)  # ExactRestore's numbers, fused passes
    except ImportError as e:
        print(f"fast/ unavailable: {e}")
    if device.type == "cpu" and (not wanted or wanted & {"compiled", "compiled+exact"}):
        from mezo.fast.compiled import CompiledBackend, compiled_backend, window_noise
        t = time.perf_counter()
        backends["compiled"] = compiled_backend()
        print(f"compiled backend: ready in {time.perf_counter() - t:.1f} s (compile, or inductor's disk cache)")
        if isinstance(backends["compiled"], CompiledBackend):
            backends["compiled+exact"] = mezo.ExactRestore(backends["compiled"])
        noise_rates(args.repeat, window_noise)
    if wanted - backends.keys():
        raise _cli.UsageError(f"--backends {args.backends}: no {', '.join(sorted(wanted - backends.keys()))} "
                              f"here; choose from {', '.join(backends)}")
    backends = {k: v for k, v in backends.items() if not wanted or k in wanted}
    gen = torch.Generator().manual_seed(0)
    name = torch.cuda.get_device_name() if device.type == "cuda" else ""
    peak = args.peak_gbs or peak_gbs(name)
    print(f"device {device}{' ' + torch.cuda.get_device_name() if device.type == 'cuda' else ''}, {args.dtype}, "
          f"batch {args.batch_size} x {args.seq_len} tokens" + (f", peak {peak:.0f} GB/s" if peak else ""))
    print(f"{'model':6s} {'mode':5s} {'trainable':>13s} {'backend':15s} {'forward s':>10s} {'step s':>9s} {'R':>7s} "
          f"{'mem step/fwd':>13s} {'perturb GB/s':>13s} {'of peak':>8s}")
    for size in args.sizes:
        for mode in args.modes:
            model, params = build(size, mode, device, dtype)
            n = sum(q.tensor.numel() for q in params)
            ids = torch.randint(0, 32000, (args.batch_size, args.seq_len), generator=gen).to(device)
            batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                         position=torch.full((args.batch_size,), args.seq_len - 1, device=device),
                         labels=torch.zeros(args.batch_size, dtype=torch.long, device=device))
            forward = mezo.PromptForward(model, [100, 200])
            loss_fn = lambda: mezo.objective_loss(forward(batch), batch["labels"], "ce")
            with torch.no_grad():
                t_fwd = median_time(lambda i: loss_fn(), device, args.repeat)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    loss_fn()
                    mem_fwd = torch.cuda.max_memory_allocated()
            for name, backend in backends.items():
                if name.startswith("fast") and not timed_fast:
                    print(f"{size:6s} {mode:5s} {n:13,d} {name:15s} {'(interpreter: not timed; see tests)':>40s}")
                    continue
                if name.startswith("reference") and n > args.max_reference_values:
                    print(f"{size:6s} {mode:5s} {n:13,d} {name:15s} {'(skipped: > --max-reference-values)':>40s}")
                    continue
                # As the training loop does: a fused backend makes the next step's +εz in the update's pass.
                if hasattr(backend, "restore_and_update"):
                    from mezo.fast import Fused
                    backend = Fused(backend)

                def step(i, backend=backend):
                    mezo.mezo_step(params, loss_fn, [mezo.step_seed(0, i, 0)], 1e-3, 0.0, 0.0, backend)
                t_step = median_time(step, device, args.repeat)
                mem, bandwidth = f"{'':13s}", ""
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    step(args.repeat + 1)  # the next step of the run just timed
                    mem = f"{torch.cuda.max_memory_allocated() / mem_fwd:13.3f}"
                if "exact" not in name:  # one in-place pass (the exact modes' passes also read or write a copy)
                    t_pass = median_time(lambda i: backend.perturb(params, mezo.step_seed(1, i, 0), 1e-3), device,
                                         min(args.repeat, 3))
                    gbs = 2 * sum(q.tensor.numel() * q.tensor.element_size() for q in params) / t_pass / 1e9
                    bandwidth = f"{gbs:13.1f} {f'{gbs / peak:8.1%}' if peak else ''}"
                r = t_step / (2 * t_fwd)
                print(f"{size:6s} {mode:5s} {n:13,d} {name:15s} {t_fwd:10.4f} {t_step:9.4f} {r:7.3f} {mem} {bandwidth}")
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    _cli.main(main)
