"""How faithful is MeZO's projected gradient in low precision? (issue 25, item 3)

For each model dtype (float16, bfloat16) and ε, the same steps as a float32 run at lr 0 (the same seeds, batches
and LoRA tensors, LoRA kept in float32 as `--lora-dtype float32` does): projected_grad's relative error against
float32's, ‖g − g32‖ / ‖g32‖ over the steps, and their correlation. The loss is always taken in float32 from the
low-precision logits, as mezo.PromptForward does (the LM head's output is cast before the log-softmax). At lr 0
θ never moves, so every difference is the forwards' rounding, read through (L+ − L−) / 2ε.

    python bench/precision.py                   # SmolLM2-135M, 16-shot SST-2 (seed 42), batch 8, 50 steps
    python bench/precision.py --steps 10 --json docs/precision.json

Prints a table (markdown) and, per dtype, the ε with the least error: the recommendation docs/precision.md gives.
"""
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _cli  # bench/_cli.py, beside this file: the shared command line

import mezo  # noqa: E402
from mezo import runs  # noqa: E402

EPS = (1e-3, 3e-3, 1e-2, 3e-2)
DTYPES = ("float16", "bfloat16")


def projected_grads(cfg: mezo.Config, steps: int) -> list[float]:
    """projected_grad of steps 1..steps of a run of cfg at lr 0, without evaluations or files."""
    placement = mezo.Placement()
    # as mezo.train sets a run up: the model and data, the tensors to train, the forward
    loaded = runs.load(cfg, placement)
    params = mezo.select_trainables(loaded.model, cfg)
    forward = mezo.PromptForward(loaded.model, loaded.label_ids, params)
    with runs.Run(cfg, placement, loaded, params, forward, mezo.objective_loss) as run:
        grads = []
        for step in range(1, steps + 1):
            samples = mezo.mezo_step(run.params, run.loss_fn(step), [mezo.step_seed(cfg.seed, step, 0)], cfg.eps,
                                     0.0, 0.0, mezo.TorchBackend())
            grads.append(samples[0]["projected_grad"])
        return grads


def compare(g: list[float], ref: list[float]) -> tuple[float, float]:
    """Relative error ‖g − ref‖ / ‖ref‖ and the correlation of g with ref over the steps."""
    a, b = torch.tensor(g, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64)
    error = ((a - b).norm() / b.norm()).item()
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    return error, corr


def main() -> None:
    p = _cli.parser(__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="sst2")
    p.add_argument("--steps", type=_cli.count(2), default=50, help="at least 2: a correlation needs two")
    p.add_argument("--batch-size", type=_cli.count(1), default=8)
    p.add_argument("--threads", type=_cli.count(1), default=2)
    p.add_argument("--eps", type=_cli.listed(_cli.number(above=0)), default=",".join(map(str, EPS)),
                   help="comma-separated ε")
    p.add_argument("--json", type=_cli.json_file,
                   help="also write the rows to this file (a new one, or JSON rows: written over)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base = mezo.Config(task=args.task, model=args.model, batch_size=args.batch_size, lr=0.0,
                       lora_dtype="float32", device="cpu", threads=args.threads)
    rows = []
    print(f"{args.model}, {args.task} k=16 seed {base.data_seed}, batch {args.batch_size}, {args.steps} steps "
          f"at lr 0, LoRA in float32, the loss in float32 from the model dtype's logits")
    print("| model dtype | ε | relative error of projected_grad | correlation with float32 | s |")
    print("|---|---|---|---|---|")
    for eps in args.eps:
        ref = projected_grads(dataclasses.replace(base, eps=eps, dtype="float32"), args.steps)
        for dtype in DTYPES:
            t = time.perf_counter()
            g = projected_grads(dataclasses.replace(base, eps=eps, dtype=dtype), args.steps)
            error, corr = compare(g, ref)
            seconds = time.perf_counter() - t
            rows.append(dict(dtype=dtype, eps=eps, error=error, correlation=corr, steps=args.steps,
                             model=args.model, seconds=seconds))
            print(f"| {dtype} | {eps:g} | {error:.3f} | {corr:.3f} | {seconds:.0f} |", flush=True)
    for dtype in DTYPES:
        mine = [r for r in rows if r["dtype"] == dtype and math.isfinite(r["error"])]
        best = min(mine, key=lambda r: r["error"])
        print(f"{dtype}: least error at ε = {best['eps']:g} ({best['error']:.3f})")
    if args.json:
        _cli.write_json(args.json, rows)


if __name__ == "__main__":
    _cli.main(main)
