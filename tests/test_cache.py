"""cache/ against the reference: one step and K-step trajectories (L+, L−, projected gradient, tensors) on
tiny RoBERTa and Llama models over layers, modes, batches and prefixes; the refusal to serve an activation
that moves with θ ± εz (and what serving it would have done to L−); hit counters that count real reuse;
invalidation; LRU eviction; the command line.

Tolerances. The cache changes no arithmetic, only the batch shapes under which the frozen layers ran (an
example's trunk was computed in the micro-batch where it was first seen, or after a shared prefix through
stored keys/values), so matrix products sum in another order. In float64 that moves a logit by a few ulps
(~1e-15); with losses of order 1 we allow 1e-11 on L±, and 1e-11 / 2ε on the projected gradient: a
thousand-fold margin that still catches any real difference (a stale activation moves L− by ~1e-4, below).
In float32 (the CLI) the same reordering costs ~1e-7 relative; see test_cli_trajectory_with_cache.
"""

import pytest
import torch
from conftest import make_model, make_tokenizer, records, set_up
from hypothesis import given
from hypothesis import strategies as st
from mezo.cache import CachedForward, UnsafeCache
from mezo.tasks import prompts

import mezo
from mezo import runs

LAYERS = 3
TOL = 1e-11  # float64, see the module docstring
SENTENCES = ["the movie was good", "what a film , so bad", "i thought the story was very funny and good",
             "bad", "the plot is long and the ending is dull", "this show is superb", "a poor script", "fine"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    made = {}
    for kind in ("llama", "roberta"):
        path = tmp_path_factory.mktemp(f"cache-{kind}")
        make_model(kind, layers=LAYERS).save_pretrained(path)
        make_tokenizer(causal=kind == "llama").save_pretrained(path)
        made[kind] = str(path)
    return made


def setup(folder, dtype=torch.float64, use_cache=False, **overrides):
    """(cfg, model, params, forward, tokenizer): mezo.train's set-up, in float64 unless asked otherwise."""
    cfg, model, tok, params, forward = set_up(folder, dtype, CachedForward if use_cache else None, **overrides)
    return cfg, model, params, forward, tok


def examples(tok, kind, prefix_words, n=None):
    """Prompts over the fixed sentences; prefix_words puts a shared instruction (or demonstrations) first."""
    template = " ".join(prefix_words + ["{sentence} . overall the movie was {mask} ."])
    enc = "causal" if kind == "llama" else "mlm"
    return [dict(zip(("ids", "position"), prompts.encode(tok, s, template, enc, 64)), label=i % 2)
            for i, s in enumerate(SENTENCES[:n or len(SENTENCES)])]


def run_steps(params, forward, rows, steps, batch_size, micro_batch, evaluate_every=0):
    """K MeZO steps as mezo.train runs them (batches drawn by runs.batch_indices), evaluations in between."""
    out = []
    for step in range(1, steps + 1):
        batch = [rows[i] for i in runs.batch_indices(0, step, len(rows), batch_size)]
        loss_fn = lambda: mezo.objective_loss(*prompts.batch_logits(forward, batch, micro_batch, 0, "cpu"), "ce")
        out += mezo.mezo_step(params, loss_fn, [mezo.step_seed(0, step, 0)], 1e-3, 5e-2, 0.0)
        if evaluate_every and step % evaluate_every == 0:
            logits, labels = prompts.batch_logits(forward, rows, micro_batch, 0, "cpu")
            out.append(dict(eval=((logits.argmax(-1) == labels).float().mean().item(),
                                  torch.nn.functional.cross_entropy(logits, labels).item())))
    return out


def assert_same(ref, got, params_ref, params_got):
    for t, (a, b) in enumerate(zip(ref, got)):
        if "eval" in a:
            assert a["eval"][0] == b["eval"][0] and abs(a["eval"][1] - b["eval"][1]) < TOL, (t, a, b)
            continue
        for key, tol in (("loss_plus", TOL), ("loss_minus", TOL), ("projected_grad", TOL / 2e-3)):
            assert abs(a[key] - b[key]) <= tol, f"step {t + 1} {key}: reference {a[key]!r}, cache {b[key]!r}"
    for p, q in zip(params_ref, params_got):
        err = (p.tensor - q.tensor).abs().max().item()
        assert err <= TOL, f"{p.name}: max |reference - cache| = {err}"


setting_st = st.one_of(
    st.tuples(st.just("lora"), st.just("prompt"), st.integers(1, LAYERS)),
    st.tuples(st.just("full"), st.just("prompt"), st.integers(1, LAYERS)),
    st.tuples(st.just("head"), st.just("cls"), st.just(0)),  # l0 = number of layers: the whole body is frozen
)


@given(kind=st.sampled_from(["llama", "roberta"]), setting=setting_st, steps=st.integers(1, 3),
       batch_size=st.integers(2, 8), micro_batch=st.integers(1, 8), n=st.integers(3, 8),
       prefix=st.sampled_from([[], ["review", ":"], ["the", "movie", "was", "bad", ".", "it", "was", "terrible", "."]]))
def test_trajectory_equals_reference(folders, kind, setting, steps, batch_size, micro_batch, n, prefix):
    """L+, L−, projected gradient of every step, evaluations in between, and the final tensors."""
    mode, head, top = setting
    kw = dict(mode=mode, head=head, top_layers=top, label_words=(" bad", " good"))
    _, _, params_ref, ref, tok = setup(folders[kind], **kw)
    _, model, params, cached, _ = setup(folders[kind], use_cache=True, **kw)
    assert cached.l0 == (LAYERS - top if top else LAYERS)
    rows = examples(tok, kind, prefix, n)
    if prefix and kind == "llama" and cached.l0 > 0:  # the prefix's keys/values serve each first computation
        assert cached.add_shared_prefix([e["ids"] for e in rows]) >= len(prefix)
    want = run_steps(params_ref, ref, rows, steps, batch_size, micro_batch, evaluate_every=2)
    got = run_steps(params, cached, rows, steps, batch_size, micro_batch, evaluate_every=2)
    assert_same(want, got, params_ref, params)
    s = cached.stats()
    batches = [runs.batch_indices(0, t, n, batch_size) for t in range(1, steps + 1)]
    seen = {i for b in batches for i in b} | (set(range(n)) if steps >= 2 else set())
    assert s["misses"] == s["entries"] == len(seen)  # each example's trunk computed once, whatever the batching
    assert s["hits"] + s["misses"] == sum(2 * len(b) for b in batches) + n * (steps // 2)
    if prefix and kind == "llama" and cached.l0 > 0:
        assert s["prefix_hits"] == s["misses"]


def count_rows(modules):
    """Forward hooks that count the example rows each module really processed."""
    seen = [0]
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.__setitem__(0, seen[0] + args[0].size(0)))
             for m in modules]
    return seen, hooks


@pytest.mark.parametrize("kind", ["llama", "roberta"])
def test_hits_count_calls_really_avoided(folders, kind):
    """Rows run through the frozen layers: the reference's minus the cache's equals the hits exactly."""
    kw = dict(top_layers=1, label_words=(" bad", " good"))
    _, model_ref, params_ref, ref, tok = setup(folders[kind], **kw)
    _, model, params, cached, _ = setup(folders[kind], use_cache=True, **kw)
    frozen_ref, hooks_ref = count_rows(cached_layers(model_ref)[:cached.l0])
    frozen, hooks = count_rows(cached_layers(model)[:cached.l0])
    rows = examples(tok, kind, [])
    assert_same(run_steps(params_ref, ref, rows, 4, 3, 2, evaluate_every=2),
                run_steps(params, cached, rows, 4, 3, 2, evaluate_every=2), params_ref, params)
    s = cached.stats()
    assert frozen[0] == s["misses"] * cached.l0  # each miss ran once through each of the l0 frozen layers
    assert frozen_ref[0] - frozen[0] == s["hits"] * cached.l0
    assert s["misses"] == len(rows) and s["entries"] == len(rows)  # every example computed exactly once
    for h in hooks + hooks_ref:
        h.remove()


def test_a_repeated_example_in_one_batch_runs_once(folders):
    _, model, params, cached, tok = setup(folders["llama"], use_cache=True, top_layers=1,
                                          label_words=(" bad", " good"))
    ref = mezo.PromptForward(model, prompts.label_token_ids(tok, (" bad", " good")))
    rows = examples(tok, "llama", [], 3)
    batch = prompts.collate([rows[0], rows[1], rows[0], rows[2], rows[0]], 0)
    seen, hooks = count_rows(cached_layers(model)[:1])
    got = cached(batch)
    for h in hooks:
        h.remove()
    assert (got - ref(batch)).abs().max() <= TOL
    s = cached.stats()
    assert seen[0] == 3 and (s["misses"], s["hits"], s["entries"]) == (3, 2, 3)
    assert s["bytes"] == sum(len(e["ids"]) for e in rows) * model.config.hidden_size * 8


def cached_layers(model):
    body = model.base_model
    return list(body.layers) if hasattr(body, "layers") else list(body.encoder.layer)


def test_refuses_a_layer_that_moves_with_theta_and_shows_the_bias(folders):
    """The input of layer 2 depends on layer 1's LoRA tensors. The cache refuses to keep it; serving the
    θ + εz value in the θ − εz pass would have moved L− by an amount comparable to L+ − L− itself."""
    _, model, params, _, tok = setup(folders["llama"], mode="full", top_layers=2, label_words=(" bad", " good"))
    with pytest.raises(UnsafeCache, match="refusing to cache the input of layer 2: layer 1 holds trainable"):
        CachedForward(model, prompts.label_token_ids(tok, (" bad", " good")), params, layer=2)
    ref = mezo.PromptForward(model, prompts.label_token_ids(tok, (" bad", " good")))
    batch = prompts.collate(examples(tok, "llama", []), 0)
    loss = lambda: mezo.objective_loss(ref(batch), batch["labels"], "ce")
    layer2 = cached_layers(model)[2]
    seed, eps = mezo.step_seed(0, 1, 0), 1e-3
    with torch.no_grad():
        mezo.TorchBackend().perturb(params, seed, +eps)
        stale = {}

        def keep(module, args):
            stale["x"] = args[0].clone()  # the input of layer 2 at θ + εz
        h = layer2.register_forward_pre_hook(keep)
        loss_plus = loss()
        h.remove()
        mezo.TorchBackend().perturb(params, seed, -2 * eps)
        loss_minus = loss()
        h = layer2.register_forward_pre_hook(lambda m, args: (stale["x"], *args[1:]))  # serve the stale input
        loss_minus_stale = loss()
        h.remove()
    bias = abs(loss_minus_stale - loss_minus)  # |Δ projected_grad| = bias / 2ε
    print(f"L+ {loss_plus:.12f}  L- {loss_minus:.12f}  L- from the stale input {loss_minus_stale:.12f}")
    assert bias > 1e5 * TOL and bias > 0.1 * abs(loss_plus - loss_minus), (loss_plus, loss_minus, loss_minus_stale)


def test_frozen_weight_change_invalidates(folders):
    kw = dict(top_layers=1, label_words=(" bad", " good"))
    _, model, params, cached, tok = setup(folders["llama"], use_cache=True, **kw)
    ref = mezo.PromptForward(model, prompts.label_token_ids(tok, (" bad", " good")))
    batch = prompts.collate(examples(tok, "llama", []), 0)
    cached(batch)
    with torch.no_grad():
        mezo.TorchBackend().perturb(params, 7, 1e-2)  # a trainable tensor changes: still valid
    assert (cached(batch) - ref(batch)).abs().max() <= TOL and cached.stats()["hits"] == len(SENTENCES)
    with torch.no_grad():
        cached_layers(model)[0].mlp.up_proj.weight.mul_(1.5)  # a frozen one changes: everything goes
    assert (cached(batch) - ref(batch)).abs().max() <= TOL
    s = cached.stats()
    assert s["invalidations"] == 1 and s["misses"] == 2 * len(SENTENCES) and s["hits"] == len(SENTENCES)
    cached.invalidate()  # the explicit API (for writes through .data, which bypass version counters)
    assert cached.stats()["entries"] == 0


def test_lru_eviction_under_a_small_cap(folders):
    _, model, params, cached, tok = setup(folders["roberta"], use_cache=True, top_layers=1,
                                          label_words=(" bad", " good"))
    ref = mezo.PromptForward(model, prompts.label_token_ids(tok, (" bad", " good")))
    rows = examples(tok, "roberta", [])
    per_row = [len(e["ids"]) * model.config.hidden_size * 8 for e in rows]  # float64 (T, H)
    cached.max_bytes = per_row[0] + per_row[1] + per_row[2]
    for e in rows[:3]:
        cached(prompts.collate([e], 0))
    cached(prompts.collate([rows[0]], 0))  # touch row 0: row 1 is now the least recently used
    cached(prompts.collate([rows[3]], 0))  # does not fit beside all three: row 1 goes, then row 2 if needed
    s = cached.stats()
    assert s["evictions"] >= 1 and s["bytes"] <= cached.max_bytes
    assert tuple(rows[1]["ids"]) not in cached.store and tuple(rows[0]["ids"]) in cached.store
    batch = prompts.collate(rows, 0)
    assert (cached(batch) - ref(batch)).abs().max() <= TOL
    assert cached.stats()["bytes"] <= cached.max_bytes


def test_encoder_says_prefix_kv_does_not_apply(folders):
    _, _, _, cached, tok = setup(folders["roberta"], use_cache=True, top_layers=1, label_words=(" bad", " good"))
    assert cached.prefix_kv is False and "bidirectional" in cached.prefix_kv_reason
    assert "no prefix KV" in cached.describe()
    assert cached.add_prefix([1, 5, 6]) is False and cached.stats()["prefixes"] == 0


def test_prefix_kv_gives_the_same_trunk(folders):
    """Each example's states entering l0: from the stored prefix keys/values == from scratch."""
    _, _, _, cached, tok = setup(folders["llama"], use_cache=True, top_layers=1, label_words=(" bad", " good"))
    rows = examples(tok, "llama", ["the", "movie", "was", "bad", ".", "it", "was", "terrible", "."])
    keys = [tuple(e["ids"]) for e in rows]
    plain = cached.trunk(keys)
    n = cached.add_shared_prefix([list(k) for k in keys])
    assert n >= 10 and cached.stats()["prefixes"] == 1
    with_prefix = cached.trunk(keys)
    assert cached.stats()["prefix_tokens_saved"] == n * len(keys)
    for a, b in zip(plain, with_prefix):
        assert a.shape == b.shape and (a - b).abs().max() <= TOL


@pytest.mark.parametrize("flags", [["--top-layers", "1"], ["--head", "cls", "--mode", "head"]])
def test_cli_trajectory_with_cache(model_dir, tmp_path, capsys, flags):
    """`--cache` changes nothing a user sees in log.jsonl. The CLI runs float32: an example's trunk (here after
    the shared prefix "<s> review :", through stored keys/values) sums in another order, a loss moves by a
    few ulps (~1e-7); 2ε = 2e-3 turns that into ~5e-5 in the projected gradient, and lr·5e-5·z in θ feeds
    the next losses. Measured over these 6 steps: losses within 2e-6, gradients within 9e-5. We allow 1e-5
    on losses and 1e-5 / 2ε on gradients: 20x below what a stale ±εz activation does (test above, ~0.1)."""
    base = ["--task", "synthetic", "--model", model_dir("llama"), "--template", "review : {sentence} It was {mask}",
            "--label-words", " bad, good", "--k", "8", "--batch-size", "6", "--micro-batch", "4", "--steps", "6",
            "--eval-every", "3", "--eval-max", "0", "--lr", "1e-2", "--device", "cpu", *flags]
    assert mezo.main(base + ["--out", str(tmp_path / "ref")]) == 0
    assert mezo.main(base + ["--out", str(tmp_path / "cache"), "--cache"]) == 0
    out = capsys.readouterr().out
    assert "mezo: cache: reusing the input of layer" in out and "shared prefix (3 tokens) kept" in out
    hits = int(out.split("mezo: cache: ")[-1].split("hits ")[1].split(",")[0])
    assert hits > 0
    want, got = records(tmp_path / "ref"), records(tmp_path / "cache")
    assert len(want) == len(got) == 6 + 3 * 2
    for a, b in zip(want, got):
        assert a.keys() == b.keys() and a["step"] == b["step"]
        if "split" in a:
            # float32 reordering: a loss moves ~1e-7 (≤ 2e-6 measured); 1e-5, 20x under a stale hit
            assert a["accuracy"] == b["accuracy"] and a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        else:
            assert a["seed"] == b["seed"]
            # losses as above; projected_grad = ΔL/2ε: the loss bound over 2ε (measured ≤ 9e-5)
            for key, tol in (("loss_plus", 1e-5), ("loss_minus", 1e-5), ("projected_grad", 1e-5 / 2e-3)):
                assert a[key] == pytest.approx(b[key], abs=tol), (a["step"], key, a[key], b[key])


def test_cli_cache_with_trainable_embeddings_is_refused(model_dir, tmp_path, capsys):
    code = mezo.main(["--task", "synthetic", "--model", model_dir("llama"), "--mode", "full", "--cache",
                      "--template", "{sentence} It was {mask}", "--label-words", " bad, good", "--steps", "1",
                      "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "mezo: error: --cache: the embeddings are trainable" in err
