"""Perturbation throughput: the reference backend against fast/ (Triton), and the kernel's memory bandwidth.

    python bench/perturb.py                  # GPU: compiled kernels
    TRITON_INTERPRET=1 python bench/perturb.py --device cpu --numel 1000000   # CPU: interpreter, not a timing

Prints the median time of θ += scale·z over one tensor for each backend, the ratio reference / fast, and
the kernel's effective bandwidth (one read and one write of θ) against the device's peak if given.
"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _cli  # bench/_cli.py, beside this file: the shared command line

import mezo  # noqa: E402


def timed(fn, device, repeat):
    times = []
    for i in range(repeat + 2):  # two warm-ups: compilation and allocator pools
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    p = _cli.parser(__doc__)
    p.add_argument("--device", type=_cli.device, default="auto", help="default: cuda where there is one, else cpu")
    p.add_argument("--numel", type=_cli.count(1), default=256 * 2**20)
    p.add_argument("--repeat", type=_cli.count(1), default=10)
    p.add_argument("--peak-gbs", type=_cli.number(low=0), default=0.0,
                   help="device memory bandwidth, GB/s (default: known GPUs)")
    p.add_argument("--skip-reference", action="store_true")
    args = p.parse_args()
    _cli.needs_triton(args.device, "this benchmark")
    from mezo import fast

    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    from step import peak_gbs  # bench/step.py's table of known devices
    args.peak_gbs = args.peak_gbs or peak_gbs(name) or 0.0
    print(f"device {device} ({name}), {args.numel:,} elements")
    print(f"{'dtype':10s} {'reference s':>12s} {'fast s':>10s} {'ref / fast':>11s} {'fast GB/s':>10s} {'of peak':>8s}")
    for dtype in (torch.float32, torch.bfloat16):
        theta = torch.randn(args.numel, device=device).to(dtype)
        params = mezo.make_trainables([("theta", theta)])
        backend = fast.TritonBackend()  # one backend: its launch tables are made once, as in training
        t_fast = timed(lambda i: backend.perturb(params, mezo.step_seed(0, i, 0), 1e-3), device, args.repeat)
        reference = lambda i: mezo.TorchBackend().perturb(params, mezo.step_seed(0, i, 0), 1e-3)
        t_ref = float("nan") if args.skip_reference else timed(reference, device, max(2, args.repeat // 4))
        gbs = 2 * theta.numel() * theta.element_size() / t_fast / 1e9
        peak = f"{gbs / args.peak_gbs:8.1%}" if args.peak_gbs else f"{'':8s}"
        print(f"{str(dtype).split('.')[-1]:10s} {t_ref:12.4f} {t_fast:10.5f} {t_ref / t_fast:11.1f} {gbs:10.1f} {peak}")


if __name__ == "__main__":
    _cli.main(main)
