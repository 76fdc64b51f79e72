"""

cache/: exact reuse of computation that depends on no trainable tensor (the forward seam of
mezo.py).

How this differs from the reference (`mezo.PromptForward`): the reference runs the whole body on
every call: both ± passes of every step, and every evaluation. When every trainable tensor lies in
layers ≥ l0 (LoRA or full tuning of the top K layers, a --head cls head), the hidden states entering
layer l0 are a function of the example's tokens alone. `CachedForward` computes them once per
example, keeps them (unpadded, keyed by the token ids, in an LRU store under a byte cap) and runs
only layers l0.. with the model's own modules on each call. The logits equal the reference's up to
floating-point reassociation (a different batch shape reorders sums; in float64 they agree to
~1e-15, see tests/test_cache.py).

What is never reused (docs/design.md, "Exact reuse"): anything at or above the first trainable
layer. An activation computed at θ + εz served in the θ − εz pass changes L− by O(ε), the order of
the signal L+ − L− itself; so asking for a cache layer above the first trainable one raises
`UnsafeCache`.

Causal decoders (Llama family) also keep the keys/values of registered shared token prefixes (an
instruction, in-context demonstrations) in the frozen layers, in a prefix tree looked up by token
ids: a new example then runs the frozen layers on its own suffix only. Bidirectional encoders
(RoBERTa, BERT) cannot: every token attends to every other, so a prefix's states depend on what
follows; `prefix_kv` is False there and `prefix_kv_reason` says why, while the frozen-trunk reuse
still applies.

    python mezo.py --task sst2 --top-layers 4 --cache
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from mezo import PromptForward, Trainable, UsageError

__all__ = ["CachedForward", "UnsafeCache", "first_trainable_layer"]


class UnsafeCache(UsageError):
    """Asked to reuse an activation that depends on a trainable tensor: that would bias the
    estimate."""


def _body_parts(body: nn.Module):
    """(architecture, embedding module, list of transformer layers) of a supported body, else (None,
    ...)."""
    if all(hasattr(body, a) for a in ("embed_tokens", "layers", "rotary_emb", "norm")):
        # Llama, Mistral, Qwen2, SmolLM2, ...
        return "decoder", body.embed_tokens, list(body.layers)
    if hasattr(body, "embeddings") and hasattr(getattr(body, "encoder", None), "layer"):
        return "encoder", body.embeddings, list(body.encoder.layer)  # BERT, RoBERTa
    return None, None, []


def first_trainable_layer(model: nn.Module, params: list[Trainable]) -> int:
    """l0: the lowest layer holding a trainable tensor, or the number of layers when none does (a
    head only). -1 when the embeddings themselves are trainable (then nothing is frozen at all).
    Decided by tensor identity, not by names, so LoRA tensors, tied weights and heads are all seen
    for what they are."""
    _, embeddings, layers = _body_parts(model.base_model)
    trainable = {id(p.tensor) for p in params}
    if any(id(p) in trainable for p in embeddings.parameters()):
        return -1
    for i, layer in enumerate(layers):
        if any(id(p) in trainable for p in layer.parameters()):
            return i
    return len(layers)


class CachedForward(PromptForward):
    """Drop-in for `mezo.PromptForward`: (batch) -> label-word logits (B, C), reusing the frozen
    trunk; the head (one position a row, or every token of several-token label words) is the
    reference's own."""

    def __init__(self, model: nn.Module, label_ids: list[int], params: list[Trainable],
                 max_bytes: int = 1 << 30, layer: int | None = None):
        super().__init__(model, label_ids)
        self.arch, self.embeddings, self.layers = _body_parts(self.body)
        if self.arch is None:
            raise UsageError("--cache supports Llama-style decoders and BERT/RoBERTa encoders, "
                             f"not {type(self.body).__name__}; drop --cache")
        first = first_trainable_layer(model, params)
        if first < 0:
            raise UsageError("--cache: the embeddings are trainable, so no computation is frozen; "
                             "drop --cache or train only the top layers (--top-layers K)")
        self.l0 = first if layer is None else layer
        if not 0 <= self.l0 <= first:
            held = [p.name for p in params
                    if any(p.tensor is q for q in self.layers[first].parameters())] \
                if first < len(self.layers) else []
            raise UnsafeCache(f"refusing to cache the input of layer {self.l0}: layer {first} "
                              f"holds trainable tensors ({', '.join(held[:2])}), so that "
                              "activation moves with θ ± εz; reusing it across the ± passes "
                              f"would bias the gradient estimate (cache at ≤ {first})")
        # The tensors the cached states depend on: embeddings and layers < l0, all frozen by
        # construction.
        self.frozen = [p for m in [self.embeddings, *self.layers[:self.l0]] for p in m.parameters()]
        trainable = {id(p.tensor) for p in params}
        assert not any(id(p) in trainable for p in self.frozen)
        self.max_bytes = max_bytes
        # ids -> (T, H), oldest first
        self.store: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        self.hits = self.misses = self.evictions = self.invalidations = self.nbytes = 0
        self.prefix_hits = self.prefix_tokens_saved = 0
        self._fingerprint = self._frozen_fingerprint()
        self.prefix_kv = (self.arch == "decoder"
                          and getattr(self.body.config, "sliding_window", None) is None)
        self.prefix_kv_reason = (None if self.prefix_kv else
                                 "bidirectional encoder: every token attends to every other, so a "
                                 "prefix's keys/values depend on the tokens after it; only the "
                                 "per-example trunk is reused"
                                 if self.arch == "encoder" else
                                 "sliding-window attention: prefix KV not supported")
        # prefix tree: token id -> child dict; key None -> (k/v per layer, hidden)
        self.prefixes: dict = {}
        self.prefix_bytes = 0

    # --- validity ---------------------------------------------------------------------------------

    def _frozen_fingerprint(self) -> tuple:
        # Storage address and version counter of every frozen tensor: any in-place write (copy_,
        # add_, load_state_dict) bumps _version; a swapped tensor changes the address. Cheap: no
        # data is read. Writes through `.data` bypass the version counter: call invalidate() after
        # those.
        return tuple((p.data_ptr(), p._version, p.dtype, p.device, tuple(p.shape))
                     for p in self.frozen)

    def invalidate(self) -> None:
        """Forget every stored state (frozen weights changed)."""
        self.store.clear()
        self.prefixes.clear()
        self.nbytes = self.prefix_bytes = 0
        self.invalidations += 1
        self._fingerprint = self._frozen_fingerprint()

    def _check_valid(self) -> None:
        if self._frozen_fingerprint() != self._fingerprint:
            self.invalidate()

    def stats(self) -> dict:
        return dict(layer=self.l0, layers=len(self.layers), entries=len(self.store), hits=self.hits,
                    misses=self.misses, bytes=self.nbytes, max_bytes=self.max_bytes,
                    evictions=self.evictions, invalidations=self.invalidations,
                    prefixes=self._count_prefixes(self.prefixes),
                    prefix_bytes=self.prefix_bytes, prefix_hits=self.prefix_hits,
                    prefix_tokens_saved=self.prefix_tokens_saved)

    def prepare(self, sequences: list[list[int]]) -> str:
        """What mezo.train prints before the first step: what is reused, and the prompts' shared
        prefix, kept."""
        n = self.add_shared_prefix(sequences)
        return "cache: " + self.describe() + (f"; keys/values of the prompts' shared prefix ({n} "
                                              "tokens) kept for the frozen layers" if n else "")

    def describe(self) -> str:
        what = (f"reusing the input of layer {self.l0} of {len(self.layers)} per example"
                if self.l0 > 0 else
                "layer 0 holds trainable tensors: only the embeddings are reused")
        return what + ("" if self.prefix_kv else f"; no prefix KV ({self.prefix_kv_reason})")

    # --- the forward ------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, batch: dict) -> torch.Tensor:
        if self.model.training:  # dropout would make the trunk random: nothing could be reused
            raise UsageError("CachedForward needs model.eval() (MeZO's forwards run without "
                             "dropout)")
        self._check_valid()
        # (B, T) right-padded, as tasks/prompts.collate makes
        ids, mask = batch["input_ids"], batch["attention_mask"]
        lengths = mask.sum(1).tolist()
        keys = [tuple(ids[i, :n].tolist()) for i, n in enumerate(lengths)]
        found, missing = {}, {}  # row -> states; key -> rows that need it computed
        for i, key in enumerate(keys):
            if key in self.store:
                self.store.move_to_end(key)  # most recently used
                found[i] = self.store[key]
            else:
                missing.setdefault(key, []).append(i)
        # a key repeated within the batch is computed once: its other rows are hits
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        if missing:
            for key, h in zip(missing, self.trunk(list(missing))):
                found.update((i, h) for i in missing[key])
                self._put(key, h)
        hidden = torch.zeros(len(keys), ids.size(1), found[0].size(-1), dtype=found[0].dtype,
                             device=ids.device)
        for i, n in enumerate(lengths):
            # (B, T, H): re-padded; pad rows are masked out of every real token
            hidden[i, :n] = found[i]
        return self.head(self.upper(hidden, mask), batch)  # (B, C)

    def _put(self, key: tuple[int, ...], h: torch.Tensor) -> None:
        size = h.numel() * h.element_size()
        if key in self.store or size > self.max_bytes:
            return  # larger than the whole cap: computed, used, not kept
        self.store[key] = h
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, old = self.store.popitem(last=False)  # least recently used
            self.nbytes -= old.numel() * old.element_size()
            self.evictions += 1

    def _mask(self, hidden: torch.Tensor, mask: torch.Tensor, past=None, position_ids=None):
        """The 4-D attention mask the model's own forward would build (same helpers, same
        arguments)."""
        from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
        if self.arch == "decoder":
            return create_causal_mask(config=self.body.config, inputs_embeds=hidden,
                                      attention_mask=mask, past_key_values=past,
                                      position_ids=position_ids)
        return create_bidirectional_mask(config=self.body.config, inputs_embeds=hidden,
                                         attention_mask=mask)

    def _run(self, layers, hidden, mask, position_ids=None, past=None):
        """hidden (B, T, H) through the given layers, as the model's forward runs them."""
        if not layers:
            return hidden  # l0 = number of layers (a head alone is trained): nothing to run
        if self.arch == "encoder":
            attn = self._mask(hidden, mask)
            for layer in layers:
                hidden = layer(hidden, attn)
            return hidden
        if position_ids is None:
            position_ids = torch.arange(hidden.size(1), device=hidden.device).unsqueeze(0)  # (1, T)
        attn = self._mask(hidden, mask, past, position_ids)
        # (cos, sin), each (1, T, head_dim)
        rope = self.body.rotary_emb(hidden, position_ids=position_ids)
        for layer in layers:
            hidden = layer(hidden, attention_mask=attn, position_ids=position_ids,
                           past_key_values=past, use_cache=past is not None,
                           position_embeddings=rope)
        return hidden

    def upper(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Layers l0.. (which hold the trainable tensors) and the final norm: (B, T, H) -> last
        hidden state."""
        hidden = self._run(self.layers[self.l0:], hidden, mask)
        return self.body.norm(hidden) if self.arch == "decoder" else hidden

    def trunk(self, keys: list[tuple[int, ...]]) -> list[torch.Tensor]:
        """The states entering layer l0 of each example, unpadded (T_i, H). Examples under a
        registered prefix run the frozen layers on their suffix only, attending to the prefix's
        stored keys/values."""
        groups: dict[int, list[int]] = {}
        entries = {}
        for i, key in enumerate(keys):
            depth, entry = self._lookup(key)
            groups.setdefault(depth, []).append(i)
            entries[depth] = entry
        out: list[torch.Tensor | None] = [None] * len(keys)
        for depth, rows in groups.items():
            for i, h in zip(rows, self._trunk_group([keys[i] for i in rows], depth,
                                                    entries[depth])):
                out[i] = h
            if depth:
                self.prefix_hits += len(rows)
                self.prefix_tokens_saved += depth * len(rows)
        return out

    def _trunk_group(self, keys, depth: int, entry) -> list[torch.Tensor]:
        device = self.embeddings.weight.device if hasattr(self.embeddings, "weight") else \
            next(self.embeddings.parameters()).device
        suffixes = [k[depth:] for k in keys]
        T = max(len(s) for s in suffixes)
        # (B, T_suffix), right-padded
        ids = torch.zeros(len(keys), T, dtype=torch.long, device=device)
        # (B, prefix + T_suffix)
        mask = torch.zeros(len(keys), depth + T, dtype=torch.long, device=device)
        pad = getattr(self.body.config, "pad_token_id", None)
        ids.fill_(pad if pad is not None else 0)
        for i, s in enumerate(suffixes):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :depth + len(s)] = 1
        # (B, T, H)
        hidden = self.embeddings(input_ids=ids) if self.arch == "encoder" else self.embeddings(ids)
        if depth == 0:
            hidden = self._run(self.layers[:self.l0], hidden, mask)
            return [hidden[i, :len(s)].clone() for i, s in enumerate(suffixes)]
        from transformers import DynamicCache
        kv, prefix_hidden = entry  # per frozen layer (1, heads, P, d) keys and values; (P, H)
        past = DynamicCache(ddp_cache_data=[(k.expand(len(keys), -1, -1, -1),
                                             v.expand(len(keys), -1, -1, -1))
                                            for k, v in kv])
        # (1, T): after the prefix
        position_ids = torch.arange(depth, depth + T, device=device).unsqueeze(0)
        hidden = self._run(self.layers[:self.l0], hidden, mask, position_ids, past)
        return [torch.cat([prefix_hidden, hidden[i, :len(s)]]) for i, s in enumerate(suffixes)]

    # --- shared prefixes (causal decoders only) ---------------------------------------------------

    def _lookup(self, key: tuple[int, ...]):
        """(depth, entry) of the longest registered prefix of key that leaves at least one token
        after it."""
        node, best = self.prefixes, (0, None)
        for depth, tok in enumerate(key[:-1], start=1):
            node = node.get(tok)
            if node is None:
                break
            if None in node:
                best = (depth, node[None])
        return best

    @torch.no_grad()
    def add_prefix(self, ids: list[int]) -> bool:
        """Compute and keep the frozen layers' keys/values (and the states entering l0) of a token
        prefix. Returns False (and keeps nothing) where prefix KV does not apply: encoders, l0 = 0,
        empty prefix."""
        ids = [int(t) for t in ids]
        if not self.prefix_kv or self.l0 == 0 or not ids:
            return False
        self._check_valid()
        from transformers import DynamicCache
        x = torch.tensor([ids], device=next(self.embeddings.parameters()).device)  # (1, P)
        past = DynamicCache()
        hidden = self._run(self.layers[:self.l0], self.embeddings(x), torch.ones_like(x), None,
                           past)
        # (1, heads, P, d) each
        kv = [(layer.keys, layer.values) for layer in past.layers[:self.l0]]
        entry = (kv, hidden[0].clone())  # (P, H)
        node = self.prefixes
        for tok in ids:
            node = node.setdefault(tok, {})
        node[None] = entry
        self.prefix_bytes += sum(t.numel() * t.element_size() for pair in kv for t in pair) + \
            entry[1].numel() * entry[1].element_size()
        return True

    def add_shared_prefix(self, sequences: list[list[int]], min_length: int = 2) -> int:
        """Register the longest token prefix common to all sequences (a prompt's instruction); its
        length."""
        if not sequences or not self.prefix_kv:
            return 0
        # leave every sequence a token of its own
        first, n = sequences[0], min(len(s) for s in sequences) - 1
        for s in sequences[1:]:
            n = next((i for i in range(n) if s[i] != first[i]), n)
        if n < min_length:
            return 0
        return n if self.add_prefix(first[:n]) else 0

    @staticmethod
    def _count_prefixes(node: dict) -> int:
        return sum(1 if k is None else CachedForward._count_prefixes(v) for k, v in node.items())
