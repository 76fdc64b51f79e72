"""Wall time of MeZO steps, reference / --cache, with LoRA on the top K layers, on the real SST-2 few-shot run.

    python bench/cache.py                        # SmolLM2-135M (30 layers), K = 1, 2, 4, 8, 30; a few minutes
    python bench/cache.py --k-layers 1,4 --steps 40 --test-rows 200

For each K the same run is made twice, the reference forward (mezo.PromptForward) and cache.CachedForward,
from the same start: 16-shot SST-2 (LM-BFF seed 42, 32 examples), batch 8, LoRA r=8 on q_proj/v_proj of
the top K layers, the default template and lr. Reported: the median step time over the steps after the first
epoch (every example's trunk is cached by then: the steady state), the whole training loop's time including
the first epoch, their ratios reference / cache, the time to evaluate dev + a test slice after training
(test rows were never seen: misses; dev rows neither), and both runs' accuracies and largest |ΔL±|. The
ceiling on the step ratio is about (number of layers) / K: the cache runs K of the layers per pass.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mezo  # noqa: E402
from cache import CachedForward  # noqa: E402


def run(cfg: mezo.Config, use_cache: bool, test_rows: int) -> dict:
    data = mezo.load_sst2(cfg)
    model, tok, _ = mezo.load_model(cfg)
    label_ids = mezo.label_token_ids(tok, cfg.label_words)
    params = mezo.select_trainables(model, cfg)
    forward = CachedForward(model, label_ids, params) if use_cache else mezo.PromptForward(model, label_ids)
    splits = {name: [dict(zip(("ids", "position"), mezo.encode(tok, s, cfg.template, "causal", cfg.max_length)),
                          label=y) for s, y in rows] for name, rows in data.items() if name != "root"}
    splits["test"] = splits["test"][:test_rows]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    if use_cache:
        forward.add_shared_prefix([e["ids"] for rows in splits.values() for e in rows])
    step_times, losses, t0 = [], [], time.perf_counter()
    for step in range(1, cfg.steps + 1):
        batch = [splits["train"][i] for i in mezo.batch_indices(cfg.seed, step, len(splits["train"]), cfg.batch_size)]
        loss_fn = lambda: mezo.objective_loss(*mezo.batch_logits(forward, batch, cfg.micro_batch, pad, "cpu"), "ce")
        t = time.perf_counter()
        s = mezo.mezo_step(params, loss_fn, [mezo.step_seed(cfg.seed, step, 0)], cfg.eps, cfg.lr, 0.0)[0]
        step_times.append(time.perf_counter() - t)
        losses.append((s["loss_plus"], s["loss_minus"]))
    train_time = time.perf_counter() - t0
    t = time.perf_counter()
    acc = {split: mezo.evaluate(forward, splits[split], cfg.micro_batch, pad, "cpu")[0] for split in ("dev", "test")}
    epoch = -(-len(splits["train"]) // cfg.batch_size)  # steps until every training example was seen once
    return dict(step=statistics.median(step_times[epoch:] or step_times), train=train_time,
                eval=time.perf_counter() - t, acc=acc, losses=losses,
                stats=forward.stats() if use_cache else None, layers=mezo.num_layers(model))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k-layers", default="1,2,4,8,30", help="comma-separated K (LoRA on the top K layers)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--test-rows", type=int, default=64, help="test rows evaluated after training")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print(f"SST-2 16-shot, batch 8, {args.steps} steps, LoRA r=8 q/v on the top K layers, {args.threads} thread(s)")
    print(f"{'K':>3} | {'step ref':>8} {'step cache':>10} {'ratio':>6} | {'loop ref':>8} {'loop cache':>10} "
          f"{'ratio':>6} | {'eval ref':>8} {'eval cache':>10} | {'dev ref/cache':>13} {'test ref/cache':>14} | "
          f"{'max |dL|':>8} | {'hits':>5} {'misses':>6} {'MB':>5}")
    for k in [int(x) for x in args.k_layers.split(",")]:
        cfg = mezo.Config(model=args.model, top_layers=k, steps=args.steps)
        ref, cached = run(cfg, False, args.test_rows), run(cfg, True, args.test_rows)
        dl = max(abs(a - b) for pa, pb in zip(ref["losses"], cached["losses"]) for a, b in zip(pa, pb))
        s = cached["stats"]
        rows.append((k, ref, cached))
        print(f"{k:>3} | {ref['step']:8.3f} {cached['step']:10.3f} {ref['step'] / cached['step']:6.2f} | "
              f"{ref['train']:8.1f} {cached['train']:10.1f} {ref['train'] / cached['train']:6.2f} | "
              f"{ref['eval']:8.1f} {cached['eval']:10.1f} | "
              f"{ref['acc']['dev']:.3f}/{cached['acc']['dev']:.3f}   "
              f"{ref['acc']['test']:.3f}/{cached['acc']['test']:.3f}    | {dl:8.1e} | "
              f"{s['hits']:5d} {s['misses']:6d} {s['bytes'] / 2**20:5.1f}", flush=True)
    print(f"(step: median s/step after the first epoch; loop: all {args.steps} steps; eval: dev 32 + test "
          f"{args.test_rows} rows after training; ceiling of the step ratio ~ {rows[0][1]['layers']}/K)")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
