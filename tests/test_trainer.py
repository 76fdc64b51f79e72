"""trainer.MeZOTrainer (transformers.Trainer with mezo.MeZO's step) against a plain mezo.MeZO loop
on the same batches: a tiny Llama with all its parameters and a tiny PEFT-LoRA Llama, bit for bit
over K steps; gradient accumulation, resume_from_checkpoint, the lr scheduler, evaluation, two
gloo processes, and the refusals.

Tolerances. Only where the same loss is summed in another order: batch 8 in one forward against 2
x 4 (gradient accumulation, or two ranks), whose losses are sums of token losses over other
groupings. There the losses agree within 16 float32 ulps of |L| (measured: up to 3.8), the
projected gradients within 2·that/2ε, and the tensors within lr·Σ|Δg|·max|z| (max|z| < 6) plus a
few float32 roundings, as tests/test_tp.py derives them. Elsewhere: ==. Run as a script (under
torchrun), this file is the worker of the two-process test.
"""
import copy
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_model, make_tokenizer
from transformers import DataCollatorForLanguageModeling, get_scheduler

import mezo
from mezo import trainer

ROOT = Path(__file__).resolve().parents[1]
EPS, LR, WD, SEED = 1e-3, 1e-2, 0.1, 7
SENTENCES = ["the movie was good", "a very bad film .", "i thought it was funny",
             "the story is long and bad", "what a good story !", "it was not very funny",
             "overall a bad movie", "the film is long", "i thought the story was good",
             "a funny movie", "not a good film", "the review was bad ."]
# Four words each, so no padding: 2 x 4 runs the same tokens as 8.
SAME_LENGTH = [f"{a} {noun} {verb} {adj}" for a, verb in (("the", "was"), ("a", "is"))
               for noun in ("movie", "film") for adj in ("good", "bad", "funny", "long")]


class Texts(torch.utils.data.Dataset):
    """Token ids of short sentences (the collator pads them and makes the labels: the causal LM's
    own loss)."""

    def __init__(self, sentences, tokenizer):
        self.ids = [tokenizer(s)["input_ids"] for s in sentences]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i]}


class Recording(trainer.MeZOTrainer):
    """Keeps a copy of each micro-batch the Trainer hands over, for a plain loop to run."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.batches = getattr(self, "batches", []) + [{k: v.clone() for k, v in inputs.items()}]
        return super().training_step(model, inputs, num_items_in_batch)


def tiny(lora: bool):
    model = make_model("llama")
    if lora:
        from peft import LoraConfig, get_peft_model
        torch.manual_seed(1)  # lora_A's initialisation
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        model = get_peft_model(model, config)
    return model


def arguments(out, **kw):
    default = dict(output_dir=str(out), use_cpu=True, report_to=[], learning_rate=LR, eps=EPS,
                   weight_decay=WD, seed=SEED, max_steps=4, per_device_train_batch_size=4,
                   logging_steps=1, save_strategy="no", lr_scheduler_type="linear",
                   disable_tqdm=True)
    return trainer.MeZOTrainingArguments(**{**default, **kw})


def run(model, out, sentences=SENTENCES, cls=Recording, resume=None, **kw):
    tok = make_tokenizer(causal=True)
    t = cls(model=model, args=arguments(out, **kw), train_dataset=Texts(sentences, tok),
            data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    t.train(resume_from_checkpoint=resume)
    return t


def trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def reference(model, batches, args, n_steps):
    """The plain loop a user writes: mezo.MeZO on the requires_grad parameters, the model's own
    loss, the scheduler TrainingArguments names, stepped after each step as the Trainer steps it."""
    model.eval()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = mezo.MeZO(named, lr=args.learning_rate, eps=args.eps, weight_decay=args.weight_decay,
                    seed=args.seed)
    sched = get_scheduler(args.lr_scheduler_type, opt, args.get_warmup_steps(n_steps), n_steps)
    records = []
    for batch in batches:
        opt.step(lambda: model(**batch).loss)
        records.append(opt.last)
        sched.step()
    return records


def assert_equal_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        diff = (a[name].double() - b[name].double()).abs().max().item()
        assert torch.equal(a[name], b[name]), f"{name}: max diff {diff:.3g}"


def input_ids(batches) -> list:
    return [b["input_ids"].tolist() for b in batches]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_trainer_equals_the_mezo_optimizer_loop_bit_for_bit(tmp_path, lora):
    """K steps of MeZOTrainer and of mezo.MeZO on a copy, on the batches the Trainer drew: the
    same L+, L−, projected gradients, lrs and losses, and the same trained tensors; no parameter
    ever gets a .grad."""
    model = tiny(lora)
    ref = copy.deepcopy(model)
    t = run(model, tmp_path)
    assert len(t.batches) == 4 and all(len(b["input_ids"]) == 4 for b in t.batches)
    want = reference(ref, t.batches, t.args, 4)
    assert t.mezo_history == want
    logged = [r["loss"] for r in t.state.log_history if "loss" in r]
    assert logged == [pytest.approx(r["loss"]) for r in want]  # the Trainer's log: (L+ + L−)/2
    assert_equal_tensors(trained(model), trained(ref))
    assert all(p.grad is None for p in model.parameters())
    if lora:  # only the adapter moved
        assert all("lora_" in n for n in trained(model))
        base = dict(ref.named_parameters())
        assert all(torch.equal(p, base[n]) for n, p in model.named_parameters()
                   if not p.requires_grad)


def test_label_smoothing_trains_on_the_smoothed_loss_at_both_points(tmp_path):
    """label_smoothing_factor pops the labels from the batch inside Trainer.compute_loss: the second forward of a step
    (θ−εz) had got a batch without them and failed ("The model did not return a loss"). Each step's L+ and L− are the
    label-smoothed loss, as a plain loop on the same batches computes it."""
    from transformers.trainer_pt_utils import LabelSmoother
    model = tiny(False)
    ref = copy.deepcopy(model)
    t = run(model, tmp_path, max_steps=2, label_smoothing_factor=0.1)
    smooth = LabelSmoother(epsilon=0.1)

    def loss(batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return smooth(ref(**inputs), batch["labels"], shift_labels=True)
    ref.eval()
    opt = mezo.MeZO([(n, p) for n, p in ref.named_parameters() if p.requires_grad], lr=LR, eps=EPS,
                    weight_decay=WD, seed=SEED)
    sched = get_scheduler("linear", opt, 0, 2)
    want = []
    for batch in t.batches:
        opt.step(lambda: loss(batch))
        want.append(opt.last)
        sched.step()
    assert t.mezo_history == want and all(r["loss_plus"] != r["loss_minus"] for r in want)
    assert_equal_tensors(trained(model), trained(ref))


def test_the_lr_scheduler_from_training_arguments_sets_each_steps_lr(tmp_path):
    t = run(tiny(True), tmp_path, max_steps=6, lr_scheduler_type="cosine", warmup_steps=2)
    opt = torch.optim.SGD([torch.zeros(1)], lr=LR)
    sched = get_scheduler("cosine", opt, 2, 6)
    want = []
    for _ in range(6):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [r["lr"] for r in t.mezo_history] == want
    assert want[0] == 0.0 and want[2] == LR  # warm-up from 0, then the cosine


def within_summation_order(a: list[dict], b: list[dict], ta: dict, tb: dict):
    """The module docstring's tolerances: losses within 16 ulps, g within 2·16 ulps/2ε, tensors
    within lr·Σ|Δg|·6 + 8 ulps of the largest entry."""
    assert [r["seed"] for r in a] == [r["seed"] for r in b]
    sum_g = 0.0
    for x, y in zip(a, b):
        ulps = 16 * 2.0 ** -23 * max(abs(x["loss_plus"]), 1.0)
        for key in ("loss_plus", "loss_minus"):
            assert abs(x[key] - y[key]) <= ulps, (x["step"], key, x[key], y[key])
        assert abs(x["projected_grad"] - y["projected_grad"]) <= 2 * ulps / (2 * EPS), (x, y)
        sum_g += abs(x["projected_grad"] - y["projected_grad"])
    for name in ta:
        tol = LR * 6 * sum_g + 8 * 2.0 ** -24 * ta[name].abs().max().item()
        assert (ta[name] - tb[name]).abs().max().item() <= tol, name


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_accumulation_2x4_is_one_step_over_batch_8(tmp_path, lora):
    """One MeZO step a Trainer step: the closure sums the two micro-batches' losses (each over the
    whole batch's tokens), so 2 x 4 follows batch 8 up to the order of the sums."""
    whole, accumulated = tiny(lora), tiny(lora)
    a = run(whole, tmp_path / "a", SAME_LENGTH, max_steps=3, per_device_train_batch_size=8)
    b = run(accumulated, tmp_path / "b", SAME_LENGTH, max_steps=3, gradient_accumulation_steps=2)
    assert len(b.batches) == 2 * len(a.batches) == 6
    assert [r["step"] for r in b.mezo_history] == [1, 2, 3]
    pairs = [x + y for x, y in zip(input_ids(b.batches[::2]), input_ids(b.batches[1::2]))]
    assert pairs == input_ids(a.batches)  # the same examples a step
    within_summation_order(a.mezo_history, b.mezo_history, trained(whole), trained(accumulated))


@pytest.mark.parametrize("lora, rule", [(False, "sgd"), (True, "sgd"), (True, "momentum")],
                         ids=["full", "lora", "lora-momentum"])
def test_resume_from_checkpoint_continues_the_same_trajectory(tmp_path, lora, rule):
    """6 steps unbroken against 3 steps, a checkpoint, and a new Trainer on a fresh model resumed
    from it: the same records and tensors, ==. With rule momentum the checkpoint holds its
    buffer."""
    whole = tiny(lora)
    a = run(whole, tmp_path / "a", max_steps=6, rule=rule)
    saving = dict(max_steps=6, save_strategy="steps", save_steps=3, rule=rule)
    first = run(tiny(lora), tmp_path / "b", **saving)
    checkpoint = tmp_path / "b" / "checkpoint-3"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert saved["mezo"]["steps"] == 3 and saved["mezo"]["seed"] == SEED
    assert bool(saved["mezo"]["rule"]) == (rule == "momentum")  # the rule's buffers
    if lora:  # PEFT's own format
        assert (checkpoint / "adapter_model.safetensors").exists()
        assert (checkpoint / "adapter_config.json").exists()
    resumed_model = tiny(lora)
    resumed = run(resumed_model, tmp_path / "b", resume=str(checkpoint), **saving)
    assert first.mezo_history == a.mezo_history  # the run that wrote the checkpoints, unbroken
    assert resumed.mezo_history == a.mezo_history[3:]
    assert input_ids(resumed.batches) == input_ids(a.batches[3:])
    assert_equal_tensors(trained(resumed_model), trained(whole))
    if rule == "momentum":  # resumed with other arguments, or from another optimizer's checkpoint: what to pass
        with pytest.raises(ValueError, match=r"trained with rule='momentum', and these arguments give rule='sgd': "
                                             r"resume with MeZOTrainingArguments\(rule='momentum', ...\)$"):
            run(tiny(lora), tmp_path / "c", resume=str(checkpoint), **(saving | dict(rule="sgd")))
        adamw = shutil.copytree(checkpoint, tmp_path / "adamw")
        model = tiny(lora)
        torch.save(torch.optim.AdamW(p for p in model.parameters() if p.requires_grad).state_dict(),
                   adamw / "optimizer.pt")
        with pytest.raises(ValueError, match=r"optimizer.pt is not MeZO's \(a Trainer with another optimizer, e.g. "
                                             r"AdamW, wrote it\): resume a MeZOTrainer's checkpoint, or train on"):
            run(model, tmp_path / "d", resume=str(adamw), **saving)


def test_evaluation_and_compute_metrics_work_as_usual(tmp_path):
    seen = []

    def metrics(pred):
        seen.append(pred.predictions.shape)
        return {"tokens": float(pred.label_ids.size)}

    tok = make_tokenizer(causal=True)
    args = arguments(tmp_path, eval_strategy="steps", eval_steps=2)
    t = trainer.MeZOTrainer(model=tiny(True), args=args, train_dataset=Texts(SENTENCES, tok),
                            eval_dataset=Texts(SENTENCES[:4], tok), compute_metrics=metrics,
                            data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    t.train()
    evals = [r for r in t.state.log_history if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and len(seen) == 2
    assert all("eval_tokens" in r for r in evals)
    assert not any("grad_norm" in r for r in t.state.log_history)  # no gradient, no norm of one


def frozen_model():
    model = make_model("llama")
    model.requires_grad_(False)
    return model


@pytest.mark.parametrize("bad, words", [
    (dict(gradient_checkpointing=True), "gradient_checkpointing"),
    (dict(max_grad_norm=1.0), "max_grad_norm"),
    (dict(optim="sgd"), "optim"),
    (dict(optimizers=(torch.optim.SGD([torch.zeros(1)]), None)), "optimizers="),
    (dict(rule="lion"), "rule"),
    (dict(eps=0.0), "MeZOTrainer: eps=0.0; give a finite number > 0"),
    (dict(eps="1e-3"), "MeZOTrainer: eps='1e-3'; give a finite number > 0"),
    (dict(n_samples=0), "MeZOTrainer: n_samples=0; give a whole number >= 1"),
    (dict(beta=1.0), "MeZOTrainer: beta=1.0; give 0 <= beta < 1"),
    (dict(learning_rate=-1e-3), "MeZOTrainer: learning_rate=-0.001; give a finite number >= 0"),
    (dict(weight_decay=float("inf")), "MeZOTrainer: weight_decay=inf; give a finite number >= 0"),
    (dict(model=frozen_model()), "requires_grad"),
])
def test_bad_input_gets_one_line(tmp_path, bad, words):
    bad = dict(bad)
    model = bad.pop("model", None) or tiny(True)
    optimizers = {k: bad.pop(k) for k in ("optimizers",) if k in bad}
    with pytest.raises(ValueError) as e:
        trainer.MeZOTrainer(model=model, args=arguments(tmp_path, **bad), **optimizers)
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("model_dtype, bf16", [(torch.bfloat16, False), (torch.float32, True),
                                               (torch.float32, False)], ids=["bf16-model", "bf16=True", "float32"])
def test_an_eps_too_small_for_the_forwards_precision_warns_once_and_training_goes_on(tmp_path, model_dtype, bf16):
    """As --dtype bfloat16 with a small --eps on the command line (runs.PRECISION_ERROR, docs/precision.md): a
    bfloat16 model, or bf16=True's mixed precision, with eps=1e-3 gets one warning naming the eps the table
    recommends; eps=3e-2, or float32, gets none."""
    import warnings
    for eps in (1e-3, 3e-2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t = run(tiny(False).to(model_dtype), tmp_path / f"{eps}", eps=eps, bf16=bf16, max_steps=1)
        said = [str(w.message) for w in caught if "MeZOTrainer" in str(w.message)]
        assert len(t.mezo_history) == 1
        if eps == 1e-3 and (bf16 or model_dtype == torch.bfloat16):
            assert len(said) == 1 and "in bfloat16" in said[0] and "eps=0.03 measured 0.19" in said[0], said
        else:
            assert said == [], said


def test_two_gloo_processes_follow_the_one_process_trajectory(tmp_path):
    """torchrun, 2 ranks of batch 4 each against one process of batch 8: the ranks average L± (two
    scalars a step), each applies the update itself, and both end with the one-process tensors
    (within the sums' order: the module docstring)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "MASTER_ADDR": "127.0.0.1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           __file__, str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for lora in (False, True):
        model = tiny(lora)
        one = run(model, tmp_path / f"one-{lora}", SAME_LENGTH, max_steps=3,
                  per_device_train_batch_size=8)
        ranks = [torch.load(tmp_path / f"two-{lora}" / f"rank{r}.pt", weights_only=True)
                 for r in (0, 1)]
        assert [r["world"] for r in ranks] == [2, 2]
        assert ranks[0]["batches"] == ranks[1]["batches"] == [4, 4, 4]  # half the batch each
        assert not ranks[0]["ddp"]  # the Trainer did not wrap the model in DDP
        assert ranks[0]["history"] == ranks[1]["history"]  # one loss on every rank: one update
        assert_equal_tensors(ranks[0]["tensors"], ranks[1]["tensors"])  # no weights sent
        within_summation_order(one.mezo_history, ranks[0]["history"], trained(model),
                               ranks[0]["tensors"])


if __name__ == "__main__":  # the worker: python -m torch.distributed.run ... test_trainer.py OUT
    torch.set_num_threads(1)
    for lora in (False, True):
        out = Path(sys.argv[1]) / f"two-{lora}"
        model = tiny(lora)
        t = run(model, out, SAME_LENGTH, max_steps=3, per_device_train_batch_size=4)
        out.mkdir(parents=True, exist_ok=True)
        ddp = isinstance(t.model_wrapped, torch.nn.parallel.DistributedDataParallel)
        torch.save(dict(history=t.mezo_history, tensors=trained(model), ddp=ddp,
                        world=t.accelerator.num_processes,
                        batches=[len(b["input_ids"]) for b in t.batches]),
                   out / f"rank{os.environ['RANK']}.pt")
    # the group the Trainer's accelerator made, closed by every rank together: left to the
    # interpreter's exit, a rank's gloo threads were once torn down mid-use ("terminate called
    # without an active exception", exit code -6, after the ranks had saved)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


class PerExampleLoss(trainer.MeZOTrainer):
    """A user's compute_loss that forgot to reduce its losses (one per token), or gives a plain number."""

    reduce = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = model(input_ids=inputs["input_ids"]).logits
        losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), inputs["labels"].flatten(), reduction="none")
        return losses if self.reduce is None else self.reduce(losses)


def test_a_loss_that_is_not_one_number_is_one_line(tmp_path):
    """compute_loss giving a loss per token (not reduced) had ended in a RuntimeError deep in the step; it is one
    TypeError that says what to give. A plain number is a loss, as MeZO.step takes one (it had been an
    AttributeError)."""
    PerExampleLoss.reduce = None
    with pytest.raises(TypeError, match=r"^MeZOTrainer: compute_loss must give one loss per batch, a number or a "
                                        r"one-element tensor .*; it returned a tensor of shape \(\d+,\)$"):
        run(tiny(False), tmp_path, cls=PerExampleLoss, max_steps=1)
    PerExampleLoss.reduce = staticmethod(lambda losses: float(losses.mean()))
    t = run(tiny(False), tmp_path, cls=PerExampleLoss, max_steps=1)
    assert len(t.mezo_history) == 1 and math.isfinite(t.mezo_history[0]["loss"])
