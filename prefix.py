"""--mode prefix: MeZO-prefix (the MeZO paper's prefix-tuning, after Li & Liang 2021). Every
attention layer gets --num-prefix virtual tokens: a key and a value per token and key/value head,
trained, that every real token attends to (the attention mask is extended to cover them; padding
stays masked; a causal model's real tokens keep their causal mask among themselves and see every
virtual token). The real tokens keep their positions.

Initialised as the paper's code does it (`init_by_real_act`): --num-prefix random vocabulary tokens
(from the run seed) are run through the model, and each layer's keys and values of them become its
prefix.

It plugs into transformers' attention-function registry, so every model whose attention goes through
it (Llama, RoBERTa, ... in transformers 5) takes it: the tensors live on each attention module as
`prefix_key` and `prefix_value`, shape (key/value heads, num_prefix, head dim), and the checkpoint
holds them by those names.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .errors import UsageError
from .models import max_tokens

NAME = "mezo_prefix"  # the attention implementation registered with transformers
SUFFIXES = (".prefix_key", ".prefix_value")


def _attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention with the module's prefix keys and values before the real
    tokens'."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    # initialisation: keep the keys and values of the random tokens
    if getattr(module, "prefix_capture", False):
        module.prefix_captured = (key[0].detach().clone(), value[0].detach().clone())
        # as sdpa would
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if hasattr(module, "prefix_key"):
        b, t, s = key.shape[0], query.shape[2], key.shape[2]
        pk, pv = module.prefix_key, module.prefix_value  # (heads, P, D)
        p = pk.shape[1]
        key = torch.cat([pk.to(key.dtype)[None].expand(b, -1, -1, -1), key], dim=2)
        value = torch.cat([pv.to(value.dtype)[None].expand(b, -1, -1, -1), value], dim=2)
        if attention_mask is None:  # no padding: causal among the real tokens, or everything
            real = torch.ones(t, s, dtype=torch.bool, device=query.device)
            if getattr(module, "is_causal", False):
                real = real.tril(s - t)
            attention_mask = real[None, None]
        shape, device = (*attention_mask.shape[:-1], p), attention_mask.device
        if attention_mask.dtype == torch.bool:
            seen = torch.ones(shape, dtype=torch.bool, device=device)
        else:  # an additive float mask: 0 where attended
            seen = torch.zeros(shape, dtype=attention_mask.dtype, device=device)
        attention_mask = torch.cat([seen, attention_mask], dim=-1)
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, attention_mask, is_causal=False,
                                  **kwargs)


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    AttentionInterface.register(NAME, _attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The self-attention modules that call transformers' attention functions, in model order."""
    def attends(m: nn.Module) -> bool:
        projects = any(hasattr(m, a) for a in ("k_proj", "key"))
        return projects and hasattr(m, "config") and hasattr(m, "layer_idx")
    found = [(n, m) for n, m in model.named_modules() if attends(m)]
    if not found:
        kind = type(model).__name__
        raise UsageError(f"--mode prefix: no attention layer of {kind} takes a prefix here (it "
                         "needs transformers' attention-function registry, as Llama, OPT and "
                         "RoBERTa have); use --mode lora")
    return found


@torch.no_grad()
def add_prefix(model: nn.Module, num_prefix: int, seed: int, dtype=None) -> list[str]:
    """Add prefix_key / prefix_value to every attention layer, initialised from the real activations
    of num_prefix random vocabulary tokens; return the modules' names."""
    register()
    modules = attention_modules(model)
    positions = max_tokens(model)
    if positions and num_prefix > positions:  # the initialisation runs them as one sequence
        raise UsageError(f"--num-prefix {num_prefix} is more than the model's {positions} "
                         f"positions (the prefix starts from their activations in one sequence); "
                         f"pick at most {positions} (paper: 5)")
    model.config._attn_implementation = NAME
    for _, m in modules:
        m.config._attn_implementation = NAME
        m.prefix_capture = True
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, num_prefix), generator=gen)
    device = next(model.parameters()).device
    try:
        model.base_model(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device))
    finally:
        for _, m in modules:
            m.prefix_capture = False
    for name, m in modules:
        if not hasattr(m, "prefix_captured"):
            raise UsageError(f"--mode prefix: {name} did not run through the attention registry; "
                             "use --mode lora")
        k, v = m.__dict__.pop("prefix_captured")
        m.prefix_key = nn.Parameter(k.to(dtype or k.dtype).contiguous())
        m.prefix_value = nn.Parameter(v.to(dtype or v.dtype).contiguous())
    return [n for n, _ in modules]
