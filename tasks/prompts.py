"""Prompts: an example's sentences become token ids in a template, read at one position by the
model's LM head.

Masked LMs read the label words at <mask>; causal LMs read them as the next token after the text
before {mask} (the label word would come where {mask} stands). A label word of several tokens
(causal LMs only) is scored by the summed log-probability of its tokens after the prompt, as the
MeZO paper's OPT code scores its candidates: the batch then holds one row per (example, class),
prompt + the word's tokens, and the positions to read. Examples are dicts {ids, position, label}
(and `candidates`, the label words' token ids, when one has several).
"""
from __future__ import annotations

import re
import string

import torch

from ..errors import UsageError

# {sentence}, {sentence1:-}, {sentence2:l}, ...
FIELD = re.compile(r"\{(sentence[12]?)(?::([-l]*))?\}")
PLACEHOLDER = re.compile(r"\{[^{}]*\}")  # anything in braces: a field, {mask}, or a mistake: {foo}


def check_template(template: str, pair: bool) -> None:
    """The fields a task needs are in its template and nothing else is in braces, or one line that
    says which are missing or unknown."""
    unknown = [p for p in PLACEHOLDER.findall(template) if p != "{mask}" and not FIELD.fullmatch(p)]
    if unknown:
        raise UsageError(f"--template {template!r}: unknown placeholder {', '.join(unknown)}; a "
                         "template takes {sentence} (or {sentence1} and {sentence2}, each may end "
                         "in :- or :l) and {mask}")
    if {"{", "}"} & set(PLACEHOLDER.sub("", template)):  # e.g. "{mask" or "sentence}"
        raise UsageError(f"--template {template!r}: a brace without its pair; a template takes "
                         "{sentence} (or {sentence1} and {sentence2}) and {mask}, each in one pair "
                         "of braces")
    if template.count("{mask}") > 1:
        raise UsageError(f"--template {template!r}: {{mask}} appears "
                         f"{template.count('{mask}')} times; the label word is read at one place, "
                         "so give one {mask}")
    fields = {"sentence1" if name == "sentence" else name for name, _ in FIELD.findall(template)}
    want = {"sentence1", "sentence2"} if pair else {"sentence1"}
    if want - fields or (not pair and "sentence2" in fields):
        need = ("{sentence1} and {sentence2}" if pair
                else "{sentence} (or {sentence1}) and no {sentence2}")
        raise UsageError(f"--template {template!r}: this task's examples are "
                         f"{'pairs' if pair else 'single sentences'}, so the template needs {need}")


def check_causal_template(template: str, default: str) -> None:
    """A causal LM reads the label word as the token after the text before {mask}, and the rest is
    cut (encode): a sentence after {mask} (LM-BFF's masked-LM templates of RTE, TREC, ...) would
    never be seen, so it is refused in one line."""
    after = [m.group(0) for m in FIELD.finditer(template.partition("{mask}")[2])]
    if after:
        raise UsageError(f"--template {template!r}: a causal LM predicts the label word after the "
                         f"text before {{mask}}, so what follows it is cut, {', '.join(after)} "
                         f"with it; put every sentence before {{mask}} (the task's: {default!r})")


def fill(template: str, texts: tuple[str, ...], mask: str) -> str:
    """The template with the sentences and the mask token in it; `:-` drops a final punctuation mark
    (LM-BFF's `sent-`), `:l` lower-cases the first letter (LM-BFF's `sentl`)."""
    def field(m: re.Match) -> str:
        text = texts[1] if m.group(1) == "sentence2" else texts[0]
        edits = m.group(2) or ""
        if "-" in edits and text and text[-1] in string.punctuation:
            text = text[:-1]
        return text[:1].lower() + text[1:] if "l" in edits else text
    return FIELD.sub(field, template).replace("{mask}", mask)


def label_tokens(tokenizer, words, kind: str) -> list[list[int]]:
    """Each label word's token ids, class 0 first. Masked LMs read one token at <mask>, so a word of
    several is refused in one line; causal LMs score several. Two classes with the same tokens are
    refused."""
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
    specials = set(tokenizer.all_special_ids)  # <unk>, <pad>, <mask>, ...
    for w, t in zip(words, ids):  # a word the scores cannot tell apart from other text
        if not t:
            raise UsageError(f"label word {w!r} has no tokens: give each class a word in "
                             "--label-words (comma-separated, class 0 first)")
        special = [i for i in t if i in specials]
        if special:
            token = tokenizer.convert_ids_to_tokens(special[0])
            why = (f"is not in the tokenizer's vocabulary (it reads as {token})"
                   if special[0] == tokenizer.unk_token_id else f"is the special token {token}")
            raise UsageError(f"label word {w!r} {why}: pick other --label-words")
    several = [f"{w!r} -> {tokenizer.convert_ids_to_tokens(t)}" for w, t in zip(words, ids)
               if len(t) != 1]
    if several and kind == "mlm":
        raise UsageError(f"label words must be single tokens for a masked LM's <mask>; not single: "
                         f"{'; '.join(several)}. Pick other --label-words (a leading space often "
                         "helps BPE tokenizers)")
    if len({tuple(t) for t in ids}) != len(ids):
        raise UsageError(f"label words {list(words)} map to the same tokens; pick distinct "
                         "--label-words")
    return ids


def label_token_ids(tokenizer, words) -> list[int]:
    """One token id per label word (masked LMs, and the one-position path of causal LMs)."""
    return [t[0] for t in label_tokens(tokenizer, words, "mlm")]


def encode(tokenizer, texts, template: str, kind: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of the prompt filled with the sentence(s) (a string, or a tuple for a pair), and
    the position whose logits are read. kind: "mlm" (read at the mask) or "causal" (read after the
    last token)."""
    words = [t.split() for t in ([texts] if isinstance(texts, str)
                                 else [t for t in texts if t is not None])]
    if kind == "causal":  # next-token prediction: the label word would come where {mask} stands
        template = template.split("{mask}")[0].rstrip(" ")
    while True:
        filled = fill(template, tuple(" ".join(w) for w in words), tokenizer.mask_token or "")
        ids = tokenizer(filled)["input_ids"]
        longest = max(words, key=len)
        if len(ids) <= max_length or not longest:
            break
        del longest[-max(1, len(ids) - max_length):]  # cut the longest sentence, never the prompt
    if len(ids) > max_length:
        raise UsageError(f"--max-length {max_length} is shorter than the prompt itself "
                         f"({len(ids)} tokens)")
    if kind == "mlm" and tokenizer.mask_token_id in ids:
        return ids, ids.index(tokenizer.mask_token_id)
    return ids, len(ids) - 1  # the last token (a --head cls template may have no {mask})


def encode_splits(tokenizer, data: dict, template: str, kind: str, max_length: int, n_classes: int,
                  candidates=None) -> dict:
    """{split: [example]} for train, dev and test, tokenised once. candidates: the label words'
    token ids, kept with each example when one has several tokens (a causal LM then scores whole
    words)."""
    several = candidates if candidates and any(len(c) > 1 for c in candidates) else None
    splits = {}
    for name in ("train", "dev", "test"):
        splits[name] = [dict(zip(("ids", "position"),
                                 encode(tokenizer, row[:-1], template, kind, max_length)),
                             label=row[-1], **(dict(candidates=several) if several else {}))
                        for row in data[name]]
        if any(not 0 <= e["label"] < n_classes for e in splits[name]):
            raise UsageError(f"{name} has labels beyond the {n_classes} --label-words; give one "
                             "word per class")
    return splits


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad to the longest row; `position` indexes each row's scoring token. With several-token
    label words, one row per (example, class): the prompt and the word but its last token; `row`,
    `position`, `target` and `group` (example·C + class) name every token to score."""
    candidates = examples[0].get("candidates") or [[]]
    # token ids of each row; (row, position, target, group) of each scored token
    rows, scored = [], []
    for i, e in enumerate(examples):
        for c, word in enumerate(candidates):
            rows.append(e["ids"] + word[:-1])
            scored += [(len(rows) - 1, e["position"] + j, t, i * len(candidates) + c)
                       for j, t in enumerate(word)]
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (R, T)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)  # (R, T)
    for i, r in enumerate(rows):
        input_ids[i, :len(r)] = torch.tensor(r)
        attention_mask[i, :len(r)] = 1
    labels = torch.tensor([e["label"] for e in examples])
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    if not scored:
        return batch | dict(position=torch.tensor([e["position"] for e in examples]))
    return batch | {k: torch.tensor(v)
                    for k, v in zip(("row", "position", "target", "group"), zip(*scored))}


def micro_batches(examples: list[dict], micro_batch: int, pad_id: int, device):
    """The examples as length-sorted micro-batches, collated on the device: a padded token costs as
    much as a real one, and the per-example results do not depend on the grouping."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["ids"]))
    for start in range(0, len(order), micro_batch):
        batch = collate([examples[i] for i in order[start:start + micro_batch]], pad_id)
        yield {k: v.to(device) for k, v in batch.items()}


def batch_logits(forward, examples: list[dict], micro_batch: int, pad_id: int,
                 device) -> tuple[torch.Tensor, ...]:
    """Label-word logits (N, C) and labels (N,) of examples, run as micro-batches through
    forward(batch)."""
    logits, labels = [], []
    for batch in micro_batches(examples, micro_batch, pad_id, device):
        logits.append(forward(batch))  # (b, C)
        labels.append(batch["labels"])
    return torch.cat(logits), torch.cat(labels)
