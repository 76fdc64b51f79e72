"""Issue 22's bad inputs, each as a user meets it: a mistaken flag, a damaged model or data file,
an edited log, a misused optimizer. Each ends as a user would expect, or in one line
`mezo: error: ...` that names the problem and what to do, with no traceback and no run folder
changed."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import SPECIALS, TASK_WORDS, WORDS, make_tokenizer, records, run

import mezo
from mezo import rules

ROOT = Path(__file__).resolve().parents[1]


def P(model_dir, *flags, kind="llama"):
    """The issue's P="python3 mezo.py --task synthetic --model TINY --threads 1 --eval-max 8
    --eval-max-start 8", on the CPU (the --device cases pass their own)."""
    device = [] if "--device" in flags else ["--device", "cpu"]
    return ["--task", "synthetic", "--model", model_dir(kind), "--threads", 1, "--eval-max", 8,
            "--eval-max-start", 8, *device, *flags]


def refused(capsys, argv, pattern, code=2) -> str:
    """mezo.main(argv) exits with code, printing exactly one error line that matches pattern, and
    no traceback."""
    got = mezo.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("mezo: error:")]
    assert got == code and len(lines) == 1 and "Traceback" not in err, (got, err[-2000:])
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def nothing_written(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


def sst2_data(root: Path, dev_rows=("the movie was good\t1", "the film was bad\t0")) -> Path:
    """A small SST-2 data folder in the layout tasks/files.py looks for: lm-bff/SST-2/train.tsv
    (10 rows of each class) and sst2/dev.tsv."""
    rows = [row for i in range(10) for row in ("the movie was bad\t0", f"the film {i} was good\t1")]
    train = ["sentence\tlabel", *rows]
    (root / "lm-bff" / "SST-2").mkdir(parents=True)
    (root / "sst2").mkdir()
    (root / "lm-bff" / "SST-2" / "train.tsv").write_text("\n".join(train) + "\n")
    (root / "sst2" / "dev.tsv").write_text("\n".join(["sentence\tlabel", *dev_rows]) + "\n")
    return root


def sst2(model_dir, data: Path, *flags, kind="llama"):
    return ["--task", "sst2", "--data-dir", data, "--k", 4, "--model", model_dir(kind),
            "--threads", 1, "--device", "cpu", *flags]


# -----------------------------------------------------------------------------
# Case 5: label words for another number of classes


@pytest.mark.parametrize("words,count", [(" bad, good, ok", "3 words"), (" bad", "1 word")])
def test_label_words_for_another_number_of_classes_are_refused(model_dir, tmp_path, capsys, words,
                                                               count):
    refused(capsys, ["--task", "sst2", "--label-words", words, "--model", model_dir("llama"),
                     "--device", "cpu", "--out", tmp_path / "run"],
            rf"--label-words gives {count}, but sst2 has 2 classes: give one word per class, "
            r"comma-separated, class 0 first \(the task's: ' terrible, great'\)")
    assert nothing_written(tmp_path / "run")


def test_a_lora_rank_past_the_adapted_layers_smaller_side_is_refused(model_dir, tmp_path, capsys):
    """The tiny llama's v_proj maps 32 to 16: rank 17 adds parameters and no rank (and --lora-r 100000 on a real
    model had gone on to allocate billions of them)."""
    refused(capsys, P(model_dir, "--lora-r", 17, "--out", tmp_path / "run"),
            r"--lora-r 17 is past 16, the smaller side of the smallest layer it adapts, where a LoRA's rank stops: "
            r"give --lora-r 16 or less \(paper: 8\)")
    assert nothing_written(tmp_path / "run")


@pytest.mark.parametrize("kind", ["llama", "roberta"])
def test_a_label_word_without_tokens_unknown_or_special_is_refused(model_dir, tmp_path, capsys, kind):
    """A blank word had been told as "not single tokens for a masked LM's <mask>" on a causal model too; a word
    the tokenizer does not know read as <unk> for its class, and <pad> was a class's word; the runs went on."""
    for words, said in ((" bad, ", r"label word ' ' has no tokens: give each class a word in --label-words"),
                        (" bad, zorglub", r"label word ' zorglub' is not in the tokenizer's vocabulary \(it reads as "
                                          r"<unk>\): pick other --label-words"),
                        ("<pad>, good", r"label word '<pad>' is the special token <pad>: pick other --label-words")):
        refused(capsys, P(model_dir, "--label-words", words, "--out", tmp_path / "run", kind=kind), said)
        assert nothing_written(tmp_path / "run")


# -----------------------------------------------------------------------------
# Case 6: what was a traceback is one line


def test_a_beta_of_one_or_more_is_refused_before_anything_runs(model_dir, tmp_path, capsys):
    refused(capsys, P(model_dir, "--beta", 1.5, "--rule", "momentum", "--out", tmp_path / "run"),
            r"--beta 1.5 is out of range: it must be < 1")
    assert nothing_written(tmp_path / "run")


def test_a_seed_past_63_bits_is_refused(model_dir, tmp_path, capsys):
    refused(capsys, P(model_dir, "--seed", "99999999999999999999", "--out", tmp_path / "run"),
            r"--seed 99999999999999999999 is out of range: it must be < 2\^63")
    refused(capsys, P(model_dir, "--data-seed", 2**32),  # np.random.seed's limit (LM-BFF's splits)
            r"--data-seed 4294967296 is out of range: it must be < 2\^32")
    assert nothing_written(tmp_path / "run")


def test_an_unknown_device_is_refused(model_dir, capsys):
    refused(capsys, P(model_dir, "--device", "banana"),
            r"unknown --device 'banana'; use auto, cpu, cuda or cuda:N")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_on_a_machine_without_a_gpu_is_refused(model_dir, capsys):
    refused(capsys, P(model_dir, "--device", "cuda"),
            r"--device cuda: this machine has no cuda device .*; use --device cpu")


def test_inputs_longer_than_the_models_positions_are_cut_to_them(model_dir, tmp_path, capsys):
    """RoBERTa's learned positions end (the tiny one holds 139 tokens, roberta-base 512): a
    5,000-word sentence with --max-length 100000 is cut there, with a note, and the run goes on."""
    long = " ".join(["good"] * 5000)
    data = sst2_data(tmp_path / "data", dev_rows=(f"{long}\t1", "the film was bad\t0"))
    argv = sst2(model_dir, data, "--max-length", 100000, "--steps", 1, "--eval-every", 0,
                kind="roberta")
    code = mezo.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in err, err[-2000:]
    assert ("mezo: --max-length 100000 is past the model's 139 positions; inputs are cut to 139 "
            "tokens") in out


def test_a_truncated_weights_file_is_one_line(model_dir, tmp_path, capsys):
    model = shutil.copytree(model_dir("llama"), tmp_path / "model")
    weights = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    refused(capsys, P(lambda _: model, "--steps", 1, "--out", tmp_path / "run"),
            r"cannot load the weights of model .*model' \(model.safetensors\): .*download or save "
            r"the model again")
    assert nothing_written(tmp_path / "run")


def test_weights_of_other_shapes_than_config_json_are_one_line(model_dir, tmp_path):
    """A config.json from another model (here: hidden_size edited) beside the weights: transformers' RuntimeError
    was a traceback."""
    model = shutil.copytree(model_dir("llama"), tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"hidden_size": 64}))
    # as a user runs it, from another folder: in-process, transformers' load report (which it prints first, naming
    # each shape) goes to the stderr of whichever test first set up its logging
    argv = [sys.executable, str(ROOT / "mezo.py"), *[str(a) for a in P(lambda _: model, "--steps", 1, "--out", "run")]]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert re.search(r"^mezo: error: cannot load the weights of model .*model': their shapes differ from what its "
                     r"config.json describes .*: put the model's own config.json beside them, or save the model "
                     r"again$", done.stderr, re.M), done.stderr[-2000:]
    assert nothing_written(tmp_path / "run")


def test_a_tokenizer_larger_than_the_models_embeddings_is_refused_before_the_run(model_dir, tmp_path, capsys):
    """Another model's tokenizer beside the weights: its ids past the embedding table were an IndexError at the
    first forward, after run.json and log.jsonl were written."""
    model = shutil.copytree(model_dir("llama"), tmp_path / "model")
    make_tokenizer(causal=True, tasks_vocab=True).save_pretrained(model)
    n = len(SPECIALS) + len(WORDS)
    refused(capsys, P(lambda _: model, "--steps", 1, "--out", tmp_path / "run"),
            rf"model .*model': its tokenizer has {n + len(TASK_WORDS)} tokens but the model embeds {n}, so text "
            r"can give ids the model has no row for: save the model's own tokenizer beside it")
    assert nothing_written(tmp_path / "run")


def test_a_data_file_with_an_unknown_label_is_one_line(model_dir, tmp_path, capsys):
    data = sst2_data(tmp_path / "data")
    train = data / "lm-bff" / "SST-2" / "train.tsv"
    train.write_text(train.read_text() + "the plot was fine\tpositive\n")
    refused(capsys, sst2(model_dir, data, "--steps", 1, "--out", tmp_path / "run"),
            rf"{re.escape(str(train))}: line 22 has the label 'positive', not one of 0, 1; fix or "
            r"delete that line")
    assert nothing_written(tmp_path / "run")


def test_a_data_file_without_examples_or_without_a_class_is_one_line(model_dir, tmp_path, capsys):
    """An empty or header-only file, train or test, and a training file that lacks a class (no --k can help:
    the line does not say to lower it)."""
    for which, edit in (("train", lambda text: "sentence\tlabel\n"), ("test", lambda text: ""),
                        ("class", lambda text: "".join(r for r in text.splitlines(True) if not r.endswith("\t1\n")))):
        data = sst2_data(tmp_path / which)
        path = data / ("sst2/dev.tsv" if which == "test" else "lm-bff/SST-2/train.tsv")
        path.write_text(edit(path.read_text()))
        want = (r"sst2's training file has no example of class 1; point --data-dir at the task's full files"
                if which == "class" else rf"{re.escape(str(path))} holds no examples( after its header)?; point "
                r"--data-dir at a folder with the task's full files")
        refused(capsys, sst2(model_dir, data, "--steps", 1, "--out", tmp_path / f"run-{which}"), want)
        assert nothing_written(tmp_path / f"run-{which}")


def test_blank_lines_in_a_data_file_are_no_rows(model_dir, tmp_path, capsys):
    """An editor's trailing newlines (here also one in the middle): the same run as without them."""
    clean, blank = sst2_data(tmp_path / "clean"), sst2_data(tmp_path / "blank")
    train = blank / "lm-bff" / "SST-2" / "train.tsv"
    lines = train.read_text().splitlines(True)
    train.write_text("".join(lines[:5]) + "\n" + "".join(lines[5:]) + "\n  \n")
    summaries = []
    for data in (clean, blank):
        assert mezo.main([str(a) for a in sst2(model_dir, data, "--steps", 2, "--out", data / "run")]) == 0
        summaries.append(json.loads((data / "run" / "summary.json").read_text()))
    capsys.readouterr()
    assert summaries[0]["evals"] == summaries[1]["evals"] and summaries[0]["evals"]  # dev and test accuracies
    logs = [(d / "run" / "log.jsonl").read_text().splitlines() for d in (clean, blank)]
    steps = [[json.loads(x)["loss_plus"] for x in log if "loss_plus" in json.loads(x)] for log in logs]
    assert steps[0] == steps[1] and len(steps[0]) == 2


def test_a_data_file_that_is_not_utf8_is_one_line(model_dir, tmp_path, capsys):
    data = sst2_data(tmp_path / "data")
    dev = data / "sst2" / "dev.tsv"
    dev.write_bytes(dev.read_bytes() + b"caf\xe9 cr\xe8me\t1\n")  # Latin-1, as old exports are
    refused(capsys, sst2(model_dir, data, "--steps", 1, "--out", tmp_path / "run"),
            rf"{re.escape(str(dev))}: line 4 is not UTF-8 text \(byte b'\\xe9'\); save the file "
            r"as UTF-8")
    assert nothing_written(tmp_path / "run")


@pytest.fixture(scope="module")
def a_run(model_dir, tmp_path_factory):
    """A finished 2-step run folder (its log and checkpoints), copied by each test that edits it."""
    folder = tmp_path_factory.mktemp("inputs") / "run"
    argv = P(model_dir, "--steps", 2, "--save-every", 1, "--out", folder)
    assert mezo.main([str(a) for a in argv]) == 0
    return folder


@pytest.mark.parametrize("edit,says", [("missing", "step 1's loss_minus is missing"),
                                       ("abc", "step 1's loss_minus is 'abc'")])
@pytest.mark.parametrize("how", ["resume", "replay"])
def test_a_log_record_missing_or_not_a_number_is_one_line(a_run, tmp_path, capsys, edit, says,
                                                          how):
    """--resume and --replay refuse the log before anything is written."""
    folder = shutil.copytree(a_run, tmp_path / "run")
    records = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    step_1 = next(r for r in records if r["step"] == 1 and "seed" in r)
    step_1.pop("loss_minus") if edit == "missing" else step_1.update(loss_minus="abc")
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    before = snapshot(folder)
    argv = {"resume": ["--resume", folder, "--steps", 3],
            "replay": ["--replay", folder, "--steps", 2, "--out", tmp_path / "replayed"]}[how]
    refused(capsys, [*argv, "--threads", 1],
            rf"log.jsonl: line 3 is not a log record \({re.escape(says)}\); fix or delete that "
            r"line")
    assert snapshot(folder) == before
    assert nothing_written(tmp_path / "replayed")


def test_a_file_that_is_no_log_given_to_plot_is_told_so_not_to_fix_its_first_line(a_run, tmp_path, capsys):
    """`plot.py RUN/summary.json` (a run's other file) was told "line 1 is not a log record ...; fix or delete that
    line": advice that damages the user's file. A file not named log.jsonl whose first line is no record is not a
    log, and the line says what to give; a log.jsonl whose first line was edited keeps the advice to fix it."""
    import plot
    summary = a_run / "summary.json"
    before = summary.read_bytes()
    assert plot.main([str(summary), "-o", str(tmp_path / "plots")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(rf"^plot: error: {summary}: line 1 is not a log record \(.*\): it is not a mezo "
                                      r"log.jsonl; give a run's log.jsonl, or its folder$", err[0]), err
    assert summary.read_bytes() == before and not (tmp_path / "plots").exists()
    edited = shutil.copytree(a_run, tmp_path / "run")
    (edited / "log.jsonl").write_text("{oops\n" + (a_run / "log.jsonl").read_text())
    assert plot.main([str(edited), "-o", str(tmp_path / "plots")]) == 2
    err = capsys.readouterr().err
    assert "log.jsonl: line 1 is not a log record" in err and "; fix or delete that line" in err, err


def test_plot_says_which_path_is_missing_and_that_its_out_is_for_the_figure(a_run, tmp_path, capsys):
    import plot
    assert plot.main([str(tmp_path / "nope"), "-o", str(tmp_path / "plots")]) == 2
    assert capsys.readouterr().err == (f"plot: error: {tmp_path / 'nope'}: no such file or folder; give run folders "
                                       "(mezo.py --out) or log.jsonl files\n")
    (tmp_path / "a-file").write_text("mine")
    assert plot.main([str(a_run), "-o", str(tmp_path / "a-file")]) == 2
    assert capsys.readouterr().err == (f"plot: error: --out {tmp_path / 'a-file'} is a file, not a folder; give a "
                                       "folder for the figure (nothing was changed)\n")
    assert (tmp_path / "a-file").read_text() == "mine"


def test_the_command_itself_prints_one_line_not_a_traceback(model_dir):
    """The same refusals through `python3 mezo.py`, as the issue ran them."""
    for flags, line in [(["--beta", "1.5", "--rule", "momentum"], "mezo: error: --beta 1.5 is out"),
                        (["--device", "banana"], "mezo: error: unknown --device 'banana'")]:
        argv = [sys.executable, str(ROOT / "mezo.py"), *[str(a) for a in P(model_dir, *flags)]]
        done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=300)
        last = done.stderr.strip().splitlines()[-1]
        assert done.returncode == 2 and last.startswith(line), done.stderr[-2000:]
        assert "Traceback" not in done.stderr


# -----------------------------------------------------------------------------
# Case 7: the words name what is wrong


def test_a_model_folder_without_a_tokenizer_says_so(model_dir, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(model_dir("llama")) / name, model)
    line = refused(capsys, P(lambda _: model, "--steps", 1),
                   r"cannot load the tokenizer of model .*: the folder has config.json but no "
                   r"tokenizer .*save the model's tokenizer into it")
    assert "not a local folder" not in line


def test_a_template_with_an_unknown_placeholder_is_refused(model_dir, capsys):
    refused(capsys, P(model_dir, "--template", "{sentence} {foo} It was {mask}"),
            r"--template .*: unknown placeholder \{foo\}; a template takes \{sentence\}")


@pytest.mark.parametrize("template", ["{sentence} It was {mask", "sentence} It was {mask}", "{sentence} {{mask}}"])
def test_a_template_with_a_brace_out_of_its_pair_is_refused(model_dir, capsys, template):
    """A typo'd `{mask` had trained with the text "{mask" in every prompt and the label read after it."""
    refused(capsys, P(model_dir, "--template", template), r"--template .*: a brace without its pair; a template takes")


def test_a_template_with_two_masks_is_refused(model_dir, capsys):
    refused(capsys, P(model_dir, "--template", "{sentence} {mask} {mask}", kind="roberta"),
            r"--template .*: \{mask\} appears 2 times; .* give one \{mask\}")


@pytest.mark.parametrize("template, cut", [("{mask}: {sentence}", "{sentence}"),
                                           ("It was {mask}, said {sentence:l}", "{sentence:l}")])
def test_a_sentence_after_the_mask_is_refused_for_a_causal_lm_and_taken_by_a_masked_one(model_dir, tmp_path, capsys,
                                                                                     template, cut):
    """A causal LM predicts the label word after the text before {mask}, and the rest is cut: a masked-LM template
    with a sentence after {mask} (LM-BFF's TREC and RTE ones) trained on the prompt alone, the sentence never seen.
    It is one line that names what would be cut and the task's own template; a masked LM takes it."""
    refused(capsys, P(model_dir, "--template", template, "--out", tmp_path / "run"),
            rf"--template .*: a causal LM predicts the label word after the text before \{{mask\}}, so what follows "
            rf"it is cut, {re.escape(cut)} with it; put every sentence before \{{mask\}} \(the task's: ")
    assert nothing_written(tmp_path / "run")
    code = mezo.main([str(a) for a in P(model_dir, "--template", template, "--steps", 0, kind="roberta")])
    assert code == 0, capsys.readouterr().err[-2000:]


def test_a_flag_the_others_leave_without_effect_gets_a_note_and_the_run_goes_on(model_dir, tmp_path, capsys):
    """`--mode full --lora-r 4`, `--mode lora --num-prefix 3`, `--beta` without a rule that has one, `--save-every`
    without `--out`, `--data-dir` for the synthetic task, a `--batch-size` past the training set: each was dropped without a word, and a user believed it
    acted. Each is a note now; the run goes on (a script may always pass them), and a run with the defaults prints
    none."""
    code, out, _ = run(P(model_dir, "--steps", 0, "--mode", "full", "--lora-r", 4, "--lora-targets", "q_proj,v_proj",
                         "--num-prefix", 3, "--beta", 0.5, "--save-every", 5, "--k", 4, "--batch-size", 9,
                         "--data-dir", tmp_path), capsys)
    assert code == 0 and [line for line in out.splitlines() if "note" in line] == [
        "mezo: note: --lora-r 4 has no effect: --mode full trains no LoRA",
        "mezo: note: --lora-targets q_proj,v_proj has no effect: --mode full trains no LoRA",
        "mezo: note: --num-prefix 3 has no effect: --mode full trains no prefix",
        "mezo: note: --beta 0.5 has no effect: --rule sgd has no β",
        "mezo: note: --save-every 5 has no effect: there is no --out to save into",
        f"mezo: note: --data-dir {tmp_path} has no effect: --task synthetic makes its own examples",
        # k 4 of each of 2 classes: 8 training examples
        "mezo: note: --batch-size 9 is more than the 8 training examples; each step takes all 8"]
    code, out, _ = run(P(model_dir, "--steps", 0, "--rule", "momentum", "--beta", 0.5), capsys)
    assert code == 0 and "note" not in out


EMPTY = "is empty; give comma-separated values, or leave {flag} out for the default"
ITEM = "{value!r} has an empty item; give comma-separated values with none empty"


@pytest.mark.parametrize("flag", ["--label-words", "--lora-targets"])
@pytest.mark.parametrize("value,says", [("", EMPTY), (",", EMPTY), (" bad,, good", ITEM), (" bad, good,", ITEM)])
def test_an_empty_list_or_item_is_refused_not_taken_for_the_default_or_dropped(model_dir, tmp_path, capsys, flag,
                                                                               value, says):
    """`--label-words "$WORDS"` with WORDS unset would otherwise train on the task's words; a doubled or trailing comma
    is a slip, and dropping its empty item had trained on the words left."""
    says = says.format(flag=flag, value=value)
    refused(capsys, P(model_dir, flag, value, "--out", tmp_path / "run"), re.escape(f"{flag} {says}"))
    assert nothing_written(tmp_path / "run")


@pytest.mark.parametrize("flag", ["--out", "--resume", "--replay", "--data-dir", "--model", "--device", "--template"])
@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_text_flag_is_refused_not_taken_for_the_flag_left_out(model_dir, tmp_path, capsys, flag, value):
    """`--out "$OUT"` with OUT unset ran the whole run and kept nothing; `--resume ""` started a fresh run that kept
    nothing; `--data-dir ""` and `--device ""` fell back to the defaults. Each is one line now, before anything runs;
    and mezo.Config refuses an empty text field in the same words."""
    with pytest.raises(SystemExit) as e:  # argparse's exit, as for any mistaken flag
        mezo.main([str(a) for a in P(model_dir, "--out", tmp_path / "run", flag, value)])
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and err == [f"mezo: error: {flag} is empty; give a value, or leave it out for its default"]
    assert nothing_written(tmp_path / "run")
    if flag not in ("--resume", "--replay"):  # (not Config's fields)
        with pytest.raises(mezo.UsageError, match=rf"^{flag} is empty; give a value, or leave {flag} out for the "):
            mezo.Config(**{flag[2:].replace("-", "_"): value})


# -----------------------------------------------------------------------------
# Case 8: the optimizer API refuses what its constructor refuses, keeps rules apart, and skips
# frozen tensors


def test_a_param_group_with_a_negative_lr_is_refused():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"param group 1 needs finite lr >= 0 and weight_decay >= 0; "
                       r"got lr=-1"):
        mezo.MeZO([{"params": a.parameters()}, {"params": b.parameters(), "lr": -1}])
    opt = mezo.MeZO(a.parameters())
    for bad in (dict(lr=-1), dict(lr=float("nan")), dict(weight_decay=-0.1), dict(lr=float("inf")), dict(lr="x"),
                dict(lr=None), dict(lr=torch.tensor([0.1, 0.2]))):
        with pytest.raises(ValueError, match=r"param group 1 needs finite lr >= 0"):
            opt.add_param_group({"params": b.parameters(), **bad})
    assert len(opt.param_groups) == 1


def test_an_infinite_lr_eps_or_weight_decay_is_refused_before_it_reaches_the_parameters():
    """eps=inf had left the parameters NaN (θ + inf·z), and lr=inf infinite, with no error or one that called them
    intact: refused as a negative one is."""
    a, x = nn.Linear(4, 2), torch.randn(3, 4)
    for bad in (dict(eps=float("inf")), dict(lr=float("inf")), dict(weight_decay=float("inf")),
                dict(eps=torch.tensor(float("inf")))):
        with pytest.raises(ValueError, match=r"^MeZO needs finite lr >= 0, eps > 0, weight_decay >= 0"):
            mezo.MeZO(a.parameters(), **bad)
    opt, before = mezo.MeZO(a.parameters(), lr=torch.tensor(0.1)), [p.clone() for p in a.parameters()]
    opt.step(lambda: a(x).pow(2).mean())  # a one-element tensor is a rate, as torch's optimizers take
    assert all(torch.isfinite(p).all() and not torch.equal(p, q) for p, q in zip(a.parameters(), before))


def test_an_adam_state_does_not_load_into_a_momentum_optimizer():
    model = nn.Linear(3, 2)
    adam = mezo.MeZO(model.parameters(), rule=rules.make("adam"))
    adam.step(lambda: model(torch.ones(1, 3)).sum())
    momentum = mezo.MeZO(model.parameters(), rule=rules.make("momentum"))
    with pytest.raises(ValueError, match=r"saved with another --rule \(adam\), and this MeZO's "
                       r"rule is momentum: make the MeZO with the rule it was saved with "
                       r"\(rule=rules.make\('adam'\)\)"):
        momentum.load_state_dict(adam.state_dict())
    assert momentum.steps == 0
    with pytest.raises(ValueError, match=r"another --rule \(adam\), and this MeZO's rule is sgd"):
        mezo.MeZO(model.parameters()).load_state_dict(adam.state_dict())


def test_parameters_that_do_not_require_grad_are_neither_perturbed_nor_updated():
    """A frozen layer: every forward sees it unchanged, and the others follow mezo_step on them
    alone (z laid out over the trainable ones), bit for bit. Unfreezing it lays z out over all of
    them again. (With every parameter trainable, test_optimizer's bit-for-bit tests still hold.)"""
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    ref = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    ref.load_state_dict(ours.state_dict())
    ours[0].requires_grad_(False)
    frozen = ours[0].weight.detach().clone()
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    seen = []

    def loss():
        seen.append(torch.equal(ours[0].weight, frozen))
        return nn.functional.mse_loss(ours(x), y)

    opt = mezo.MeZO(ours.named_parameters(), lr=0.1, seed=5)
    params = mezo.make_trainables([(n, p) for n, p in ref.named_parameters() if n[:2] != "0."])
    ref_loss = lambda: nn.functional.mse_loss(ref(x), y).item()  # noqa: E731
    for t in (1, 2):
        opt.step(loss)
        mezo.mezo_step(params, ref_loss, [mezo.step_seed(5, t, 0)], 1e-3, 0.1, 0.0)
    assert all(seen) and len(seen) == 4
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), ref.parameters()))
    ours[0].requires_grad_(True)
    opt.step(loss)
    assert not torch.equal(ours[0].weight, frozen)


def test_a_model_path_that_is_a_file_or_missing_says_so_and_a_tilde_is_expanded(model_dir, tmp_path, capsys,
                                                                                  monkeypatch):
    """--model given the weights file instead of its folder, or a path that is not there: one line that names
    which, not the hub's complaint about a repo id; `--model=~/...` (which no shell expands) is the home's."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with_model = lambda m: P(model_dir, "--steps", 1)[:3] + [m] + P(model_dir, "--steps", 1)[4:]  # noqa: E731
    weights = Path(model_dir("llama")) / "model.safetensors"
    line = refused(capsys, with_model(weights), rf"cannot load model '{re.escape(str(weights))}': it is a file, "
                   r"not a folder: pass the folder that holds it with its config.json")
    assert "hub" not in line
    for missing in (tmp_path / "gone", "./gone"):
        line = refused(capsys, with_model(missing), r": no such folder \(a hub name has no leading / or \./\)")
        assert "Repo id" not in line and "hub did not serve" not in line
    home = tmp_path / "home"
    shutil.copytree(model_dir("llama"), home / "models" / "tiny")
    monkeypatch.setenv("HOME", str(home))
    assert mezo.main([str(a) for a in with_model("~/models/tiny")]) == 0


@pytest.mark.parametrize("slip", ["smollm2-135", "smolm2-135m", "smollm2_135m"])
def test_a_slip_of_the_offline_alias_is_one_line_at_once_and_its_capitals_are_the_alias(slip, model_dir, tmp_path,
                                                                                       capsys, monkeypatch):
    """`--model smollm2-135` went to the hub as a repo id: offline, half a minute of retries, then the hub's
    complaint. A name near the alias (and not a folder) is one line that names the alias and the hub's full name, with
    no hub asked (HF_HUB_OFFLINE would make the hub's own line); `SmolLM2-135M`, as the model card spells it, is the
    alias."""
    from mezo import models, runs
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    argv = P(model_dir, "--steps", 1)
    argv[argv.index("--model") + 1] = slip
    refused(capsys, argv, rf"cannot load model '{slip}': no such folder, and not the offline alias smollm2-135m; did "
            r"you mean --model smollm2-135m\? \(a hub model takes its full name, e.g. HuggingFaceTB/SmolLM2-135M-Instruct\)$")
    monkeypatch.setattr(models, "cache_dir", lambda: tmp_path / "cache")
    (tmp_path / "cache" / "models" / "smollm2-135m").mkdir(parents=True)
    (tmp_path / "cache" / "models" / "smollm2-135m" / "config.json").write_text("{}")
    assert models.resolve_model_path("SmolLM2-135M") == str(tmp_path / "cache" / "models" / "smollm2-135m")
    assert models.resolve_model_path("smollm2-360m-instruct") == "smollm2-360m-instruct"  # far enough: a hub name
    # a run started as smollm2-135m resumes with --model SmolLM2-135M; a hub name keeps its case
    assert runs.same_model_folder("smollm2-135m", "SmolLM2-135M") and not runs.same_model_folder("gpt2", "GPT2")


def test_with_no_network_a_hub_name_is_read_from_the_cache_at_once_not_after_the_hubs_retries(model_dir, tmp_path):
    """With no network, a hub name waited through the hub's five retries (half a minute) before it was read from the
    hub's cache, or refused; transformers 5.25 asks again for adapter_config.json even with local_files_only. Where
    the hub's host has no address (here: an .invalid endpoint, which never resolves), the name is read from the cache
    alone: a cached model runs, an absent one is one line, and the hub is never retried."""
    snapshot_dir = tmp_path / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / ("a" * 40)
    shutil.copytree(model_dir("llama"), snapshot_dir)
    (snapshot_dir.parents[1] / "refs").mkdir()
    (snapshot_dir.parents[1] / "refs" / "main").write_text("a" * 40)
    env = {**os.environ, "HF_ENDPOINT": "https://hub.invalid", "HF_HUB_CACHE": str(tmp_path / "hub")}
    env.pop("HF_HUB_OFFLINE", None)
    code = ("import sys, mezo\n"
            "a = mezo.main(sys.argv[1:] + ['--model', 'tiny-org/tiny-llama', '--out', 'run'])\n"
            "b = mezo.main(sys.argv[1:] + ['--model', 'tiny-org/absent'])\n"
            "sys.exit(10 * a + b)")
    flags = [str(a) for a in P(model_dir, "--steps", 1)]
    flags = flags[:flags.index("--model")] + flags[flags.index("--model") + 2:]
    done = subprocess.run([sys.executable, "-c", code, *flags], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]  # the cached model ran (0), the absent one refused (2)
    assert (tmp_path / "run" / "checkpoint.safetensors").is_file()
    assert "mezo: the hub cannot be reached from here: 'tiny-org/tiny-llama' is read from its cache" in done.stderr
    assert re.search(r"^mezo: error: cannot load model 'tiny-org/absent': not a local folder", done.stderr, re.M)
    assert "Retrying" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]


def test_relative_and_tilde_folders_are_kept_absolute_so_a_resume_works_from_another_folder(model_dir, tmp_path,
                                                                                              capsys, monkeypatch):
    """run.json kept --model and --data-dir as typed: a run started with `--model mdl` resumed only from the folder it
    started in (elsewhere, 'mdl' was a hub name, and --model ./path was refused as a changed model). `--out ~/run`
    (quoted, or --out=~/run, which no shell expands) made a folder named '~' in the working folder. Each folder is
    kept absolute, with ~ expanded, and --resume ~/run from another folder goes on."""
    home, start, elsewhere = tmp_path / "home", tmp_path / "start", tmp_path / "elsewhere"
    shutil.copytree(model_dir("llama"), start / "mdl")
    elsewhere.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(start)
    code, _, err = run(P(model_dir, "--steps", 2)[:3] + ["mdl"] + P(model_dir, "--steps", 2, "--out", "~/run")[4:],
                       capsys)
    assert code == 0, err
    assert not (start / "~").exists()
    saved = json.loads((home / "run" / "run.json").read_text())
    assert (saved["model"], saved["out"]) == (str(start / "mdl"), str(home / "run"))
    monkeypatch.chdir(elsewhere)
    code, out, err = run(["--resume", "~/run", "--steps", 3], capsys)
    assert code == 0 and f"resumed from {home / 'run'} at step 2" in out, err
    assert [r["step"] for r in records(home / "run") if "seed" in r] == [1, 2, 3]
    cfg = mezo.Config(data_dir="data", out="~/x", model="not/a/folder")  # a hub name stays as it is
    assert (cfg.data_dir, cfg.out, cfg.model) == (str(elsewhere / "data"), str(home / "x"), "not/a/folder")


def test_a_resume_that_finds_other_data_is_refused_and_the_same_data_moved_goes_on(model_dir, tmp_path, capsys):
    """A resume read whatever data it found: run.json keeps --data-dir as given and nothing of $MEZO_DATA, so a run
    resumed without it, or with another folder, trained on other examples without a word. A checkpoint keeps a
    fingerprint of the splits: other train or test examples are refused in one line that names the split and both
    folders, and change nothing; the same files in another folder go on."""
    data = sst2_data(tmp_path / "data")
    code, _, err = run(sst2(model_dir, data, "--steps", 2, "--out", tmp_path / "run"), capsys)
    assert code == 0, err
    before = snapshot(tmp_path / "run")
    other = shutil.copytree(data, tmp_path / "other")
    train = other / "lm-bff" / "SST-2" / "train.tsv"
    train.write_text(train.read_text().replace("movie", "show"))
    refused(capsys, ["--resume", tmp_path / "run", "--steps", 4, "--data-dir", other],
            rf"--resume .*run: the train set found now \(data from {other}\) is not the one the run was trained "
            rf"on; the run's data came from {data}: give --data-dir \(or \$MEZO_DATA\) that folder$")
    shutil.copy(data / "lm-bff" / "SST-2" / "train.tsv", train)
    (other / "sst2" / "dev.tsv").write_text("sentence\tlabel\nthe show was good\t1\n")
    refused(capsys, ["--resume", tmp_path / "run", "--steps", 4, "--data-dir", other], r"the test set found now")
    dev = data / "sst2" / "dev.tsv"
    kept = dev.read_bytes()
    dev.write_text("sentence\tlabel\nthe show was good\t1\n")  # the run's own folder, edited since
    refused(capsys, ["--resume", tmp_path / "run", "--steps", 4],
            rf"the test set found now \(data from {data}\) is not the one the run was trained on; its files changed "
            r"since the run read them: put them back as they were$")
    dev.write_bytes(kept)
    assert snapshot(tmp_path / "run") == before
    moved = shutil.copytree(data, tmp_path / "moved")
    shutil.rmtree(data)
    code, out, err = run(["--resume", tmp_path / "run", "--steps", 4, "--data-dir", moved], capsys)
    assert code == 0 and "resumed from" in out and "at step 2" in out, err


def test_a_run_started_under_mezo_data_resumes_from_that_data_once_it_is_unset(model_dir, tmp_path, capsys,
                                                                               monkeypatch):
    """run.json keeps --data-dir as given, and $MEZO_DATA is no flag: a run started under it (a relative one, too)
    and resumed from a new shell looked in the checkout's and the cache's folders, found other data or none. A
    checkpoint keeps the folder its data came from, and a resume with neither --data-dir nor $MEZO_DATA reads
    there."""
    data = sst2_data(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEZO_DATA", "data")
    argv = sst2(model_dir, data, "--steps", 2, "--out", tmp_path / "run")
    del argv[argv.index("--data-dir"):argv.index("--data-dir") + 2]
    code, out, err = run(argv, capsys)
    assert code == 0 and "mezo: data from data\n" in out, err
    monkeypatch.delenv("MEZO_DATA")
    monkeypatch.chdir(tmp_path / "run")
    code, out, err = run(["--resume", tmp_path / "run", "--steps", 3], capsys)
    assert code == 0 and f"mezo: data from {data} (the run's)" in out and "at step 2" in out, err


def test_a_refusal_after_the_data_loads_leaves_no_empty_out_and_names_what_would_do(model_dir, tmp_path, capsys):
    """`--out` was made before the data and the model loaded, to check it could be: a mistake found later (a
    --lora-targets the model lacks, a missing model, a --tp the model does not divide) left an empty folder, parents
    and all. The check makes it and takes it away; the run makes it as it starts. A folder that was there stays. The
    line for --lora-targets names the model's own linear layers."""
    refused(capsys, P(model_dir, "--lora-targets", "nosuch", "--out", tmp_path / "new" / "run"),
            r"--lora-targets nosuch matches no nn.Linear in this model; give comma-separated names from its own: "
            r"q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head$")
    assert not (tmp_path / "new").exists()
    (tmp_path / "theirs").mkdir()
    refused(capsys, P(model_dir, "--model", tmp_path / "no-model", "--out", tmp_path / "theirs"), r"--model")
    assert (tmp_path / "theirs").is_dir() and not any((tmp_path / "theirs").iterdir())
    code, _, err = run(P(model_dir, "--steps", 1, "--out", tmp_path / "new" / "run"), capsys)
    assert code == 0 and (tmp_path / "new" / "run" / "checkpoint.safetensors").is_file(), err


def test_a_refused_out_leaves_a_users_folder_as_it_was_and_a_finished_run_leaves_no_lock(model_dir, tmp_path, capsys):
    """`--out` into a folder of the user's that holds a summary.json of their own is refused ("nothing was changed"),
    and it was: the run's lock file, made there to hold the folder, went with the refusal. A finished run's folder
    keeps no .lock either; a lock file the run found there stays. A path with a space is quoted in the command the
    line names, and the line comes before the model loads (it came after, 20 s on SmolLM2)."""
    theirs = tmp_path / "their files"
    theirs.mkdir()
    (theirs / "summary.json").write_text("{}")
    (theirs / "notes.txt").write_text("mine")
    before = snapshot(theirs)
    assert mezo.main([str(a) for a in P(model_dir, "--steps", 1, "--out", theirs)]) == 2
    out, err = capsys.readouterr()  # (a summary.json no run wrote is no run)
    assert re.search(r"^mezo: error: --out .*their files holds summary.json, not written by a mezo run: move it, or "
                     r"pick another folder \(nothing was changed\)$", err, re.M), err
    assert "mezo: model" not in out  # refused before the model loads
    assert snapshot(theirs) == before and sorted(p.name for p in theirs.iterdir()) == ["notes.txt", "summary.json"]
    (theirs / "summary.json").write_text('{"steps": 1}')  # one a run wrote
    before = snapshot(theirs)
    assert mezo.main([str(a) for a in P(model_dir, "--steps", 1, "--out", theirs)]) == 2
    out, err = capsys.readouterr()  # the command it names is quoted as a shell takes it
    assert re.search(r"^mezo: error: --out .*their files already holds a run \(summary.json\): --resume "
                     r"'.*/their files' to go on with it, .*\(nothing was changed\)$", err, re.M), err
    assert "mezo: model" not in out
    assert snapshot(theirs) == before and sorted(p.name for p in theirs.iterdir()) == ["notes.txt", "summary.json"]
    code, _, err = run(P(model_dir, "--steps", 1, "--out", tmp_path / "run"), capsys)
    assert code == 0 and not (tmp_path / "run" / ".lock").exists(), err
    (tmp_path / "run" / ".lock").touch()
    code, _, err = run(["--resume", tmp_path / "run", "--steps", 2], capsys)
    assert code == 0 and (tmp_path / "run" / ".lock").exists(), err


def test_overwrite_removes_a_runs_files_and_not_a_users_file_in_its_adapter_folder(model_dir, tmp_path, capsys):
    """--overwrite "removes that run's files first": it removed the whole adapter/ folder, with a file of the user's
    in it. Only the adapter's two files go (the new run writes its own); the user's file stays."""
    out = tmp_path / "run"
    assert run(P(model_dir, "--steps", 1, "--out", out), capsys)[0] == 0
    (out / "adapter" / "notes.txt").write_text("mine")
    first = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    assert run(P(model_dir, "--steps", 1, "--out", out, "--overwrite", "--seed", 1), capsys)[0] == 0
    assert (out / "adapter" / "notes.txt").read_text() == "mine"
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() != first  # the new run's


def test_a_run_folder_or_its_adapter_given_as_the_model_names_what_it_is_and_what_to_do(model_dir, tmp_path, capsys):
    """--model pointed at a run's --out (the honest "the model I trained") or at its adapter/: one line that says
    what the folder is, with the --resume that goes on training it, instead of a missing config.json."""
    run = tmp_path / "run"
    assert mezo.main([str(a) for a in P(model_dir, "--steps", 2, "--out", run)]) == 0
    capsys.readouterr()
    before = snapshot(run)
    refused(capsys, P(model_dir, "--steps", 2)[:3] + [run] + P(model_dir)[4:],
            rf"cannot load model '{re.escape(str(run))}': it is a mezo run's folder \(its model: .*llama.*\), "
            rf"not a model: --resume {re.escape(str(run))} goes on training it, and peft loads its adapter/$")
    refused(capsys, P(model_dir, "--steps", 2)[:3] + [run / "adapter"] + P(model_dir)[4:],
            r"it is a PEFT adapter of .*llama.*, not a model: peft loads it onto its base model .*--resume the run")
    assert snapshot(run) == before


@pytest.mark.parametrize("given, said", [
    (dict(eps=0), "--eps must be a finite number > 0, got 0.0"),  # an int had passed the strict bound
    (dict(steps=2.5), "--steps takes a whole number, got 2.5"),
    (dict(steps=None), "--steps takes a whole number, got None"),
    (dict(lr="1e-3"), "--lr takes a number, got '1e-3'"),
    (dict(fast=1), "--fast takes True or False, got 1"),
    (dict(label_words="bad,good"), "--label-words takes a tuple of text, one item each, got 'bad,good'"),
    (dict(label_words=("bad", "")), "--label-words 'bad,' has an empty item"),
])
def test_a_config_made_in_python_checks_its_types_as_the_command_line_does(given, said):
    """mezo.Config(...) from a script: a value of the wrong type had been taken and failed deep in a run (a
    ZeroDivisionError at step 1 for eps=0). Each is one UsageError now, and the right values are taken as the
    command line takes them: an int for a float, a list for a tuple, a task's other spelling."""
    import mezo
    with pytest.raises(mezo.UsageError, match=re.escape(said)):
        mezo.Config(task="synthetic", **given)
    cfg = mezo.Config(task="SST-2", lr=1, label_words=[" bad", " good"])
    assert (cfg.task, cfg.lr, cfg.label_words) == ("sst2", 1.0, (" bad", " good")) and isinstance(cfg.lr, float)


@pytest.mark.parametrize("env, said", [
    (dict(WORLD_SIZE="abc"), r"WORLD_SIZE='abc' is not a number of processes: unset it to run one process, or launch "
                             r"with torchrun"),
    (dict(WORLD_SIZE="2"), r"WORLD_SIZE=2 is set but not RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT: unset WORLD_SIZE "
                           r"to run one process, or launch with torchrun --nproc-per-node 2"),
    (dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0"), r"WORLD_SIZE=2 is set but not MASTER_ADDR, MASTER_PORT"),
], ids=["not-a-number", "alone", "no-master"])
def test_a_world_size_left_in_the_shell_is_one_line_before_anything_is_made(model_dir, tmp_path, capsys, monkeypatch,
                                                                            env, said):
    """WORLD_SIZE left over from a torchrun job (or set by hand) without the rest of torchrun's variables had ended in
    a KeyError, a ValueError or torch.distributed's own traceback; WORLD_SIZE=1 is one process, as without it."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    refused(capsys, P(model_dir, "--steps", 1, "--out", tmp_path / "run"), said)
    assert not (tmp_path / "run").exists()
    for name in env:
        monkeypatch.delenv(name)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert run(P(model_dir, "--steps", 1), capsys)[0] == 0
