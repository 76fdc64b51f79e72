"""Every task's prompt against a hand-built token sequence (masked and causal, single and pair), label words of
several tokens against a hand computation of summed log-probabilities, a 3-step run of every task, multi-class
accuracy and cross-entropy against a hand computation, and the tasks' bad inputs."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import expect_error, load_tiny, make_model, make_tokenizer, records, run
from mezo.errors import UsageError
from mezo.tasks import prompts

import mezo
from mezo import tasks

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (SHARED / "lm-bff" / "SST-2" / "train.tsv").exists(),
                                reason="real task data not beside the checkout (../shared/data)")
HERE = ["sst2", "sst5", "mr", "cr", "mpqa", "subj", "trec", "rte"]
SINGLE, PAIR = ("the movie was great .",), ("The movie was great.", "It was good.")
# What each task's template makes of SINGLE (or PAIR), token by token, with the tiny word-level tokenizer (it
# lower-cases, and splits words from runs of punctuation); <s> ... </s> for the masked, <s> ... for the causal.
EXPECTED = {
    ("sst2", "mlm"): "<s> the movie was great . it was <mask> . </s>",
    ("sst2", "causal"): "<s> review : the movie was great . overall , the movie was",
    **{(name, "mlm"): "<s> the movie was great . it was <mask> . </s>" for name in ("sst5", "mr", "cr", "mpqa")},
    **{(name, "causal"): "<s> the movie was great . it was" for name in ("sst5", "mr", "cr", "mpqa")},
    ("subj", "mlm"): "<s> the movie was great . this is <mask> . </s>",
    ("subj", "causal"): "<s> the movie was great . this is",
    ("trec", "mlm"): "<s> <mask> : the movie was great . </s>",
    ("trec", "causal"): "<s> question : the movie was great . type of answer :",
    ("rte", "mlm"): "<s> the movie was great ? <mask> , it was good . </s>",  # sent-_0 ? mask , +sentl_1
    ("rte", "causal"): '<s> the movie was great . does this mean that " it was good <unk> is true ? yes or no ?',
}


@pytest.mark.parametrize("name,kind", sorted(EXPECTED))
def test_each_tasks_template_makes_the_hand_built_token_sequence(name, kind):
    tok = make_tokenizer(causal=kind == "causal", tasks_vocab=True)
    template, words = tasks.TASKS[name].prompt(kind)
    texts = PAIR if tasks.TASKS[name].pair else SINGLE
    ids, position = prompts.encode(tok, texts, template, kind, 128)
    assert tok.convert_ids_to_tokens(ids) == EXPECTED[name, kind].split()
    want = ids.index(tok.mask_token_id) if kind == "mlm" else len(ids) - 1
    assert position == want
    assert all(len(t) == 1 for t in prompts.label_tokens(tok, words, kind))  # the tiny vocabulary has every word


def test_truncation_cuts_the_longer_sentence_never_the_prompt():
    tok = make_tokenizer(causal=False, tasks_vocab=True)
    template = tasks.TASKS["rte"].template
    long = ("the movie was good " * 10).strip() + "."
    ids, position = prompts.encode(tok, (long, "It was bad."), template, "mlm", 20)
    tokens = tok.convert_ids_to_tokens(ids)
    assert len(ids) == 20 and tokens[-6:] == [",", "it", "was", "bad", ".", "</s>"] and tokens[position] == "<mask>"
    with pytest.raises(UsageError, match="--max-length 8 is shorter than the prompt itself"):
        prompts.encode(tok, ("a", "b"), "{sentence1} does this mean that {sentence2} ? {mask} .", "mlm", 8)


def _scores_by_hand(model, tok, texts, template, words):
    """Σ log p(word token | prompt and the word's earlier tokens), one full forward per token."""
    prompt, _ = prompts.encode(tok, texts, template, "causal", 128)
    out = []
    for w in words:
        total, ids = 0.0, list(prompt)
        for t in tok(w, add_special_tokens=False)["input_ids"]:
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
            total += logits.log_softmax(-1)[t].item()
            ids.append(t)
        out.append(total)
    return out


def test_several_token_label_words_score_their_summed_log_probabilities(model_dir):
    words = (" bad", " very good", " not very funny")  # 1, 2 and 3 tokens
    cfg, model, tok, params, forward = load_tiny(model_dir, "llama", label_words=(" bad", " good"))
    candidates = prompts.label_tokens(tok, words, "causal")
    assert [len(c) for c in candidates] == [1, 2, 3]
    sents = ["the movie was great .", "a dull film .", "what a superb story !"]
    examples = [dict(zip(("ids", "position"), prompts.encode(tok, s, "{sentence} It was{mask}",
                                                             "causal", 64)), label=i, candidates=candidates)
                for i, s in enumerate(sents)]
    with torch.no_grad():
        got = mezo.PromptForward(model, [])(prompts.collate(examples, tok.pad_token_id))  # (3, 3)
        want = [_scores_by_hand(model, tok, s, "{sentence} It was{mask}", words) for s in sents]
    assert got.shape == (3, 3)
    # float32 batched forward vs one by hand: 2e-5 ≈ 20 ulps (9.5e-7) of scores up to 10
    assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), atol=2e-5), (got, want)


def test_single_token_words_keep_their_one_position_numbers(model_dir):
    """All single-token words take the one-position path (the LM head's raw logits at the position, as before);
    forced through the several-token path they differ by a per-row constant, so the loss is the same."""
    cfg, model, tok, params, forward = load_tiny(model_dir, "llama", label_words=(" bad", " good"))
    rows = [("the movie was great .", None, 1), ("a dull film .", None, 0)]
    data = dict(train=rows, dev=rows, test=rows)
    one = prompts.encode_splits(tok, data, "{sentence} It was{mask}", "causal", 64, 2,
                                prompts.label_tokens(tok, (" bad", " good"), "causal"))["test"]
    assert "candidates" not in one[0]
    with torch.no_grad():
        batch = prompts.collate(one, 0)
        plain = forward(batch)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ids = tok.convert_tokens_to_ids(["bad", "good"])
        # the same float32 logits read by another index, up to the head's reordering
        assert torch.allclose(plain, full[torch.arange(2), batch["position"]][:, ids], atol=1e-6)
        forced = mezo.PromptForward(model, [])(prompts.collate([dict(e, candidates=[[ids[0]], [ids[1]]]) for e in one],
                                                               0))
    # a per-row constant cancels in log-softmax up to float32 rounding of logits O(10): ≤ 1e-6
    assert torch.allclose(F.cross_entropy(forced, batch["labels"]), F.cross_entropy(plain, batch["labels"]), atol=1e-6)


def test_masked_lms_refuse_several_token_words_naming_them(model_dir):
    with pytest.raises(UsageError, match=r"not single: ' very good' -> \['very', 'good'\]"):
        prompts.label_tokens(make_tokenizer(causal=False), (" bad", " very good"), "mlm")


@needs_data
@pytest.mark.parametrize("name", HERE)
@pytest.mark.parametrize("kind", ["llama", "roberta"])
def test_three_steps_of_every_task_with_a_tiny_model(name, kind, model_dir, tmp_path, capsys):
    """Each task with its own prompt and label words, from the real data: 3 steps, the full test set at the end."""
    task = tasks.TASKS[name]
    code, out, err = run(["--task", task.folder, "--model", model_dir(kind + "+tasks"), "--steps", 3, "--eval-every", 0,
                          "--eval-max-start", 16, "--data-seed", 21, "--out", tmp_path, "--threads", 1], capsys)
    assert code == 0, err
    log = records(tmp_path)
    assert [r["step"] for r in log if "seed" in r] == [1, 2, 3]
    final = [r for r in log if r.get("split") == "test"][-1]
    assert final["n"] == dict(sst2=872, trec=500, rte=277, sst5=2210).get(name, 2000)
    assert f"mezo: {name} train {16 * len(task.labels)}, dev {16 * len(task.labels)}" in out


@needs_data
def test_multi_class_accuracy_and_cross_entropy_match_a_hand_computation(model_dir, tmp_path, capsys):
    """SST-5 (5 classes) at step 0: the logged test accuracy and loss against argmax and −log softmax over the five
    label words, computed from the whole model's logits one example at a time."""
    code, out, err = run(["--task", "sst-5", "--model", model_dir("llama+tasks"), "--steps", 0, "--out", tmp_path],
                         capsys)
    assert code == 0, err
    test = [r for r in records(tmp_path) if r.get("split") == "test"][0]
    model, tok = make_model("llama+tasks"), make_tokenizer(causal=True, tasks_vocab=True)
    template, words = tasks.TASKS["sst5"].prompt("causal")
    ids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in words]
    rows = tasks.load("sst5", 16, 42)["test"]
    correct, nll = 0, 0.0
    with torch.no_grad():
        for s, _, y in rows:
            x, _ = prompts.encode(tok, s, template, "causal", 128)
            logits = model(input_ids=torch.tensor([x])).logits[0, -1, ids].double()  # (5,)
            correct += int(logits.argmax()) == y
            nll -= logits.log_softmax(-1)[y].item()
    assert test["n"] == len(rows) == 2210
    # a ratio of counts: the same division, at worst rounded to float32 (2^-24 relative) < 1e-7
    assert test["accuracy"] == pytest.approx(correct / len(rows), abs=1e-7)
    # float32 batched logits vs float64 one by one: 1e-5 ≈ 80 ulps (1.2e-7) of a mean loss O(1)
    assert test["loss"] == pytest.approx(nll / len(rows), rel=1e-5)


@needs_data
def test_the_tasks_bad_inputs_are_one_line(model_dir, tmp_path, capsys):
    base = ["--model", model_dir("llama+tasks"), "--out", tmp_path, "--steps", 1]
    line = expect_error(capsys, ["--task", "imdb"] + base, r"unknown --task 'imdb'; choose one of sst2, sst5")
    assert all(name in line for name in tasks.NAMES)
    expect_error(capsys, ["--task", "trec", "--label-words", " bad, good"] + base,
                 r"--label-words gives 2 words, but trec has 6 classes: give one word per class")
    expect_error(capsys, ["--task", "rte", "--template", "{sentence} It was{mask}"] + base,
                 r"this task's examples are pairs, so the template needs \{sentence1\} and \{sentence2\}")
    expect_error(capsys, ["--task", "sst2", "--template", "{sentence1} and {sentence2} ?{mask}"] + base,
                 r"single sentences, so the template needs \{sentence\} \(or \{sentence1\}\) and no \{sentence2\}")
    expect_error(capsys, ["--task", "mnli", "--data-dir", tmp_path / "none"] + base,
                 r"mnli \(MNLI\) data not found: .*lm-bff/datasets.tar holds lm-bff/'s as original/")


def test_a_pair_task_runs_from_lmbffs_mnli_layout(model_dir, tmp_path, capsys):
    """The causal NLI prompt end to end on MNLI's column layout (a tiny file in GLUE's format; no MNLI data here)."""
    folder = tmp_path / "data" / "lm-bff" / "MNLI"
    folder.mkdir(parents=True)
    head = "\t".join(["index", "promptID", "pairID", "genre", "a", "b", "c", "d", "sentence1", "sentence2"])
    rows = [f"{i}\t0\t0\tg\tx\tx\tx\tx\tthe movie was good .\tit was {w} .\t" for i, w in enumerate(["bad", "good",
                                                                                                   "fine"] * 4)]
    labels = ["contradiction", "entailment", "neutral"] * 4
    (folder / "train.tsv").write_text(head + "\tlabel1\tgold_label\n" + "".join(
        f"{r}{y}\t{y}\n" for r, y in zip(rows, labels)))
    (folder / "dev_matched.tsv").write_text(head + "\tl1\tl2\tl3\tl4\tl5\tgold_label\n" + "".join(
        f"{r}{y}\t{y}\t{y}\t{y}\t{y}\t{y}\n" for r, y in zip(rows, labels)))
    code, out, err = run(["--task", "MNLI", "--data-dir", tmp_path / "data", "--model", model_dir("llama+tasks"),
                          "--k", 2, "--steps", 2, "--out", tmp_path / "run"], capsys)
    assert code == 0, err
    assert "mezo: mnli train 6, dev 6, test 12" in out
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8
