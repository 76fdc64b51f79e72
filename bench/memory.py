"""Peak memory of one MeZO step against inference on the same batch (and, for contrast, one backward pass
and one first-order step: backward + AdamW, as `mezo.py --optimizer adam` takes).

    python bench/memory.py                          # default model and batch, LoRA and full-parameter
    python bench/memory.py --model DIR --batch-size 16 --device cuda
    python bench/memory.py --cases inference,mezo-lora,adam-lora --json memory.json
    python bench/memory.py --cases inference,mezo-full,mezo-full-momentum,mezo-full-adam   # --rule's buffers
    python bench/memory.py --repeat 3                # each figure the median of 3 fresh processes

Each case runs in a fresh process: load the model, warm up, reset the peak, run the case, read the peak.
CPU: the process's peak resident set (VmHWM, reset through /proc/self/clear_refs). GPU: torch's
max_memory_allocated. Printed: the absolute peak, the part above the loaded model, and ratios to inference.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _cli  # bench/_cli.py, beside this file: the shared command line

RULES = ("momentum", "adam", "sign", "conservative")  # rules.py: --rule, a MeZO step with each
CASES = ["inference", "mezo-lora", "mezo-full", "backward-lora", "adam-lora", "adam-full",
         *[f"mezo-{mode}-{rule}" for mode in ("lora", "full") for rule in RULES]]


def measure(case: str, args) -> dict:
    import torch
    import torch.nn.functional as F
    from mezo.tasks import prompts

    import mezo
    from mezo import baseline, models, rules, runs, tasks

    torch.set_num_threads(args.threads)
    mode = "full" if case.endswith("-full") or "-full-" in case else "lora"
    cfg = mezo.Config(model=args.model, mode=mode, device=args.device)
    device = torch.device(args.device)
    model, tok, *_ = models.load_model(cfg.model, cfg.dtype, cfg.head)
    model.to(device)
    params = mezo.select_trainables(model, cfg)
    kind = models.model_kind(model)
    template, words = tasks.prompt(cfg.task, kind)  # the task's prompt, as mezo.train takes it
    forward = mezo.PromptForward(model, prompts.label_token_ids(tok, words))
    data = tasks.load(cfg.task, cfg.k, cfg.data_seed, cfg.data_dir)
    ex = [dict(zip(("ids", "position"), prompts.encode(tok, s, template, kind, cfg.max_length)), label=y)
          for s, _, y in data["train"][:args.batch_size]]
    loss_fn = lambda: mezo.objective_loss(*prompts.batch_logits(forward, ex, args.batch_size, 0, device), "ce")
    with torch.no_grad():
        loss_fn()  # warm-up: allocator pools and lazy initialisation are not the case's cost
    gpu = device.type == "cuda"
    if gpu:
        torch.cuda.synchronize()
    base = runs.peak_memory_mb(device, reset=True)  # right after the reset, the peak is what is in use now
    t = time.perf_counter()
    if case == "inference":
        with torch.no_grad():
            loss_fn()
    elif case.startswith("mezo"):  # with --rule, its buffers are made in the step: the memory a run then holds
        rule = rules.make(case.split("-")[2]) if case.count("-") == 2 else None
        mezo.mezo_step(params, loss_fn, [mezo.step_seed(0, 1, 0)], 1e-3, 1e-3, 0.0, rule=rule)
    elif case.startswith("adam"):  # a first-order step: activations, gradients and AdamW's two moments
        # one part per micro-batch, as mezo.train makes them
        optimizer = baseline.adam_optimizer([(p.tensor, p.decay) for p in params], 1e-4, 0.0)
        parts = lambda: (F.cross_entropy(forward(b), b["labels"], reduction="sum") / len(ex)
                         for b in prompts.micro_batches(ex, args.micro_batch or args.batch_size, 0, device))
        baseline.adam_step(optimizer, parts)
    else:  # backpropagation through the same LoRA tensors: activations and gradients are kept
        with torch.enable_grad():
            logits, labels = prompts.batch_logits(forward, ex, args.batch_size, 0, device)
            F.cross_entropy(logits, labels).backward()
    if gpu:
        torch.cuda.synchronize()
    peak = runs.peak_memory_mb(device)
    seconds = time.perf_counter() - t  # one run of the case, a side figure (bench/step.py times steps properly)
    return dict(case=case, peak_mb=peak, above_model_mb=peak - base, seconds=seconds,
                trainable=sum(p.tensor.numel() for p in params))


def bench_parser(doc: str, cases: list[str], threads: int) -> argparse.ArgumentParser:
    """The options a memory bench shares (bench/trainer_memory.py's too), described by the first
    paragraph of its docstring `doc`; cases[0] is the reference."""
    p = _cli.parser(doc)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch-size", type=_cli.count(1), default=8)
    p.add_argument("--device", type=_cli.device, default="cpu")
    p.add_argument("--threads", type=_cli.count(1), default=threads)
    p.add_argument("--cases", default=",".join(cases), help="comma-separated, from " + ", ".join(cases))
    p.add_argument("--repeat", type=_cli.count(1), default=1,
                   help="fresh processes per case; each figure is their median (the peaks of first-order "
                        "steps here differed by up to 8%% from one process to the next)")
    p.add_argument("--case", help=argparse.SUPPRESS)
    return p


def rows_of(args, cases: list[str], measure, script: str, flags: list[str]) -> list[dict] | None:
    """--case CASE: measure it in this process and print its row (None back). Otherwise each of --cases
    in a fresh process (`script --case CASE` with the shared options and `flags`), so that its peak is
    its own: their rows, the reference's first."""
    if args.case:
        print(json.dumps(measure(args.case, args)))
        return None
    picked = args.cases.split(",")
    if picked[0] != cases[0] or not set(picked) <= set(cases):
        raise _cli.UsageError(f"--cases {args.cases}: start with {cases[0]} (the reference) and choose from "
                              f"{', '.join(cases)}")
    shared = ["--model", args.model, "--batch-size", str(args.batch_size), "--device", args.device,
              "--threads", str(args.threads)]
    rows = []
    for case in picked:
        cmd = [sys.executable, script, "--case", case, *shared, *flags]
        runs = []
        for _ in range(args.repeat):
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            _cli.pass_on_error(out)
            if out.returncode:
                sys.exit(f"{case} failed:\n{out.stderr[-2000:]}")
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        # each figure the median over the processes (a number's own, not one process's row), and every peak
        row = {k: statistics.median(r[k] for r in runs) if isinstance(v, float) else v for k, v in runs[0].items()}
        rows.append(dict(row, peak_mb_runs=[r["peak_mb"] for r in runs]))
    return rows


def main():
    p = bench_parser(__doc__, CASES, threads=2)
    p.add_argument("--micro-batch", type=_cli.count(0), default=0,
                   help="adam cases: examples per backward (default: the batch)")
    p.add_argument("--json", type=_cli.json_file,
                   help="also write the rows to this file (a new one, or JSON rows: written over)")
    args = p.parse_args()
    rows = rows_of(args, CASES, measure, __file__, ["--micro-batch", str(args.micro_batch)])
    if rows is None:
        return
    ref = rows[0]
    print(f"model {args.model}, batch {args.batch_size}" + (f", adam micro-batch {args.micro_batch}" if args.micro_batch
                                                             else "") + f", {args.device}")
    print(f"{'case':22s} {'peak MB':>10s} {'above model MB':>15s} {'peak / inference':>17s} {'above / inference':>18s}"
          + (f"  peaks over {args.repeat} processes, MB" if args.repeat > 1 else ""))
    for r in rows:  # on a CPU, inference may add almost nothing above the model: no ratio to a near-zero
        above = f"{r['above_model_mb'] / ref['above_model_mb']:18.2f}" if ref["above_model_mb"] >= 1 else f"{'-':>18s}"
        print(f"{r['case']:22s} {r['peak_mb']:10.1f} {r['above_model_mb']:15.1f} {r['peak_mb'] / ref['peak_mb']:17.3f} "
              f"{above}" + (f"  {min(r['peak_mb_runs']):.0f}–{max(r['peak_mb_runs']):.0f}" if args.repeat > 1 else ""))
    if args.json:
        _cli.write_json(args.json, dict(model=args.model, batch_size=args.batch_size, device=args.device,
                                        threads=args.threads, repeat=args.repeat, **_cli.measured_at(),
                                        rows=rows))


if __name__ == "__main__":
    _cli.main(main)
