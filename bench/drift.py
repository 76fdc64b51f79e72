"""Drift of in-place ±ε perturbation at lr = 0: how far θ wanders from where it started after N steps.

    python bench/drift.py                                   # reference only
    TRITON_INTERPRET=1 python bench/drift.py --fast         # and fast/ (interpreter on a CPU: keep --numel small)

A step at lr = 0 should leave θ unchanged; in place, θ + εz − 2εz + εz rounds three times, and in bfloat16
or float16 the rounding error is not small next to εz. Printed per dtype and backend: the RMS and the max of
|θ_N − θ_0| relative to RMS(θ_0), and the fraction of elements changed; "+exact" rows use the drift-free mode
(--exact-restore: ±ε start from a copy of θ, and the restore is the copy), whose drift must be exactly 0.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _cli  # bench/_cli.py, beside this file: the shared command line

import mezo  # noqa: E402


def main():
    p = _cli.parser(__doc__)
    p.add_argument("--numel", type=_cli.count(1), default=1 << 16)
    p.add_argument("--steps", type=_cli.count(1), default=100)
    p.add_argument("--eps", type=_cli.number(above=0), default=1e-3)
    p.add_argument("--std", type=_cli.number(above=0), default=0.02,
                   help="scale of θ (a typical weight initialisation)")
    p.add_argument("--device", type=_cli.device, default="cpu")
    p.add_argument("--fast", action="store_true")
    args = p.parse_args()
    if args.fast:
        _cli.needs_triton(args.device, "--fast")
    # "+exact": --exact-restore, a copy of θ for the step and the restore exact
    backends = {"reference": mezo.TorchBackend, "reference+exact": lambda: mezo.ExactRestore(mezo.TorchBackend())}
    if args.fast:
        from mezo import fast
        backends["fast"] = fast.TritonBackend
        backends["fast+exact"] = lambda: fast.TritonBackend(exact=True)
    theta0 = torch.randn(args.numel, generator=torch.Generator().manual_seed(0)) * args.std
    loss = lambda: 0.0  # a constant loss: projected_grad = 0, so any change of θ is rounding alone
    print(f"{args.numel:,} values of std {args.std}, eps {args.eps}, {args.steps} steps at lr = 0")
    print(f"{'dtype':10s} {'backend':14s} {'rms drift / rms θ':>18s} {'max drift / rms θ':>18s} {'changed':>8s}")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for name, make in backends.items():
            backend = make()
            theta = theta0.to(dtype).to(args.device)
            start = theta.clone()
            params = mezo.make_trainables([("theta", theta)])
            for t in range(args.steps):
                mezo.mezo_step(params, loss, [mezo.step_seed(0, t, 0)], args.eps, 0.0, 0.0, backend)
            d = (params[0].tensor.double() - start.double())
            scale = start.double().square().mean().sqrt()
            print(f"{str(dtype).split('.')[-1]:10s} {name:14s} {(d.square().mean().sqrt() / scale).item():18.3e} "
                  f"{(d.abs().max() / scale).item():18.3e} {(d != 0).double().mean().item():8.1%}")


if __name__ == "__main__":
    _cli.main(main)
