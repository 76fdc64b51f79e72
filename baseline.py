"""The first-order baseline (--optimizer adam): what MeZO replaces. The same trainable tensors,
batches and eval-mode forwards (no dropout), but a forward with autograd and a backward per step,
then AdamW. Weight decay is decoupled (AdamW) and skips biases and norm weights, as MeZO's does; wd
= 0 makes it Adam. Plain values in: tensors with their names and weight-decay flags."""
from __future__ import annotations

import torch

from .errors import NonFiniteLoss

ADAM = "adam:"  # checkpoint names of AdamW's state: adam:<exp_avg|exp_avg_sq|step>:<tensor name>


def adam_optimizer(tensors: list[tuple[torch.Tensor, bool]], lr: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over (tensor, decays) pairs: weight decay on the tensors that decay (2-D and up), none
    on the rest."""
    groups = [dict(params=[t for t, decay in tensors if decay], weight_decay=weight_decay),
              dict(params=[t for t, decay in tensors if not decay], weight_decay=0.0)]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def adam_step(optimizer: torch.optim.Optimizer, loss_fn) -> float:
    """One backpropagation step. loss_fn returns the batch's mean loss as a tensor that autograd can
    differentiate, or an iterable of its parts (one per micro-batch: the part's summed loss / batch
    size), each made after the last one's backward, so only one micro-batch's activations are alive
    at a time."""
    optimizer.zero_grad(set_to_none=True)
    loss = 0.0
    with torch.enable_grad():
        parts = loss_fn()
        for part in [parts] if torch.is_tensor(parts) else parts:
            if not torch.isfinite(part):
                raise NonFiniteLoss(f"loss={part.item()}")  # before optimizer.step: θ is as it was
            part.backward()  # keeps the part's activations until here: the memory MeZO avoids
            loss += part.item()
    optimizer.step()
    return loss


def adam_update(optimizer: torch.optim.Optimizer, lr: float):
    """The baseline's step in mezo.train's loop, in MeZO's place: (step, the step's loss) -> what
    the log keeps. The loss's parts() are the batch's differentiable micro-batch losses."""
    def update(step: int, loss_fn) -> dict:
        return dict(loss=adam_step(optimizer, loss_fn.parts), lr=lr)
    return update


def adam_state(optimizer: torch.optim.Optimizer, named: dict) -> dict:
    """AdamW's moments and step counts as checkpoint tensors: {adam:<key>:<name>: tensor}."""
    return {f"{ADAM}{key}:{name}": value for name, t in named.items()
            for key, value in optimizer.state.get(t, {}).items()}


def restore_adam_state(optimizer: torch.optim.Optimizer, named: dict, tensors: dict) -> None:
    """The inverse of adam_state: AdamW keeps `step` on the CPU and the moments beside their tensor.
    """
    for name, t in named.items():
        state = {key: tensors[f"{ADAM}{key}:{name}"] for key in ("step", "exp_avg", "exp_avg_sq")
                 if f"{ADAM}{key}:{name}" in tensors}
        if state:
            optimizer.state[t] = {k: v if k == "step" else v.to(t.device) for k, v in state.items()}
