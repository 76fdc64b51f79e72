"""The command line as a user runs it: convergence, the log, exact resume, and every bad input's error."""
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import expect_error, records, run, tiny_args
from mezo.tasks import prompts, synthetic
from safetensors.torch import load_file

import mezo
from mezo import checkpoints, models, runs

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def test_synthetic_task_learns_well_above_chance(model_dir, tmp_path, capsys):
    """A random tiny Llama, its fresh classification head trained by MeZO alone: chance is 0.5."""
    code, out, err = run(["--task", "synthetic", "--model", model_dir("llama"), "--head", "cls", "--mode", "head",
                          "--template", "{sentence}", "--k", 64, "--batch-size", 32, "--lr", 0.05, "--steps", 100,
                          "--eval-every", 50, "--out", tmp_path], capsys)
    assert code == 0, err
    evals = [r for r in records(tmp_path) if r.get("split") == "test"]
    assert [e["step"] for e in evals] == [0, 50, 100]
    assert evals[0]["accuracy"] < 0.65 and evals[-1]["accuracy"] >= 0.8, evals
    assert "step    100 | test accuracy" in out


def test_log_has_the_promised_fields(model_dir, tmp_path, capsys):
    code, out, err = run(tiny_args(model_dir, tmp_path, n_samples=2), capsys)
    assert code == 0, err
    log = records(tmp_path)
    steps = [r for r in log if "seed" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for r in steps:
        assert {"step", "seed", "loss_plus", "loss_minus", "projected_grad", "lr"} <= set(r)
        # the same float64 arithmetic on the logged L± (JSON keeps floats): ulps; 1e-9 margin
        assert r["projected_grad"] == pytest.approx(
            sum((s["loss_plus"] - s["loss_minus"]) / 2e-3 for s in r["samples"]) / 2, rel=1e-9)
        assert [s["seed"] for s in r["samples"]] == [mezo.step_seed(0, r["step"], k) for k in range(2)]
    evals = [r for r in log if "split" in r]
    assert {(r["step"], r["split"]) for r in evals} == {(s, sp) for s in (0, 3, 6) for sp in ("dev", "test")}
    assert all({"accuracy", "loss"} <= set(r) for r in evals)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_resume_continues_the_identical_trajectory(model_dir, tmp_path, capsys, mode):
    """6 steps straight == 3 steps, stop, --resume, 3 more: every logged loss and every tensor identical."""
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    assert run(tiny_args(model_dir, straight, mode=mode), capsys)[0] == 0
    assert run(tiny_args(model_dir, halves, mode=mode, steps=3), capsys)[0] == 0
    with open(halves / "log.jsonl", "a") as f:  # a crash after step 3's checkpoint left a stray record
        f.write(json.dumps(dict(step=4, seed=0, loss_plus=9.0, loss_minus=9.0, projected_grad=0.0, lr=0.0)) + "\n")
    code, out, err = run(["--resume", halves, "--steps", 6], capsys)
    assert code == 0, err
    assert "resumed from" in out and "at step 3" in out
    keys = ("step", "seed", "loss_plus", "loss_minus", "projected_grad", "split", "accuracy", "loss")
    strip = lambda log: [{k: r[k] for k in keys if k in r} for r in log]
    assert strip(records(halves)) == strip(records(straight))
    a, b = load_file(straight / checkpoints.CHECKPOINT), load_file(halves / checkpoints.CHECKPOINT)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if mode == "lora":
        assert (halves / "adapter" / "adapter_model.safetensors").exists()


def test_resume_into_another_folder_branches_the_run_with_its_whole_log(model_dir, tmp_path, capsys):
    """--resume A --out B: B is A's run continued (A unchanged), its log holds A's steps before its own, so it equals
    the straight run's and a --replay of B rebuilds B's tensors bit for bit."""
    straight, trunk, branch = tmp_path / "straight", tmp_path / "trunk", tmp_path / "branch"
    assert run(tiny_args(model_dir, straight), capsys)[0] == 0
    assert run(tiny_args(model_dir, trunk, steps=3), capsys)[0] == 0
    before = (trunk / "log.jsonl").read_bytes()
    assert run(["--resume", trunk, "--out", branch, "--steps", 6], capsys)[0] == 0
    assert (trunk / "log.jsonl").read_bytes() == before
    keys = ("step", "seed", "loss_plus", "loss_minus", "projected_grad", "split", "accuracy", "loss")
    strip = lambda log: [{k: r[k] for k in keys if k in r} for r in log]
    assert strip(records(branch)) == strip(records(straight))
    assert run(["--replay", branch, "--out", tmp_path / "rebuilt"], capsys)[0] == 0
    for other in (straight, tmp_path / "rebuilt"):
        a, b = load_file(branch / checkpoints.CHECKPOINT), load_file(other / checkpoints.CHECKPOINT)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("flags,pattern", [
    (["--task", "imdb"], r"unknown --task 'imdb'; choose one of sst2, sst5, mr, cr, mpqa, subj, trec, rte, mnli"),
    (["--eps", "0"], r"--eps must be a finite number > 0, got 0.0"),
    (["--eps=-1e-3"], r"--eps must be a finite number > 0, got -0.001"),
    (["--eps", "nan"], r"--eps must be a finite number > 0, got nan"),
    (["--lr=-1"], r"--lr must be a finite number >= 0"),
    (["--lr", "-1e-3"], r"--lr must be a finite number >= 0, got -0.001"),  # was "expected one argument"
    (["--batch-size", "0"], r"--batch-size 0 is out of range"),
    (["--mode", "head"], r"--mode head .* needs --head cls"),
    (["--template", "It was {mask}"], r"--template 'It was \{mask\}': .* the template needs \{sentence\}"),
    (["--label-words", " bad, bad"], r"map to the same token"),
    (["--top-layers", "9"], r"--top-layers 9 exceeds the model's 2 layers"),
    (["--lora-targets", "c_attn"], r"--lora-targets c_attn matches no nn.Linear"),
    (["--lora-dtype", "int8"], r"unknown --lora-dtype 'int8'; choose one of float32, bfloat16, float16"),
    (["--cache", "--tp", "2"], r"--cache .* does not take tensor-parallel shards"),
])
def test_bad_values_get_one_clear_error(model_dir, tmp_path, capsys, flags, pattern):
    expect_error(capsys, tiny_args(model_dir, tmp_path) + flags, pattern)


def test_unknown_model_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    expect_error(capsys, ["--task", "synthetic", "--model", tmp_path / "no-such-model"],
                 r"cannot load model .*no-such-model.*Pass --model /path/to/folder")


def test_missing_data_dir_is_refused(model_dir, tmp_path, capsys):
    expect_error(capsys, ["--task", "sst2", "--model", model_dir("llama"), "--data-dir", tmp_path / "nothing"],
                 r"sst2 \(SST-2\) data not found: looked for lm-bff/SST-2/train.tsv, sst2/dev.tsv in .*nothing")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(model_dir, tmp_path, capsys):
    # float16 weights pushed to ~1e4 by a huge step stay finite, but their products overflow in the forward
    line = expect_error(capsys, tiny_args(model_dir, tmp_path, mode="full", dtype="float16", lr=1e4, steps=5,
                                          eval_every=0),
                        r"non-finite loss at step 2 .*kept step 0's exact tensors", code=1)
    assert "--resume" in line
    from safetensors import safe_open
    with safe_open(str(tmp_path / checkpoints.CHECKPOINT), "pt") as f:
        assert f.metadata()["step"] == "0"
        assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())


def test_corrupt_or_mismatched_checkpoint_is_refused(model_dir, tmp_path, capsys):
    expect_error(capsys, ["--resume", tmp_path / "missing"], r"missing: no such folder; point --resume at a run's")
    (tmp_path / "empty").mkdir()
    expect_error(capsys, ["--resume", tmp_path / "empty"], r"empty: no checkpoint.safetensors there; point --resume")
    assert run(tiny_args(model_dir, tmp_path, steps=1), capsys)[0] == 0
    good = (tmp_path / checkpoints.CHECKPOINT).read_bytes()
    # a file or folder inside the run (its checkpoint, its adapter/): the line names the run's folder
    expect_error(capsys, ["--resume", tmp_path / checkpoints.CHECKPOINT],
                 rf"checkpoint.safetensors: a file, not a folder; point --resume at the run's folder, {tmp_path}$")
    expect_error(capsys, ["--replay", tmp_path / "adapter", "--out", tmp_path / "x"],
                 rf"adapter: no checkpoint.safetensors there; point --replay at the run's folder, {tmp_path}$")
    expect_error(capsys, ["--resume", tmp_path, "--lora-r", 4], r"trained with --lora-r 8; .*\(drop --lora-r 4\)")
    expect_error(capsys, ["--resume", tmp_path, "--mode", "full"], r"trained with --mode lora; resume it with the same")
    code, out, err = run(["--resume", tmp_path, "--task", "sst2"], capsys)  # refused before the model loads
    assert code == 2 and "trained with --task synthetic" in err and "mezo: model" not in out, (out, err)
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    with safe_open(str(tmp_path / checkpoints.CHECKPOINT), "pt") as f:
        meta = f.metadata()
    save_file(load_file(tmp_path / checkpoints.CHECKPOINT), tmp_path / checkpoints.CHECKPOINT,
              metadata=meta | dict(format="mezo-2"))  # a later version's
    expect_error(capsys, ["--resume", tmp_path], r"checkpoint.safetensors is format 'mezo-2', written by another "
                 r"version of mezo; this one reads 'mezo-1'$")
    later = json.loads(meta["config"]) | dict(warmup_steps=10)  # a setting a later version added
    save_file(load_file(tmp_path / checkpoints.CHECKPOINT), tmp_path / checkpoints.CHECKPOINT,
              metadata=meta | dict(config=json.dumps(later)))
    expect_error(capsys, ["--resume", tmp_path], r"its run has settings this version of mezo does not know "
                 r"\(warmup_steps\); go on with the version that wrote it$")
    (tmp_path / checkpoints.CHECKPOINT).write_bytes(good[:len(good) // 2])  # truncated, as by a full disk
    expect_error(capsys, ["--resume", tmp_path], r"checkpoint.safetensors is corrupt")
    assert (tmp_path / "log.jsonl").exists()


@pytest.mark.skipif(not (SHARED / "lm-bff" / "SST-2" / "train.tsv").exists(), reason="no ../shared/data")
def test_command_line_runs_sst2_in_a_subprocess(model_dir, tmp_path):
    """`python mezo.py --task sst2 ...` as a user types it: real SST-2 (16-shot, seed 13), a tiny model."""
    proc = subprocess.run([sys.executable, str(ROOT / "mezo.py"), "--task", "sst2", "--model", model_dir("roberta"),
                           "--data-seed", "13", "--steps", "2", "--eval-every", "0", "--out", str(tmp_path),
                           "--label-words", " bad, good", "--threads", "1", "--device", "cpu"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mezo: sst2 train 32, dev 32, test 872" in proc.stdout
    assert "test accuracy" in proc.stdout
    assert (tmp_path / checkpoints.CHECKPOINT).exists()


def test_a_checkpoint_written_before_the_redesign_resumes(tmp_path, capsys):
    """tests/data/pre-redesign: 3 steps written by mezo.py at commit 0cce2eb (its README says how). It resumes
    under today's code, keeps its log, and continues as a hand-driven continuation from its tensors does."""
    fixture = ROOT / "tests" / "data" / "pre-redesign"
    run_dir = tmp_path / "run"
    shutil.copytree(fixture / "run", run_dir)
    old_log = records(run_dir)
    code, out, err = run(["--resume", run_dir, "--model", fixture / "model", "--steps", 6, "--eval-every", 0], capsys)
    assert code == 0 and "at step 3" in out, err
    log = records(run_dir)
    assert log[:len(old_log)] == old_log
    steps = [r for r in log if "seed" in r and r["step"] > 3]
    assert [r["step"] for r in steps] == [4, 5, 6] and [r["forwards"] for r in steps] == [8, 10, 12]
    # the continuation by hand: the checkpoint's tensors, the run's batches and seeds, mezo_step
    cfg = mezo.Config(**{**checkpoints.saved_config(run_dir), "model": str(fixture / "model")})
    model, tok, *_ = models.load_model(cfg.model)
    params = mezo.select_trainables(model, cfg)
    saved = load_file(fixture / "run" / checkpoints.CHECKPOINT)
    with torch.no_grad():
        for p in params:
            p.tensor.copy_(saved[p.name])
    forward = mezo.PromptForward(model, prompts.label_token_ids(tok, cfg.label_words))
    data = synthetic.load_synthetic(cfg.k, cfg.data_seed)
    train = [dict(zip(("ids", "position"), prompts.encode(tok, s, cfg.template, "causal", cfg.max_length)), label=y)
             for s, _, y in data["train"]]
    for r in steps:
        batch = [train[i] for i in runs.batch_indices(cfg.seed, r["step"], len(train), cfg.batch_size)]
        loss_fn = lambda: mezo.objective_loss(*prompts.batch_logits(forward, batch, 8, 0, "cpu"), "ce")
        s = mezo.mezo_step(params, loss_fn, [mezo.step_seed(cfg.seed, r["step"], 0)], cfg.eps, cfg.lr, 0.0)[0]
        assert (s["loss_plus"], s["loss_minus"], s["seed"]) == (r["loss_plus"], r["loss_minus"], r["seed"])
    final = load_file(run_dir / checkpoints.CHECKPOINT)
    assert all(torch.equal(final[p.name], p.tensor) for p in params)


def test_an_out_folder_that_cannot_be_made_is_one_line(model_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    expect_error(capsys, tiny_args(model_dir, blocker / "run"),
                 r"--out .*a-file/run: cannot create it \(Not a directory")
    expect_error(capsys, tiny_args(model_dir, blocker), r"--out .*a-file is a file, not a folder; give a folder")
    assert blocker.read_text() == "keep me"


def test_resume_with_a_broken_log_is_one_line_and_changes_nothing(model_dir, tmp_path, capsys):
    assert run(tiny_args(model_dir, tmp_path, steps=3), capsys)[0] == 0
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    broken = lines[:2] + [lines[2][:20]] + lines[3:]  # a record cut in the middle (a crash cuts the last line)
    (tmp_path / "log.jsonl").write_text("\n".join(broken) + "\n")
    before = {f: (tmp_path / f).read_bytes() for f in ("log.jsonl", checkpoints.CHECKPOINT)}
    expect_error(capsys, ["--resume", tmp_path, "--steps", 6], r"log.jsonl: line 3 is not a log record .*fix or delete")
    assert {f: (tmp_path / f).read_bytes() for f in before} == before
    # a last line cut short, as a run killed mid-write leaves it: dropped, and the run goes on
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "seed": 12')
    code, out, _ = run(["--resume", tmp_path, "--steps", 4], capsys)
    assert code == 0 and "note" not in out
    assert [r["step"] for r in records(tmp_path) if "seed" in r] == [1, 2, 3, 4]
    # a log that lost a step's record (edited, or emptied): the run goes on, and says what a replay can still rebuild
    (tmp_path / "log.jsonl").write_text("".join(line + "\n" for line in lines if '"step": 2, "seed"' not in line))
    code, out, _ = run(["--resume", tmp_path, "--steps", 5], capsys)
    assert code == 0 and f"mezo: note: {tmp_path / 'log.jsonl'} has no record of step 2 (cut short or edited): the " \
        "run goes on from its checkpoint, but --replay rebuilds it only up to step 1" in out.splitlines(), out


@pytest.mark.skipif(not (SHARED / "lm-bff" / "SST-2" / "train.tsv").exists(), reason="no ../shared/data")
def test_a_k_larger_than_a_class_is_one_line(model_dir, tmp_path, capsys):
    expect_error(capsys, ["--task", "sst2", "--model", model_dir("llama"), "--k", 5000, "--out", tmp_path / "run"],
                 r"--k 5000 needs 2k = 10000 examples of every class .*class 1 has 3610.*lower --k")


def test_help_explains_every_option_and_lists_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        mezo.parse_args(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--task {sst2,sst5,mr,cr,mpqa,subj,trec,rte,mnli,snli,qnli,synthetic}",
                 "--mode {lora,full,prefix,head}",
                 "--rule {sgd,momentum,adam,sign,conservative}",
                 "--head {prompt,cls}",
                 "--objective {ce,accuracy}", "--dtype {float32,bfloat16,float16}", "--optimizer {mezo,adam}"):
        assert flag in text, flag
    assert "learning rate (default: 0.001)" in text and "perturbation scale ε (paper: 1e-3) (default: 0.001)" in text
    assert "mnli, snli, qnli (LM-BFF's data/original: in --data-dir" in text and "lm-bff/datasets.tar" in text.replace("- ", "-")
    for f in dataclasses.fields(mezo.Config):  # every option has words, not only its default
        assert f.metadata["help"] and "--" + f.name.replace("_", "-") in text


def test_a_mistaken_flag_is_one_line_and_a_step_count_may_be_written_1e3(capsys):
    """argparse's refusals in one line (not the whole usage), with the flag a typo was near; an integer flag takes
    1e3 (as the paper writes 100K steps: 1e5), and refuses 2.5."""
    assert mezo.parse_args(["--steps", "1e3", "--eval-every", "2e2"])[0].steps == 1000
    for argv, said in ((["--steps", "2.5"], "argument --steps: invalid int value: '2.5', not a whole number"),
                       (["--stepz", "3"], "unrecognized arguments: --stepz 3 (did you mean --steps? "),
                       (["--lr"], "argument --lr: expected one argument")):
        with pytest.raises(SystemExit) as exit_:
            mezo.parse_args(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith(f"mezo: error: {said}"), err
        assert err[0].endswith("--help lists every flag)")
    # under torchrun every rank parses the same flags: local rank 0 alone says the mistake (tests/test_tp.py: the
    # checks after parsing); LOCAL_RANK left in a shell without WORLD_SIZE silences nothing
    for env, lines in (({"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, 0), ({"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, 1),
                       ({"LOCAL_RANK": "1"}, 1)):
        with pytest.MonkeyPatch.context() as m, pytest.raises(SystemExit) as exit_:
            for k in ("WORLD_SIZE", "LOCAL_RANK"):
                m.delenv(k, raising=False)
            for k, v in env.items():
                m.setenv(k, v)
            mezo.parse_args(["--stepz", "3"])
        assert exit_.value.code == 2 and len(capsys.readouterr().err.splitlines()) == lines, env


def test_train_from_python_takes_the_seams_its_config_asks_for(model_dir, tmp_path, capsys):
    """`mezo.train(mezo.Config(..., rule="adam"))` from a user's script had trained ZO-SGD (the rule was a seam only
    the command line made) while run.json said adam, so its --resume failed. Now train makes the seams the config
    asks for: its tensors and the rule's buffers equal the command line's bit for bit. A config for several processes
    in one is refused as the command line refuses it, and a dict is not a config."""
    from safetensors.torch import load_file
    args = tiny_args(model_dir, tmp_path / "cli", steps=3, eval_every=0, rule="adam", device="cpu")
    assert run(args, capsys)[0] == 0
    cfg, _ = mezo.parse_args([str(a) for a in tiny_args(model_dir, tmp_path / "api", steps=3, eval_every=0,
                                                        rule="adam", device="cpu")])
    mezo.train(cfg)
    a, b = load_file(tmp_path / "cli" / checkpoints.CHECKPOINT), load_file(tmp_path / "api" / checkpoints.CHECKPOINT)
    assert any(k.startswith("rule.") for k in a) and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(mezo.UsageError, match=r"--tp 1 --dp 2 needs 2 processes"):
        mezo.train(dataclasses.replace(cfg, dp=2, out=None))
    with pytest.raises(TypeError, match=r"train takes a mezo.Config, not dict"):
        mezo.train(dataclasses.asdict(cfg))
