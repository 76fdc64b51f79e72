"""Peak memory of one MeZOTrainer step against a forward on the same batch, measured as
bench/memory.py measures (and, for contrast, one step of the plain transformers.Trainer: backward
+ AdamW).

    python bench/trainer_memory.py                      # smollm2-135m, batch 8, LoRA and full
    python bench/trainer_memory.py --cases forward,mezo-lora --batch-size 16

Each case runs in a fresh process: load the model, warm up, reset the peak, run the case, read the
peak. A Trainer case runs two steps and measures the second (a callback resets the peak as it begins
and reads it as it ends), so the Trainer's set-up and the first step's lazy allocations are not the
step's cost. CPU: the process's peak resident set (VmHWM); GPU: torch's max_memory_allocated
(runs.peak_memory_mb). The batch: the first sentences of the sentence-level SST-2 train set, the
model's own causal-LM loss.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import _cli  # bench/_cli.py, beside this file: the shared command line
from memory import bench_parser, rows_of  # bench/memory.py, beside this file

CASES = ["forward", "mezo-lora", "mezo-full", "adamw-lora", "adamw-full"]


def measure(case: str, args) -> dict:
    import torch
    import transformers
    from mezo.tasks.files import find_data
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling

    from mezo import models, runs, trainer

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    path = models.resolve_model_path(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    if case.endswith("-lora"):
        torch.manual_seed(0)
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
        model = get_peft_model(model, config)
    sst2 = "lm-bff/SST-2/train.tsv"
    rows = (find_data([sst2]) / sst2).read_text().splitlines()[1:]
    ids = [tok(row.split("\t")[0], truncation=True, max_length=args.max_length)["input_ids"]
           for row in rows[:args.batch_size * 2]]
    collate = DataCollatorForLanguageModeling(tok, mlm=False)
    gpu = device.type == "cuda"
    peaks = {}

    def now(reset=False):
        if gpu:
            torch.cuda.synchronize()
        return runs.peak_memory_mb(device, reset=reset)

    if case == "forward":
        batch = collate([{"input_ids": x} for x in ids[:args.batch_size]])
        batch = {k: v.to(device) for k, v in batch.items()}
        model.eval()
        with torch.no_grad():
            model(**batch)  # warm-up
            peaks["base"] = now(reset=True)
            model(**batch)  # the loss, as the closure computes it
            peaks["peak"] = now()
    else:
        class Second(transformers.TrainerCallback):  # the second step, from beginning to end
            def on_step_begin(self, a, state, control, **kw):
                if state.global_step == 1:
                    peaks["base"] = now(reset=True)

            def on_step_end(self, a, state, control, **kw):
                if state.global_step == 2:
                    peaks["peak"] = now()

        class Texts(torch.utils.data.Dataset):
            def __len__(self):
                return len(ids)

            def __getitem__(self, i):
                return {"input_ids": ids[i]}

        common = dict(output_dir="/tmp/bench-trainer-memory", use_cpu=not gpu, report_to=[],
                      max_steps=2, per_device_train_batch_size=args.batch_size, save_strategy="no",
                      disable_tqdm=True, learning_rate=1e-4, logging_steps=100)
        if case.startswith("mezo"):
            t = trainer.MeZOTrainer(model=model, args=trainer.MeZOTrainingArguments(**common),
                                    train_dataset=Texts(), data_collator=collate,
                                    callbacks=[Second()])
        else:
            t = transformers.Trainer(model=model, args=transformers.TrainingArguments(**common),
                                     train_dataset=Texts(), data_collator=collate,
                                     callbacks=[Second()])
        t.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return dict(case=case, peak_mb=peaks["peak"], above_model_mb=peaks["peak"] - peaks["base"],
                trainable=trainable)


def main():
    p = bench_parser(__doc__, CASES, threads=1)
    p.add_argument("--max-length", type=_cli.count(8), default=64)
    args = p.parse_args()
    rows = rows_of(args, CASES, measure, __file__, ["--max-length", str(args.max_length)])
    if rows is None:
        return
    ref = rows[0]
    print(f"model {args.model}, batch {args.batch_size} x at most {args.max_length} tokens, "
          f"{args.device}")
    print(f"{'case':12s} {'trainable':>11s} {'peak MB':>9s} {'above start MB':>15s} "
          f"{'peak / forward':>15s}")
    for r in rows:
        print(f"{r['case']:12s} {r['trainable']:11,d} {r['peak_mb']:9.1f} "
              f"{r['above_model_mb']:15.1f} {r['peak_mb'] / ref['peak_mb']:15.3f}")


if __name__ == "__main__":
    _cli.main(main)
