"""MeZO inside Hugging Face's `Trainer`: the training step is `mezo.MeZO.step`, with a closure that
computes the model's own loss on the step's batch without autograd. Everything else is the Trainer a
user already has: datasets, collators, `TrainingArguments`, the lr scheduler, logging, evaluation
with `compute_metrics`, checkpoints and `resume_from_checkpoint`.

    from mezo.trainer import MeZOTrainer, MeZOTrainingArguments
    args = MeZOTrainingArguments(output_dir="out", learning_rate=1e-4, eps=1e-3, max_steps=100)
    MeZOTrainer(model=model, args=args, train_dataset=train, data_collator=collator).train()

How this differs from the reference (mezo.py's loop): nothing in the step itself. `mezo.MeZO.step`
runs it on the model's `requires_grad` parameters, in named_parameters order, with
TrainingArguments' learning_rate, weight_decay and seed, so on the same batches it gives mezo.MeZO's
numbers bit for bit (tests/test_trainer.py). What the Trainer adds is around the step:

- Gradient accumulation: the Trainer hands `training_step` one micro-batch at a time. They are kept
  (token ids only) until the step's last one, and then one MeZO step runs over all of them: the
  closure adds the micro-batches' losses as the Trainer scales them (over the whole batch's tokens
  when the model takes `num_items_in_batch`, else each divided by their number), so it is one MeZO
  step over the whole batch, not one per micro-batch.
- Forwards run in eval mode (no dropout): L+ and L− must be the same function at two points.
- Data parallel (torchrun): each rank runs its part of the batch and the ranks average L± (an
  all_reduce of two scalars a step). The model is never wrapped in DistributedDataParallel, which
  would only sync gradients there are none of: weights are never communicated, every rank applies
  the same update from the same noise.
- Checkpoints hold MeZO's state_dict (step count, seed, the rule's buffers) where the Trainer keeps
  an optimizer's, so `resume_from_checkpoint` continues the same trajectory. A PEFT model saves its
  adapter in PEFT's own format.

Refused with one line: gradient_checkpointing (there is no backward to save memory for),
max_grad_norm > 0 (there is no gradient to clip; the step's projected gradient is one scalar), an
optimizer of one's own (optim, optim_args, optimizers=, optimizer_cls_and_kwargs), DeepSpeed and
FSDP (they shard for a backward), and a model with no trainable parameters.
"""
import copy
import dataclasses
import functools
import numbers
import warnings

import torch
import torch.distributed as dist
from transformers import Trainer, TrainingArguments

import mezo
from mezo import options, runs


def field(default, help: str):
    return dataclasses.field(default=default, metadata={"help": help})


# -----------------------------------------------------------------------------
# Arguments: TrainingArguments plus MeZO's own settings


@dataclasses.dataclass
class MeZOTrainingArguments(TrainingArguments):
    """TrainingArguments with MeZO's settings. learning_rate, weight_decay, seed and the lr
    scheduler are the Trainer's own; weight decay skips 1-D tensors (biases, norm weights), as
    mezo.MeZO does."""

    eps: float = field(1e-3, "MeZO's perturbation scale ε")
    n_samples: int = field(1, "perturbations z a step, their estimates averaged (Algorithm 2)")
    rule: str = field("sgd", "ZO-SGD (sgd), or rules.py's momentum, adam, sign or conservative")
    beta: float = field(0.9, "rule momentum's β, rule adam's β1")
    fast: bool = field(False, "fast/'s backend, same numbers: compiled on CPUs, Triton on GPUs")
    max_grad_norm: float = field(0.0, "must stay 0: MeZO has no gradient to clip")


MEZO_DEFAULTS = {f.name: f.default for f in dataclasses.fields(MeZOTrainingArguments)
                 if f.name in ("eps", "n_samples", "rule", "beta", "fast")}  # for TrainingArguments
DEFAULT_OPTIM = next(f.default for f in dataclasses.fields(TrainingArguments) if f.name == "optim")
RULES = ("sgd", "momentum", "adam", "sign", "conservative")


def setting(args: TrainingArguments, name: str):
    return getattr(args, name, MEZO_DEFAULTS[name])


def check_args(args: TrainingArguments, kwargs: dict) -> None:
    """One line for each thing MeZOTrainer cannot do, before the Trainer sets anything up."""
    if args.gradient_checkpointing:
        raise ValueError("MeZOTrainer: gradient_checkpointing=True saves activations for a "
                         "backward pass, and MeZO runs none; set gradient_checkpointing=False")
    if args.max_grad_norm and args.max_grad_norm > 0:
        raise ValueError(f"MeZOTrainer: max_grad_norm={args.max_grad_norm}, but MeZO has no "
                         "gradient to clip (its projected gradient is one scalar a step); set "
                         "max_grad_norm=0, MeZOTrainingArguments' default")
    optim = getattr(args.optim, "value", args.optim)  # an OptimizerNames after __post_init__
    if optim != DEFAULT_OPTIM or args.optim_args or args.optim_target_modules:
        raise ValueError(f"MeZOTrainer: optim={optim!r}, optim_args={args.optim_args!r}, "
                         f"optim_target_modules={args.optim_target_modules!r}: its optimizer is "
                         "MeZO; leave them unset, and set MeZOTrainingArguments' eps, rule, ...")
    own = kwargs.get("optimizers", (None, None))
    if any(x is not None for x in own) or kwargs.get("optimizer_cls_and_kwargs"):
        raise ValueError("MeZOTrainer makes its own optimizer (mezo.MeZO) and the lr scheduler "
                         "that TrainingArguments' lr_scheduler_type names; pass neither "
                         "optimizers= nor optimizer_cls_and_kwargs=")
    if args.deepspeed or args.fsdp:
        raise ValueError("MeZOTrainer: DeepSpeed and FSDP shard weights for a backward pass; MeZO "
                         "runs data parallel under plain torchrun; leave deepspeed and fsdp unset")
    if setting(args, "rule") not in RULES:
        raise ValueError(f"MeZOTrainer: rule={setting(args, 'rule')!r}; the rules are "
                         f"{', '.join(RULES)}")
    # MeZO's numbers, in the Trainer's words and before train() makes the optimizer
    real = options.finite  # as MeZO's own constructor checks them
    lr, eps, n, beta = args.learning_rate, *(setting(args, k) for k in ("eps", "n_samples", "beta"))
    wd = args.weight_decay
    for name, value, ok, want in (
            ("learning_rate", lr, real(lr) and lr >= 0, "a finite number >= 0"),
            ("weight_decay", wd, real(wd) and wd >= 0, "a finite number >= 0"),
            ("eps", eps, real(eps) and eps > 0, "a finite number > 0 (the paper's: 1e-3)"),
            ("n_samples", n, isinstance(n, numbers.Integral) and n >= 1, "a whole number >= 1"),
            ("beta", beta, real(beta) and 0 <= beta < 1, "0 <= beta < 1")):
        if not ok:
            raise ValueError(f"MeZOTrainer: {name}={value!r}; give {want}")


def trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"MeZOTrainer: {type(model).__name__} has no parameter with "
                         "requires_grad=True, so MeZO has nothing to train; unfreeze some, or "
                         "wrap it with peft.get_peft_model")
    return named


# -----------------------------------------------------------------------------
# The optimizer the Trainer holds


class TrainerMeZO(mezo.MeZO):
    """mezo.MeZO, whose step runs in MeZOTrainer.training_step (with the batch's closure). The
    Trainer then calls optimizer.step() with no closure, as it would after a backward: that call
    has nothing left to do."""

    def step(self, closure=None):
        return None if closure is None else super().step(closure)

    def load_state_dict(self, state_dict: dict) -> None:
        """resume_from_checkpoint's optimizer.pt: one of another optimizer or rule is told with
        the argument that fixes it (mezo.MeZO's own lines name its constructor)."""
        if "mezo" not in state_dict:
            raise ValueError("resume_from_checkpoint: the checkpoint's optimizer.pt is not MeZO's "
                             "(a Trainer with another optimizer, e.g. AdamW, wrote it): resume a "
                             "MeZOTrainer's checkpoint, or train on from its model weights without "
                             "resume_from_checkpoint")
        saved = state_dict["mezo"].get("rule_name", self.rule_name())
        if saved != self.rule_name():
            raise ValueError(f"resume_from_checkpoint: the checkpoint was trained with rule="
                             f"{saved!r}, and these arguments give rule={self.rule_name()!r}: "
                             f"resume with MeZOTrainingArguments(rule={saved!r}, ...)")
        super().load_state_dict(state_dict)

# -----------------------------------------------------------------------------
# The Trainer


class MeZOTrainer(Trainer):
    """transformers.Trainer whose training step is one mezo.MeZO step on the step's whole batch.
    `mezo_history` holds each step's record (mezo.MeZO.last: step, seed, loss_plus, loss_minus,
    projected_grad, lr, loss)."""

    def __init__(self, model=None, args: TrainingArguments | None = None, **kwargs):
        args = args if args is not None else MeZOTrainingArguments(output_dir="tmp_trainer")
        check_args(args, kwargs)
        if model is not None:
            trainable(model)
        super().__init__(model=model, args=args, **kwargs)
        self.micro_batches, self.mezo_history = [], []

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            a, rule = self.args, setting(self.args, "rule")
            backend = None
            if setting(a, "fast"):
                from mezo.fast import choose
                backend = choose(a.device.type)
            if rule == "sgd":
                rule = None
            else:
                from mezo.rules import make
                rule = make(rule, setting(a, "beta"))
            # the forwards' precision (mixed precision's, else the model's): one warning if ε is
            # too small for it (runs.PRECISION_ERROR, docs/precision.md)
            dtype = "bfloat16" if a.bf16 else "float16" if a.fp16 else \
                str(getattr(self.model, "dtype", torch.float32)).removeprefix("torch.")
            note = runs.precision_note(dtype, setting(a, "eps"), "eps=")
            if note:
                warnings.warn(f"MeZOTrainer: {note}", stacklevel=2)
            self.optimizer = TrainerMeZO(trainable(self.model), lr=a.learning_rate,
                                         eps=setting(a, "eps"), weight_decay=a.weight_decay,
                                         n_samples=setting(a, "n_samples"), seed=a.seed,
                                         backend=backend, rule=rule)
        return self.optimizer

    @property
    def mezo_optimizer(self) -> TrainerMeZO:
        """The MeZO optimizer itself (accelerate wraps self.optimizer)."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        self.micro_batches.append(self._prepare_inputs(inputs))
        if len(self.micro_batches) < self.current_gradient_accumulation_steps:
            return torch.zeros((), device=self.args.device)  # the loss comes with the last one
        micro, self.micro_batches = self.micro_batches, []
        model.eval()  # no dropout: L+ and L− are one function at θ ± εz
        closure = functools.partial(self.batch_loss, model, micro, num_items_in_batch)
        loss = self.mezo_optimizer.step(closure)
        self.mezo_history.append(self.mezo_optimizer.last)
        return torch.tensor(loss, device=self.args.device)  # (L+ + L−)/2, the loss at θ, to log

    def batch_loss(self, model, micro: list[dict], num_items_in_batch) -> float:
        """The step's loss at the current θ: its micro-batches' losses, scaled as
        Trainer.training_step scales them, summed; under torchrun, averaged over the ranks (two
        scalars a step: this one at θ+εz, then at θ−εz)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:  # as Trainer.training_step decides it
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None
                      or self.compute_loss_func is not None)
        total = 0.0
        for inputs in micro:
            with self.compute_loss_context_manager():
                # a copy: the Trainer's compute_loss pops the labels (label smoothing, a
                # compute_loss_func), and the same batch runs at θ+εz and at θ−εz
                loss = self.compute_loss(model, copy.copy(inputs),
                                         num_items_in_batch=num_items_in_batch)
            part = loss if scaled else loss / len(micro)
            total += mezo.loss_value(part, "MeZOTrainer: compute_loss must give one loss per batch")
        if self.accelerator.num_processes > 1:
            t = torch.tensor(total, dtype=torch.float64, device=self.args.device)
            # Σ over ranks. Under average_tokens_across_devices (the default) each rank's loss is
            # its tokens' sum over the whole batch's count, times the ranks (compute_loss).
            dist.all_reduce(t)
            total = t.item() / self.accelerator.num_processes
        return total

    def _get_grad_norm(self, model, grad_norm=None):
        return None  # there are no gradients (the Trainer would log a norm of 0.0)

    def _wrap_model(self, model, training=True, dataloader=None):
        # No nn.DataParallel or other wrapper for training: they replicate or sync for a backward.
        return model if training else super()._wrap_model(model, training, dataloader)

    def create_accelerator_and_postprocess(self) -> None:
        """As the Trainer's, but accelerate prepares the model as for evaluation (placement, mixed
        precision, compile): under torchrun it would otherwise wrap it in DistributedDataParallel,
        as it wraps any model with a requires_grad parameter. MeZO's ranks share two scalars a step
        (batch_loss), never weights or gradients."""
        super().create_accelerator_and_postprocess()
        prepare_model = self.accelerator.prepare_model

        def prepare_without_ddp(model, device_placement=None, evaluation_mode=False):
            return prepare_model(model, device_placement=device_placement, evaluation_mode=True)
        self.accelerator.prepare_model = prepare_without_ddp
