"""Two runs' logs (log.jsonl) step by step: the reference against --fast on the same device (bench/gpu.sh).

    python bench/compare_logs.py runs/gpu/lora-ref runs/gpu/lora-fast [--tol 1e-3]

Prints the largest difference of loss_plus, loss_minus and projected_grad, relative to the reference's size,
and exits 1 past --tol or when the steps or seeds differ. On CUDA the two are not bit for bit (Triton's log/cos
against torch's; the reference's own rounding order): issue 21 saw 5.4e-7 over 30 LoRA float32 steps.
"""

from pathlib import Path

import _cli  # bench/_cli.py, beside this file: the shared command line
from mezo.errors import UsageError

from mezo import runs

KEYS = ("loss_plus", "loss_minus", "projected_grad")


def steps(given: str) -> list[dict]:
    """The MeZO steps' records of a run's folder or of a log.jsonl (a bad line: one line, runs.read_log)."""
    log = Path(given) if Path(given).is_file() else Path(given) / "log.jsonl"
    if not log.is_file():
        raise UsageError(f"{given}: no log.jsonl there; give a run's folder (mezo.py --out) or its log.jsonl")
    try:
        found = [r for r in runs.read_log(log) if "seed" in r]
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{log}: cannot read it as a log ({e}); give a run's log.jsonl") from None
    if not found:
        raise UsageError(f"{log}: no MeZO step logged in it; give a run that trained a step or more")
    return found


def main() -> int:
    ap = _cli.parser(__doc__.splitlines()[0])
    ap.add_argument("reference", help="a run's folder (mezo.py --out) or its log.jsonl")
    ap.add_argument("fast", help="the same run with --fast: its folder or log.jsonl")
    ap.add_argument("--tol", type=_cli.number(low=0), default=1e-3, help="largest relative difference allowed")
    args = ap.parse_args()
    ref, fast = steps(args.reference), steps(args.fast)
    if not ref or [(r["step"], r["seed"]) for r in ref] != [(r["step"], r["seed"]) for r in fast]:
        print(f"steps or seeds differ: {len(ref)} reference steps, {len(fast)} --fast steps")
        return 1
    worst = {}
    for r, f in zip(ref, fast):
        for k in KEYS:
            # relative to the reference's own size, so a projected gradient near 0 is not flagged by noise
            scale = max(abs(r[k]), 1e-3)
            worst[k] = max(worst.get(k, 0.0), abs(r[k] - f[k]) / scale)
    print(
        f"{len(ref)} steps; largest relative difference: "
        + ", ".join(f"{k} {v:.2e}" for k, v in worst.items())
    )
    return 1 if max(worst.values()) > args.tol else 0


if __name__ == "__main__":
    _cli.main(main)
