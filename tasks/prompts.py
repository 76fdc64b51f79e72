"""Prompts: a sentence becomes token ids in a template, read at one position by the model's LM head.

Masked LMs read the label words at <mask>; causal LMs read them as the next token after the text before
{mask} (the label word would come where {mask} stands). Examples are dicts {ids, position, label}; a batch
is right-padded, and `position` indexes each row's own scoring token.
"""
from __future__ import annotations

import torch

from errors import UsageError


def label_token_ids(tokenizer, words) -> list[int]:
    """One token id per label word, class 0 first; words that are not one token are refused in one line."""
    ids, bad = [], []
    for w in words:
        toks = tokenizer(w, add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            bad.append(f"{w!r} -> {tokenizer.convert_ids_to_tokens(toks)}")
        ids.extend(toks[:1])
    if bad:
        raise UsageError(f"label words must be single tokens for this tokenizer; not single: {'; '.join(bad)}. "
                         "Pick other --label-words (a leading space often helps BPE tokenizers)")
    if len(set(ids)) != len(ids):
        raise UsageError(f"label words {list(words)} map to the same token; pick distinct --label-words")
    return ids


def encode(tokenizer, sentence: str, template: str, kind: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of the prompt filled with the sentence, and the position whose logits are read.
    kind: "mlm" (read at the mask) or "causal" (read after the last token)."""
    text = template
    if kind == "causal":  # next-token prediction: the label word would come where {mask} stands
        text = template.split("{mask}")[0].rstrip()
    words = sentence.split()
    while True:
        filled = text.replace("{sentence}", " ".join(words)).replace("{mask}", tokenizer.mask_token or "")
        ids = tokenizer(filled)["input_ids"]
        if len(ids) <= max_length or not words:
            break
        words = words[:-max(1, len(ids) - max_length)]  # cut the sentence, never the prompt
    if len(ids) > max_length:
        raise UsageError(f"--max-length {max_length} is shorter than the prompt itself ({len(ids)} tokens)")
    if kind == "mlm" and tokenizer.mask_token_id in ids:
        return ids, ids.index(tokenizer.mask_token_id)
    return ids, len(ids) - 1  # the last token (a --head cls template may have no {mask})


def encode_splits(tokenizer, data: dict, template: str, kind: str, max_length: int, num_classes: int) -> dict:
    """{split: [example]} for train, dev and test, tokenised once; a label with no label word is refused."""
    splits = {}
    for name in ("train", "dev", "test"):
        splits[name] = [dict(zip(("ids", "position"), encode(tokenizer, s, template, kind, max_length)), label=y)
                        for s, y in data[name]]
        if any(not 0 <= e["label"] < num_classes for e in splits[name]):
            raise UsageError(f"{name} has labels beyond the {num_classes} --label-words; give one word per class")
    return splits


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad to the longest example; position indexes each row's own scoring token."""
    T = max(len(e["ids"]) for e in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(examples), T), dtype=torch.long)  # (B, T)
    for i, e in enumerate(examples):
        input_ids[i, :len(e["ids"])] = torch.tensor(e["ids"])
        attention_mask[i, :len(e["ids"])] = 1
    return dict(input_ids=input_ids, attention_mask=attention_mask,
                position=torch.tensor([e["position"] for e in examples]),
                labels=torch.tensor([e["label"] for e in examples]))


def micro_batches(examples: list[dict], micro_batch: int, pad_id: int, device):
    """The examples as length-sorted micro-batches, collated on the device: a padded token costs as much as
    a real one, and the per-example results do not depend on the grouping."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["ids"]))
    for start in range(0, len(order), micro_batch):
        batch = collate([examples[i] for i in order[start:start + micro_batch]], pad_id)
        yield {k: v.to(device) for k, v in batch.items()}


def batch_logits(forward, examples: list[dict], micro_batch: int, pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Label-word logits (N, C) and labels (N,) of examples, run as micro-batches through forward(batch)."""
    logits, labels = [], []
    for batch in micro_batches(examples, micro_batch, pad_id, device):
        logits.append(forward(batch))  # (b, C)
        labels.append(batch["labels"])
    return torch.cat(logits), torch.cat(labels)
