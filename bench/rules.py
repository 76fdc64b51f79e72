"""The update rules' step (rules.py, and ZO-SGD for scale) on the reference backend against --fast's, in one run.

    python bench/rules.py --threads 2                       # CPU: the compiled backend (the same bits)
    python bench/rules.py --device cuda --numel 134515008   # GPU: Triton, momentum/Adam in one kernel

Times one call of the update alone (no forwards, θ already restored) over float32 tensors of --numel values in all,
cut as --tensors equal tensors (LoRA has many small ones, full-parameter a few hundred large ones). Prints the
median of --repeat calls for each backend and the ratio reference / fast. The conservative rule is left out: its
update is ZO-SGD's three times plus three forwards. On a CPU the backends make the same bits, so the ratio is
speed alone; on a GPU Triton's z is the reference's within 1e-6.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _cli  # bench/_cli.py, beside this file: the shared command line
from perturb import timed  # noqa: E402  (bench/perturb.py: warm-ups, then the median)

import mezo  # noqa: E402
from mezo import rules  # noqa: E402


def update(rule, params, backend, i):
    samples = [dict(seed=mezo.step_seed(0, i, 0), projected_grad=0.5)]
    groups = mezo.rate_groups(params, 1e-6, 0.0)
    mezo.sgd_update(backend, samples, groups) if rule is None else rule.update(params, samples, groups, backend, None)


def main():
    p = _cli.parser(__doc__)
    p.add_argument("--device", type=_cli.device, default="auto", help="default: cuda where there is one, else cpu")
    p.add_argument("--numel", type=_cli.count(1), default=8 * 2**20,
                   help="values in all (SmolLM2-135M full: 134515008)")
    p.add_argument("--tensors", type=_cli.count(1), default=32)
    p.add_argument("--repeat", type=_cli.count(1), default=5)
    p.add_argument("--threads", type=_cli.count(0), default=0, help="torch threads on a CPU (default: torch's)")
    args = p.parse_args()
    if args.numel < 64 * args.tensors:
        raise _cli.UsageError(f"--numel {args.numel} cuts into --tensors {args.tensors} of 64 columns: give "
                              f"--numel {64 * args.tensors} or more, or fewer --tensors")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from mezo import fast
    fast_backend = fast.choose(args.device)  # what --fast runs there: compiled on a CPU, Triton on a GPU
    each = args.numel // args.tensors
    params = mezo.make_trainables([(f"w{i}", torch.randn(each // 64, 64, device=device)) for i in range(args.tensors)])
    values = sum(t.tensor.numel() for t in params)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device {device} ({name}), {values:,} float32 values in {args.tensors} tensors; "
          f"fast = {getattr(fast_backend, 'name', type(fast_backend).__name__)}")
    print(f"{'rule':14s} {'reference s':>12s} {'fast s':>10s} {'ref / fast':>11s}")
    for rule_name in ("sgd", "momentum", "adam", "sign"):
        times = []
        for backend in (mezo.TorchBackend(), fast_backend):
            rule = None if rule_name == "sgd" else rules.make(rule_name)
            times.append(timed(lambda i: update(rule, params, backend, i), device, args.repeat))
        print(f"{rule_name:14s} {times[0]:12.4f} {times[1]:10.4f} {times[0] / times[1]:11.2f}", flush=True)


if __name__ == "__main__":
    _cli.main(main)
