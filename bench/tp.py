"""tp/ on CPU: bytes communicated per step (DP and TP, beside the forward's own activation traffic) and wall
time per step for 1 process against 2 (tensor parallel, data parallel).

    python bench/tp.py                       # a 135M Llama of SmolLM2-135M's shapes (random weights)
    python bench/tp.py --model /path --steps 8 --batch-size 8 --mode lora

It launches itself: once as a plain process (the reference placement) and under torchrun with --tp 2 and
--dp 2. Each run takes real MeZO steps (mezo.mezo_step on a batch of token sequences through mezo's own
PromptForward and loss) and counts the payload of every collective torch issues during the step (a dispatch
mode that sees the c10d ops DTensor and dist.all_reduce call), then prints medians and ratios. 2 cores: the
plain run uses 2 threads, each of 2 ranks 1 thread, so each row uses the whole machine.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import _cli  # bench/_cli.py, beside this file: the shared command line

COLLECTIVES = ("all_reduce", "allreduce", "all_gather", "allgather", "reduce_scatter", "broadcast", "all_to_all")


def worker(args) -> None:
    import torch
    from mezo.tasks import prompts
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    import mezo
    from mezo import models

    torch.set_num_threads(args.threads)
    targets = tuple(args.lora_targets.split(",")) if args.lora_targets else None
    # on CPUs (gloo) wherever it runs: on a machine with one GPU, auto would put rank 1 on a cuda:1 it lacks
    cfg = mezo.Config(model=args.model, mode=args.mode, tp=args.tp, dp=args.dp, batch_size=args.batch_size,
                      threads=args.threads, lora_targets=targets, device="cpu")
    placement = mezo.variants(cfg).get("placement", mezo.Placement())  # as the command line picks it
    torch.manual_seed(0)
    if args.model != "smollm2-shape":
        model, tok, *_ = models.load_model(cfg.model, cfg.dtype, cfg.head)
        words = (" terrible", " great") if "smollm" in args.model else (" bad", " good")
        label_ids = prompts.label_token_ids(tok, words)
    else:  # SmolLM2-135M's shapes with random weights (time does not depend on the values), but 8 query and
        # 2 key/value heads of 72: SmolLM2's own 9 and 3 heads do not split over 2 ranks
        from transformers import LlamaConfig, LlamaForCausalLM
        model = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                             num_hidden_layers=30, num_attention_heads=8, num_key_value_heads=2,
                                             head_dim=72, tie_word_embeddings=True)).eval()
        label_ids = [100, 200]
    params = placement.shard(model, mezo.select_trainables(model, cfg))
    forward = mezo.PromptForward(model, label_ids)
    gen = torch.Generator().manual_seed(1)
    vocab = min(1000, model.config.vocab_size)
    examples = [dict(ids=torch.randint(3, vocab, (args.length,), generator=gen).tolist(), position=args.length - 1,
                     label=i % 2) for i in range(args.batch_size)]
    mine = placement.local(examples)
    hidden = model.config.hidden_size

    class CommBytes(TorchDispatchMode):
        """Payload bytes of every collective: the tensors handed to c10d (functional or not)."""

        def __init__(self):
            super().__init__()
            self.bytes, self.calls = collections.Counter(), collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__
            if func.namespace in ("_c10d_functional", "c10d") and any(c in name for c in COLLECTIVES):
                self.bytes[name] += sum(t.numel() * t.element_size() for t in tree_leaves((args, kwargs or {}))
                                        if isinstance(t, torch.Tensor))
                self.calls[name] += 1
            return func(*args, **(kwargs or {}))

    def loss_fn():
        logits, labels = prompts.batch_logits(forward, mine, 8, 0, "cpu")
        return placement.mean(mezo.objective_loss(logits, labels, "ce"), len(mine))

    times, cpu, counts = [], [], None
    for step in range(1, args.steps + 2):
        comm = CommBytes()
        t, c = time.perf_counter(), time.process_time()
        with comm:
            mezo.mezo_step(params, loss_fn, [mezo.step_seed(0, step, 0)], 1e-3, 1e-5, 0.0)
        if step > 1:  # the first step warms up
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        counts = comm
    # CPU seconds of this process per step (all its threads): on a machine other work is also using, wall time
    # says little; the slowest rank's CPU time is what a step would take with a free core per thread.
    cpu_step = torch.tensor([statistics.median(cpu)])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(cpu_step, op=torch.distributed.ReduceOp.MAX)
    # The forward's own activation traffic, for scale: the hidden state (B, T, H) float32 that each transformer
    # block reads and writes, summed over blocks, for one forward of the whole batch (all ranks together).
    layers = models.num_layers(model)
    activation = args.batch_size * args.length * hidden * 4 * layers
    if placement.is_main:
        result = dict(step=statistics.median(times), cpu=cpu_step.item(), bytes=sum(counts.bytes.values()),
                      calls=dict(counts.calls), per=dict(counts.bytes), activation=activation, layers=layers)
        print("RESULT " + json.dumps(result), flush=True)
    placement.close()


def launch(args, nproc: int, threads: int, extra: list[str]) -> dict:
    argv = [str(ROOT / "bench" / "tp.py"), "--worker", "--threads", str(threads), "--model", args.model,
            "--mode", args.mode, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
            "--length", str(args.length), "--lora-targets", args.lora_targets, *extra]
    cmd = [sys.executable, *argv] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    _cli.pass_on_error(out)
    if out.returncode or not lines:
        sys.exit(f"bench/tp.py: {' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    p = _cli.parser(__doc__)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="smollm2-shape", help="a model folder, or smollm2-shape (random weights)")
    p.add_argument("--mode", default="lora", choices=("lora", "full"))
    p.add_argument("--steps", type=_cli.count(1), default=5, help="timed steps (after one warm-up step)")
    p.add_argument("--batch-size", type=_cli.count(2), default=8, help="at least 2: DP = 2 splits it")
    p.add_argument("--length", type=_cli.count(4), default=48,
                   help="tokens per example (SST-2 prompts are about 49)")
    p.add_argument("--threads", type=_cli.count(1), default=2, help=argparse.SUPPRESS)  # (a worker's)
    p.add_argument("--lora-targets", default="", help="comma-separated (default: q_proj,v_proj)")
    p.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)  # (a worker's: main runs each placement)
    p.add_argument("--dp", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    rows = [("1 process, 2 threads", launch(args, 1, 2, [])),
            ("1 process, 1 thread", launch(args, 1, 1, [])),
            ("TP = 2, 1 thread each", launch(args, 2, 1, ["--tp", "2"])),
            ("DP = 2, 1 thread each", launch(args, 2, 1, ["--dp", "2"]))]
    base = rows[0][1]
    print(f"model {args.model}, {args.mode}, batch {args.batch_size} x {args.length} tokens, {base['layers']} layers; "
          f"median of {args.steps} steps after 1 warm-up, on {os.cpu_count()} cores")
    print(f"forward activation traffic (hidden states in and out of the blocks, one forward): "
          f"{base['activation'] / 1e6:.2f} MB; a step runs 2 forwards")
    print(f"{'placement':24s} {'s/step':>8s} {'vs 1 proc':>9s} {'CPU s/step':>10s} {'bytes/step':>12s} "
          f"{'/ 2 fwd act.':>12s}  collectives")
    for name, r in rows:
        calls = ", ".join(f"{k} x{v}" for k, v in r["calls"].items()) or "none"
        print(f"{name:24s} {r['step']:8.3f} {r['step'] / base['step']:9.2f} {r['cpu']:10.3f} {r['bytes']:12,d} "
              f"{r['bytes'] / (2 * r['activation']):12.2e}  {calls}")
    print("CPU s/step: CPU seconds of one process per step, all its threads (the slowest rank's), which other load "
          f"on the machine disturbs less than wall time (load average now {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    _cli.main(main)
