"""Wall time of MeZO steps, reference / --cache, with LoRA on the top K layers, on the real SST-2 few-shot run.

    python bench/cache.py                        # SmolLM2-135M (30 layers), K = 1, 2, 4, 8, 30; a few minutes
    python bench/cache.py --k-layers 1,4 --steps 40 --test-rows 200

For each K the same run is made twice, the reference forward (mezo.PromptForward) and cache.CachedForward,
from the same start, alternating step by step (both see the same load on a shared machine): 16-shot SST-2
(LM-BFF seed 42, 32 examples), batch 8, LoRA r=8 on q_proj/v_proj of the top K layers, the default template
and lr. Reported: the median step time over the steps after the first
epoch (every example's trunk is cached by then: the steady state), the whole training loop's time including
the first epoch, their ratios reference / cache, the time to evaluate dev + a test slice after training
(test rows were never seen: misses; dev rows neither), and both runs' accuracies and largest |ΔL±|. The
ceiling on the step ratio is about (number of layers) / K: the cache runs K of the layers per pass.
"""
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _cli  # bench/_cli.py, beside this file: the shared command line
from mezo.cache import CachedForward  # noqa: E402
from mezo.tasks import prompts  # noqa: E402

import mezo  # noqa: E402
from mezo import (
    models,  # noqa: E402
    runs,  # noqa: E402
    tasks,  # noqa: E402
)


class Run:
    """One training run set up as mezo.train sets it up; step() makes one MeZO step and returns its time."""

    def __init__(self, cfg: mezo.Config, use_cache: bool, test_rows: int):
        data = tasks.load(cfg.task, cfg.k, cfg.data_seed, cfg.data_dir)
        model, tok, *_ = models.load_model(cfg.model, cfg.dtype, cfg.head)
        template, words = tasks.prompt(cfg.task, "causal")  # the task's prompt for a causal LM, as mezo.train
        label_ids = prompts.label_token_ids(tok, words)
        self.cfg, self.layers, self.params = cfg, models.num_layers(model), mezo.select_trainables(model, cfg)
        self.forward = CachedForward(model, label_ids, self.params) if use_cache else \
            mezo.PromptForward(model, label_ids)
        encode = lambda s: prompts.encode(tok, s, template, "causal", cfg.max_length)
        self.splits = {name: [dict(zip(("ids", "position"), encode(s)), label=y) for s, _, y in rows]
                       for name, rows in data.items() if name != "root"}
        self.splits["test"] = self.splits["test"][:test_rows]
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        if use_cache:
            self.forward.add_shared_prefix([e["ids"] for rows in self.splits.values() for e in rows])
        self.losses = []

    def step(self, step: int) -> float:
        cfg, train = self.cfg, self.splits["train"]
        batch = [train[i] for i in runs.batch_indices(cfg.seed, step, len(train), cfg.batch_size)]
        loss_fn = lambda: mezo.objective_loss(*prompts.batch_logits(self.forward, batch, cfg.micro_batch, self.pad,
                                                                 "cpu"), "ce")
        t = time.perf_counter()
        s = mezo.mezo_step(self.params, loss_fn, [mezo.step_seed(cfg.seed, step, 0)], cfg.eps, cfg.lr, 0.0)[0]
        self.losses.append((s["loss_plus"], s["loss_minus"]))
        return time.perf_counter() - t

    def evaluate(self) -> tuple[dict, float]:
        t = time.perf_counter()
        acc = {}
        for split in ("dev", "test"):
            rows = self.splits[split]
            logits, labels = prompts.batch_logits(self.forward, rows, self.cfg.micro_batch, self.pad, "cpu")
            acc[split] = (logits.argmax(-1) == labels).float().mean().item()
        return acc, time.perf_counter() - t


def compare(cfg: mezo.Config, test_rows: int) -> dict:
    """Reference and cache runs side by side, alternating step by step, so that both see the same machine
    load (this machine is shared: a sequential pair of runs measured ratios off by 2x when the load moved)."""
    ref, cached = Run(cfg, False, test_rows), Run(cfg, True, test_rows)
    times = [(ref.step(t), cached.step(t)) for t in range(1, cfg.steps + 1)]
    epoch = -(-len(ref.splits["train"]) // cfg.batch_size)  # steps until every training example was seen once
    steady = times[epoch:] or times
    (acc_ref, eval_ref), (acc_cache, eval_cache) = ref.evaluate(), cached.evaluate()
    dl = max(abs(a - b) for pa, pb in zip(ref.losses, cached.losses) for a, b in zip(pa, pb))
    return dict(step=[statistics.median(t[i] for t in steady) for i in (0, 1)],
                loop=[sum(t[i] for t in times) for i in (0, 1)], eval=[eval_ref, eval_cache],
                acc=[acc_ref, acc_cache], dl=dl, stats=cached.forward.stats(), layers=ref.layers)


def main() -> None:
    ap = _cli.parser(__doc__)
    ap.add_argument("--k-layers", type=_cli.listed(_cli.count(1)), default="1,2,4,8,30",
                    help="comma-separated K (LoRA on the top K layers)")
    ap.add_argument("--steps", type=_cli.count(1), default=20)
    ap.add_argument("--test-rows", type=_cli.count(1), default=64, help="test rows evaluated after training")
    ap.add_argument("--threads", type=_cli.count(1), default=1)
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print(f"SST-2 16-shot, batch 8, {args.steps} steps, LoRA r=8 q/v on the top K layers, {args.threads} thread(s)")
    print(f"{'K':>3} | {'step ref':>8} {'step cache':>10} {'ratio':>6} | {'loop ref':>8} {'loop cache':>10} "
          f"{'ratio':>6} | {'eval ref':>8} {'eval cache':>10} | {'dev ref/cache':>13} {'test ref/cache':>14} | "
          f"{'max |dL|':>8} | {'hits':>5} {'misses':>6} {'MB':>5}")
    for k in args.k_layers:
        cfg = mezo.Config(model=args.model, top_layers=k, steps=args.steps)
        r = compare(cfg, args.test_rows)
        (sr, sc), (lr_, lc), (er, ec), (ar, ac), s = r["step"], r["loop"], r["eval"], r["acc"], r["stats"]
        rows.append(r)
        print(f"{k:>3} | {sr:8.3f} {sc:10.3f} {sr / sc:6.2f} | {lr_:8.1f} {lc:10.1f} {lr_ / lc:6.2f} | "
              f"{er:8.1f} {ec:10.1f} | {ar['dev']:.3f}/{ac['dev']:.3f}   {ar['test']:.3f}/{ac['test']:.3f}    | "
              f"{r['dl']:8.1e} | {s['hits']:5d} {s['misses']:6d} {s['bytes'] / 2**20:5.1f}", flush=True)
    print(f"(step: median s/step after the first epoch; loop: all {args.steps} steps; eval: dev 32 + test "
          f"{args.test_rows} rows after training; ceiling of the step ratio ~ {rows[0]['layers']}/K)")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _cli.main(main)
