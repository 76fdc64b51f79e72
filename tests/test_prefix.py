"""--mode prefix (prefix.py): a causal and a masked tiny model against transformers' own key/value-cache path (an
independent computation of attention over prefix + tokens), padding, initialisation, training, resume, refusals."""
import copy
import inspect

import pytest
import torch
from conftest import expect_error, make_model, records, run, tiny_args
from safetensors.torch import load_file
from transformers import DynamicCache

import mezo
from mezo import checkpoints, models, prefix

P = 3


def cache_path(ref, modules, ids, mask):
    """The same prefix fed through transformers' cache (as past keys and values), real tokens at positions 0..T-1:
    the last hidden states, computed without prefix.py's attention function."""
    b, t = ids.shape
    cache = DynamicCache(config=ref.config)
    for i, m in enumerate(modules):
        cache.update(m.prefix_key[None].expand(b, -1, -1, -1), m.prefix_value[None].expand(b, -1, -1, -1), i)
    seen = torch.cat([torch.ones(b, P, dtype=mask.dtype), mask], 1)
    if ref.config.model_type == "llama":
        return ref.base_model(input_ids=ids, attention_mask=seen, past_key_values=cache,
                              position_ids=torch.arange(t)[None].expand(b, -1)).last_hidden_state
    h = ref.roberta.embeddings(input_ids=ids)  # an encoder takes no cache from the model: layer by layer
    full = seen.bool()[:, None, None, :].expand(b, 1, t, P + t)
    # transformers renamed the layer's argument (past_key_values up to 5.17, cache later); an unknown name would
    # be swallowed by **kwargs, leaving keys without the prefix against a mask with it
    name = "cache" if "cache" in inspect.signature(type(ref.roberta.encoder.layer[0]).forward).parameters \
        else "past_key_values"
    for layer in ref.roberta.encoder.layer:
        out = layer(h, attention_mask=full, **{name: cache})
        h = out[0] if isinstance(out, tuple) else out
    return h


@pytest.mark.parametrize("kind", ["llama", "roberta"])
def test_the_prefix_is_attention_over_virtual_tokens_before_the_real_ones(kind):
    model = make_model(kind)
    ref = copy.deepcopy(model)
    ids = torch.randint(5, 45, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # a padded row
    mask[2, 4:] = 0
    before = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    names = prefix.add_prefix(model, P, seed=0)
    modules = [model.get_submodule(n) for n in names]
    assert len(modules) == 2 and all(m.prefix_key.shape[1] == P for m in modules)
    got = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    want = cache_path(ref, modules, ids, mask)
    keep = mask.bool()
    # float32 attention over the prefix by another path: 1e-6 ≈ 8 ulps of states O(1)
    assert torch.allclose(got[keep], want[keep], atol=1e-6, rtol=1e-5)
    assert (got[keep] - before[keep]).abs().max() > 1e-3  # the prefix changes the output
    # padding: a padded row gives the logits of the same row alone and unpadded
    for row in (1, 2):
        n = int(mask[row].sum())
        alone = model.base_model(input_ids=ids[row:row + 1, :n], attention_mask=mask[row:row + 1, :n])
        # padding only masks keys: the same softmax terms, reordered; 1e-6 ≈ 8 float32 ulps of O(1)
        assert torch.allclose(alone.last_hidden_state[0], got[row, :n], atol=1e-6)
    nomask = model.base_model(input_ids=ids[:1]).last_hidden_state  # no mask at all: causal or full, and the prefix
    # as above: the same attention without a mask, float32 reordering of values O(1)
    assert torch.allclose(nomask[0], got[0], atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "roberta"])
def test_initialised_from_the_real_activations_of_random_tokens(kind):
    """The prefix's keys and values are the keys and values of num_prefix random vocabulary tokens (from the run
    seed) run through the model, captured at each layer: the same as the cache an ordinary forward of them fills."""
    model = make_model(kind)
    ref = copy.deepcopy(model)
    names = prefix.add_prefix(model, P, seed=7)
    ids = torch.randint(0, model.config.vocab_size, (1, P), generator=torch.Generator().manual_seed(7))
    if kind == "llama":
        cache = DynamicCache(config=ref.config)
        ref.base_model(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache, use_cache=True)
        for i, n in enumerate(names):
            keys, values = cache.layers[i].keys[0], cache.layers[i].values[0]
            assert torch.equal(model.get_submodule(n).prefix_key, keys)
            assert torch.equal(model.get_submodule(n).prefix_value, values)
    else:  # an encoder: the first layer's keys are key(embeddings), reshaped per head
        h = ref.roberta.embeddings(input_ids=ids)
        att = ref.get_submodule(names[0])
        k = att.key(h).view(1, P, -1, att.attention_head_size).transpose(1, 2)[0]
        # one float32 linear layer computed for a batch of 1 vs P rows: a few ulps of keys O(1)
        assert torch.allclose(model.get_submodule(names[0]).prefix_key, k, atol=1e-6)
    other = make_model(kind)
    prefix.add_prefix(other, P, seed=8)
    assert not torch.equal(other.get_submodule(names[0]).prefix_key, model.get_submodule(names[0]).prefix_key)


class CachePathForward(mezo.PromptForward):
    """PromptForward whose hidden states come from cache_path on a copy of the model without prefix.py's attention."""

    def __init__(self, model, label_ids, params=None):
        super().__init__(model, label_ids, params)
        self.ref = copy.deepcopy(model)
        self.ref.config._attn_implementation = "sdpa"
        self.modules = [m for _, m in prefix.attention_modules(model)]
        for _, m in prefix.attention_modules(self.ref):
            m.config._attn_implementation = "sdpa"

    def __call__(self, batch):
        return self.head(cache_path(self.ref, self.modules, batch["input_ids"], batch["attention_mask"]), batch)


@pytest.mark.parametrize("kind", ["llama", "roberta"])
def test_at_lr_zero_the_loss_is_the_fresh_prefix_loss(kind, model_dir, tmp_path, capsys):
    """--mode prefix --lr 0, the whole training set as the batch: each step's logged loss (L+ + L−)/2 is the loss of
    the fresh prefix computed by hand through the cache path (up to O(ε²)); the tensors stay where they started."""
    from mezo import runs
    out = tmp_path / "run"
    argv = tiny_args(model_dir, out, model=model_dir(kind), steps=2, eval_every=0, lr=0.0, batch_size=16, k=8)
    code, _, err = run(argv + ["--mode", "prefix", "--num-prefix", P], capsys)
    assert code == 0, err
    cfg, _ = mezo.parse_args([str(a) for a in argv] + ["--mode", "prefix", "--num-prefix", str(P), "--out",
                                                       str(tmp_path / "hand"), "--device", "cpu"])
    loaded = runs.load(cfg, mezo.Placement())
    params = mezo.select_trainables(loaded.model, cfg)
    hand = runs.Run(cfg, mezo.Placement(), loaded, params, CachePathForward(loaded.model, loaded.label_ids, params),
                    mezo.objective_loss)
    logits, labels = hand.logits(hand.splits["train"])
    want = torch.nn.functional.cross_entropy(logits, labels).item()
    steps = [r for r in records(out) if "seed" in r]
    assert len(steps) == 2
    # the mean of L± at θ ± εz is L(θ) + O(ε²) (1e-6) plus float32 reordering: 1e-4
    assert all(abs(r["loss"] - want) <= 1e-4 * want for r in steps), ([r["loss"] for r in steps], want)
    saved = load_file(out / checkpoints.CHECKPOINT)
    assert set(saved) == {p.name for p in hand.params}
    for p in hand.params:
        # lr 0: the 3 ±ε passes round θ 3 times: ≤ 3 half-ulps of |θ| < 4 (2.4e-7 each) < 1e-6
        assert torch.allclose(saved[p.name], p.tensor, atol=1e-6), p.name  # lr 0: where it started (±ε rounding)


@pytest.mark.parametrize("kind", ["llama", "roberta"])
def test_a_prefix_run_trains_and_resumes_bit_for_bit(kind, model_dir, tmp_path, capsys):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    flags = ["--mode", "prefix", "--num-prefix", P, "--model", model_dir(kind)]
    assert run(tiny_args(model_dir, straight, steps=6) + flags, capsys)[0] == 0
    assert run(tiny_args(model_dir, broken, steps=3) + flags, capsys)[0] == 0
    assert run(["--resume", broken, "--steps", 6], capsys)[0] == 0
    a, b = load_file(straight / checkpoints.CHECKPOINT), load_file(broken / checkpoints.CHECKPOINT)
    assert len(a) == 4 and all(k.endswith(prefix.SUFFIXES) for k in a)  # 2 layers x key, value
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start = make_model(kind)
    prefix.add_prefix(start, P, seed=0)
    moved = [not torch.allclose(start.get_parameter(k), a[k]) for k in a]
    assert all(moved)
    assert not (straight / "adapter").exists()  # PEFT's prefix format is not this prefix (docs/prefix.md)


def test_prefix_refusals_are_one_line(model_dir, tmp_path, capsys):
    base = tiny_args(model_dir, tmp_path / "a") + ["--mode", "prefix"]
    expect_error(capsys, base + ["--cache"], r"--mode prefix .* drop --cache \(it reuses frozen layers' states")
    expect_error(capsys, base + ["--tp", "2"], r"drop --tp \(the prefix is not sharded")
    expect_error(capsys, base + ["--top-layers", "1"], r"drop --top-layers")
    # more virtual tokens than the model has positions: its initialisation runs them as one sequence
    positions = models.max_tokens(make_model("roberta"))
    expect_error(capsys, tiny_args(model_dir, tmp_path / "b", model=model_dir("roberta"), mode="prefix",
                                   num_prefix=positions + 1),
                 rf"--num-prefix {positions + 1} is more than the model's {positions} positions .*pick at most "
                 rf"{positions} \(paper: 5\)")
