"""Issue 22, the run folder: what a user or the machine does to a run ends either as the user expects or in one line
`mezo: error: ...` that leaves the folder byte for byte as it was. Resume never relabels, replay takes no flag that
changes an update, a non-finite loss keeps the exact tensors of the last good step, one writer per folder, and a
full or read-only disk keeps the last checkpoint whole."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import expect_error, fill_disk, run
from mezo.errors import Stopped, UsageError
from safetensors import safe_open
from safetensors.torch import load_file

from mezo import checkpoints, runs

ROOT = Path(__file__).resolve().parents[1]


def P(model_dir, **kw):
    """The issue's $P: --task synthetic --model TINY --threads 1 --eval-max 8 --eval-max-start 8 (and --device cpu)."""
    args = dict(task="synthetic", model=model_dir("llama"), threads=1, eval_max=8, eval_max_start=8, device="cpu")
    args.update(kw)
    return [str(x) for k, v in args.items() for x in (f"--{k.replace('_', '-')}", v)]


def snapshot(folder):
    """Every file under folder with its bytes (nothing may change when a command is refused)."""
    folder = Path(folder)
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def step_of(folder):
    with safe_open(str(Path(folder) / checkpoints.CHECKPOINT), "pt") as f:
        return int(f.metadata()["step"])


def test_1_a_resume_to_fewer_steps_is_refused_and_a_finished_one_changes_nothing(model_dir, tmp_path, capsys):
    a = tmp_path / "A"
    assert run(P(model_dir, steps=4, eval_every=2, out=a), capsys)[0] == 0
    before = snapshot(a)
    expect_error(capsys, ["--resume", a, "--steps", 2], r"--resume .*A --steps 2: the run is at step 4 already .*"
                 r"give --steps 4 or more .*--replay .*A --out NEW_DIR --steps 2")
    assert snapshot(a) == before
    code, out, _ = run(["--resume", a, "--steps", 4], capsys)  # a rerun of a finished resume: nothing to do
    assert code == 0 and "at step 4 already: nothing to run" in out
    assert snapshot(a) == before  # summary.json keeps its evaluations


def test_2_a_non_finite_loss_keeps_the_exact_last_good_step_and_resume_gets_past_it(model_dir, tmp_path, capsys):
    """The issue's float16 run: θ_2 is rebuilt bit for bit (equal to a run stopped at step 2), and --resume with a
    lower --lr goes past the step that overflowed."""
    n, two = tmp_path / "N", tmp_path / "two"
    flags = dict(dtype="float16", mode="full", lr=1, eval_every=0)
    line = expect_error(capsys, P(model_dir, steps=30, out=n, **flags),
                        r"non-finite loss at step 4 .*kept step 2's exact tensors, the last whose forwards were "
                        r"finite, in .*N\. --resume .*N --steps 30 with a lower --lr", code=1)
    assert step_of(n) == 2 and not any(p.name.startswith(".") and p.is_dir() for p in n.iterdir()), line
    assert run(P(model_dir, steps=2, out=two, **flags), capsys)[0] == 0
    a, b = load_file(n / checkpoints.CHECKPOINT), load_file(two / checkpoints.CHECKPOINT)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    code, out, err = run(["--resume", n, "--steps", 8, "--lr", "1e-3"], capsys)
    assert code == 0 and "at step 2" in out, err[-2000:]
    assert step_of(n) == 8


def test_2_lora_at_lr_1e30_keeps_no_absurd_good_checkpoint(model_dir, tmp_path, capsys):
    n = tmp_path / "N"
    line = expect_error(capsys, P(model_dir, steps=10, lr=1e30, eval_every=0, out=n), r"non-finite loss at step",
                        code=1)
    if "kept step" in line:  # the kept step is one whose forwards were finite: its values are the start's scale
        saved = load_file(n / checkpoints.CHECKPOINT)
        assert all(t.abs().max() < 100 for t in saved.values()), line
    else:
        assert "no good step to keep" in line and "--lr" not in line


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_2_no_finite_first_step_names_a_fix_the_run_does_not_already_have(model_dir, tmp_path, capsys, dtype):
    """An ε so large the very first forwards overflow: a float32 run is not told to try float32."""
    line = expect_error(capsys, P(model_dir, steps=2, eps=1e308, dtype=dtype, out=tmp_path / "N"),
                        r"no good step to keep", code=1)
    assert ("try float32" in line) == (dtype != "float32") and "smaller --eps" in line, line


def test_3_replay_refuses_flags_that_change_the_update_and_leaves_out_as_it_was(model_dir, tmp_path, capsys):
    a, b = tmp_path / "A", tmp_path / "B"
    assert run(P(model_dir, steps=4, eval_every=0, rule="adam", out=a), capsys)[0] == 0
    before = snapshot(a)
    for flags, what in ((["--rule", "sgd"], r"--rule adam; replay it with the same rule \(drop --rule sgd\)"),
                        (["--weight-decay", "0.5"], r"--weight-decay 0.0; replay it .*drop --weight-decay 0.5"),
                        (["--n-samples", "5"], r"--n-samples 1; replay it .*drop --n-samples 5"),
                        (["--eps", "0.01"], r"--eps 0.001; replay it")):
        expect_error(capsys, ["--replay", a, "--out", b] + flags, r"--replay .*A: the run was trained with " + what)
        assert not b.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["A"]
    b.mkdir()
    (b / "notes.txt").write_text("mine")  # a folder without a run: a refused replay leaves it as it was
    expect_error(capsys, ["--replay", a, "--out", b, "--rule", "sgd"], r"the same rule")
    assert snapshot(b) == {"notes.txt": b"mine"}
    # --resume with --replay had run, written B's summary and a .lock, no checkpoint, and said the tensors were rebuilt
    expect_error(capsys, ["--resume", a, "--replay", a, "--out", b],
                 r"^mezo: error: --resume goes on with a run and --replay rebuilds one: drop one of them$")
    assert snapshot(b) == {"notes.txt": b"mine"}
    assert snapshot(a) == before


def test_3_resume_with_overwrite_is_refused_before_the_model_loads(model_dir, tmp_path, capsys):
    """Said at once, not after the model (minutes for a large one) has loaded: here the run's model is gone, and
    the line is still the one about the flags, and the run is left as it was."""
    model = shutil.copytree(model_dir("llama"), tmp_path / "model")
    assert run(P(lambda _: model, steps=1, eval_every=0, out=tmp_path / "A"), capsys)[0] == 0
    shutil.rmtree(model)
    before = snapshot(tmp_path / "A")
    expect_error(capsys, ["--resume", tmp_path / "A", "--overwrite", "--steps", 2],
                 r"^mezo: error: --overwrite starts a run afresh and --resume goes on with one: drop one of them$")
    assert snapshot(tmp_path / "A") == before


def test_4_overwrite_removes_only_what_a_run_wrote_not_a_users_file_of_the_same_name(model_dir, tmp_path, capsys):
    """A folder holding a user's summary.json (or log.jsonl, run.json, checkpoint.safetensors) was "a run", and the
    --overwrite its refusal advised deleted the user's file. Files of those names that no run wrote are no run: a fresh
    run, its --overwrite and a replay into it are refused, and the folder stays as it was."""
    a, mine = tmp_path / "A", tmp_path / "mine"
    assert run(P(model_dir, steps=1, eval_every=0, out=a), capsys)[0] == 0
    mine.mkdir()
    (mine / "summary.json").write_text('{"my": "notes"}')
    (mine / "log.jsonl").write_text("day 1: started\n")
    (mine / "run.json").write_text("[1, 2]")
    before = snapshot(mine)
    for argv in (P(model_dir, steps=1, out=mine), P(model_dir, steps=1, out=mine, overwrite=""),
                 ["--replay", a, "--out", mine, "--overwrite"]):
        expect_error(capsys, [x for x in argv if x], r"--out .*mine holds log.jsonl, summary.json, run.json, not "
                     r"written by a mezo run: move it, or pick another folder \(nothing was changed\)")
        assert snapshot(mine) == before


def test_4_a_replay_into_a_run_and_a_fresh_run_over_a_run_are_refused(model_dir, tmp_path, capsys):
    a, c = tmp_path / "A", tmp_path / "C"
    assert run(P(model_dir, steps=2, eval_every=0, out=a), capsys)[0] == 0
    assert run(P(model_dir, steps=3, eval_every=0, out=c), capsys)[0] == 0
    before, theirs = snapshot(a), snapshot(c)
    expect_error(capsys, ["--replay", a, "--out", c], r"--out .*C already holds a run .*--overwrite")
    expect_error(capsys, P(model_dir, steps=2, out=c), r"--out .*C already holds a run \(checkpoint.safetensors, "
                 r"log.jsonl, summary.json, adapter, run.json\): --resume .*C to go on with it, --overwrite to replace it")
    assert snapshot(a) == before and snapshot(c) == theirs
    assert run(["--replay", a, "--out", c, "--overwrite"], capsys)[0] == 0  # explicit: replaced
    assert step_of(c) == 2 and not (tmp_path / ".C.replay").exists() and not list(tmp_path.glob(".C.old*"))


@pytest.mark.parametrize("theirs", ["thesis.txt", ".git/HEAD", "checkpoint.safetensors+notes.md",
                                    "adapter/adapter_config.json+adapter/README.md"])
def test_4_a_replay_never_removes_files_that_are_not_a_runs(model_dir, tmp_path, capsys, theirs):
    """A replay's result replaces its --out whole: into a folder that holds anything else (a user's file, a .git,
    beside a run's files, in its adapter/ as PEFT's save_pretrained writes a README.md) it is refused, --overwrite or
    not, and every file stays."""
    a, c = tmp_path / "A", tmp_path / "C"
    assert run(P(model_dir, steps=2, eval_every=0, out=a), capsys)[0] == 0
    for name in theirs.split("+"):
        (c / name).parent.mkdir(parents=True, exist_ok=True)
        (c / name).write_text("the user's own")
    before = snapshot(c)
    last = theirs.split("+")[-1]
    foreign = last if last.startswith("adapter/") else last.split("/")[0]
    for flags in ([], ["--overwrite"]):
        expect_error(capsys, ["--replay", a, "--out", c, *flags],
                     rf"--replay … --out .*C holds files that are not a run's \({re.escape(foreign)}\); a replay "
                     r"replaces the whole folder: give it a new or empty one \(nothing was changed\)")
        assert snapshot(c) == before


def _cli(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(ROOT / "mezo.py"), *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_4_one_writer_per_folder_a_stale_lock_does_not_block_and_kill_9_resumes_bit_for_bit(model_dir, tmp_path):
    """Two real processes on one --out: the second (and a --resume) is refused naming the first's PID. Then kill -9
    of the first (a --rule adam --save-every 2 run): its lock goes with it, --resume finishes it, equal to an unbroken
    run."""
    w, straight = tmp_path / "W", tmp_path / "straight"
    # More steps than the first run can make while the second starts (a loaded machine once let 400 finish
    # first, and the second then met a finished run); it is killed long before the end.
    flags = dict(steps=1_000_000, eval_every=0, rule="adam", save_every=2)
    first = _cli(P(model_dir, out=w, **flags))
    deadline = time.time() + 300
    while time.time() < deadline and not ((w / checkpoints.CHECKPOINT).exists() and step_of(w) >= 2):
        time.sleep(0.2)
    assert first.poll() is None, first.communicate()
    second = _cli(P(model_dir, out=w, **flags))
    _, err = second.communicate(timeout=300)
    lines = [x for x in err.splitlines() if x.startswith("mezo: error:")]
    assert second.returncode == 2 and len(lines) == 1, err[-2000:]
    assert f"another run (PID {first.pid}) is writing this folder" in lines[0]
    # a --resume of it meanwhile: the same refusal, told to wait and resume, not to pick another --out
    _, err = _cli(["--resume", str(w), "--steps", "1000000"]).communicate(timeout=300)
    lines = [x for x in err.splitlines() if x.startswith("mezo: error:")]
    assert len(lines) == 1 and lines[0].endswith(f"(PID {first.pid}) is writing this folder; wait for it to "
                                                 "end, then --resume it"), err[-2000:]
    first.send_signal(signal.SIGKILL)
    first.wait()
    stopped = step_of(w)
    resumed = _cli(["--resume", str(w), "--steps", str(stopped + 4)])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    straight_run = _cli(P(model_dir, out=straight, **dict(flags, steps=stopped + 4)))
    _, err = straight_run.communicate(timeout=300)
    assert straight_run.returncode == 0, err[-2000:]
    a, b = load_file(w / checkpoints.CHECKPOINT), load_file(straight / checkpoints.CHECKPOINT)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the Adam buffers included


def test_4_kill_9_between_checkpoints_rebuilds_the_logged_steps_from_the_log_bit_for_bit(model_dir, tmp_path):
    """kill -9 with steps logged past the checkpoint (none is due before the end): --resume rebuilds them from their
    logged losses, without their forwards, and ends with the tensors and pass counts of an unbroken run. A resume
    with another --lr runs them again: the logged losses are not that run's."""
    w, straight, other = tmp_path / "W", tmp_path / "straight", tmp_path / "other"
    flags = dict(eval_every=0, lr="1e-2")
    first = _cli(P(model_dir, out=w, steps=4, **flags))
    assert first.wait(timeout=300) == 0 and step_of(w) == 4
    longer = _cli(["--resume", str(w), "--steps", "1000000"])
    log, deadline = w / "log.jsonl", time.time() + 300
    while time.time() < deadline and '"step": 12,' not in log.read_text():
        time.sleep(0.1)
    longer.send_signal(signal.SIGKILL)
    longer.wait()
    logged = [json.loads(x)["step"] for x in log.read_text().splitlines() if x.endswith("}")]
    assert step_of(w) == 4 and logged[-1] >= 12
    shutil.copytree(w, other)
    last = logged[-1]
    resumed = _cli(["--resume", str(w), "--steps", str(last + 3)])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert f"mezo: steps 5-{last} rebuilt from {w}/log.jsonl (their logged losses: no forward)" in out, out
    assert "median" in out and f"{3} steps, median" in out  # only the steps that ran forwards are timed
    unbroken = _cli(P(model_dir, out=straight, steps=last + 3, **flags))
    assert unbroken.wait(timeout=300) == 0
    a, b = load_file(w / checkpoints.CHECKPOINT), load_file(straight / checkpoints.CHECKPOINT)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summary = lambda folder: json.loads((folder / "summary.json").read_text())
    assert summary(w)["forwards"] == summary(straight)["forwards"] == 2 * (last + 3)
    steps = lambda folder: [(r["step"], r["forwards"]) for r in map(json.loads, (folder / "log.jsonl").read_text()
                                                                     .splitlines()) if "forwards" in r]
    assert steps(w) == steps(straight) == [(t, 2 * t) for t in range(1, last + 4)]  # each once, its counts
    again = _cli(["--resume", str(other), "--steps", str(last + 3), "--lr", "5e-3"])
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0 and "rebuilt" not in out, err[-2000:]
    assert [r["lr"] for r in map(json.loads, (other / "log.jsonl").read_text().splitlines())
            if "lr" in r][4:] == [5e-3] * (last - 1)


def test_4_kill_9_before_the_first_checkpoint_resumes_from_the_start_and_the_log(model_dir, tmp_path, capsys):
    """kill -9 before any checkpoint (--eval-every 0): the run's config (run.json) and log are all there is, and
    --resume rebuilds its logged steps from the model and the run seed, bit for bit an unbroken run. A damaged
    run.json is one line that changes nothing."""
    w, straight = tmp_path / "W", tmp_path / "straight"
    flags = dict(eval_every=0, lr="1e-2", rule="momentum", n_samples=2)
    first = _cli(P(model_dir, out=w, steps=1_000_000, **flags))
    log, deadline = w / "log.jsonl", time.time() + 300
    while time.time() < deadline and not (log.exists() and '"step": 6,' in log.read_text()):
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not (w / checkpoints.CHECKPOINT).exists() and json.loads((w / "run.json").read_text())["rule"] == "momentum"
    last = [json.loads(x)["step"] for x in log.read_text().splitlines() if x.endswith("}")][-1]
    good = (w / "run.json").read_bytes()
    (w / "run.json").write_text('{"task": ')
    before = snapshot(w)
    expect_error(capsys, ["--resume", w, "--steps", last + 2], r"--resume .*W: run.json is damaged .*--overwrite")
    assert snapshot(w) == before
    # a run.json without its task (or model, seed, ...) had resumed as the defaults' run: SST-2 on SmolLM2
    for edited in ({k: v for k, v in json.loads(good).items() if k != "task"}, {}):
        (w / "run.json").write_text(json.dumps(edited))
        before = snapshot(w)
        expect_error(capsys, ["--resume", w, "--steps", last + 2],
                     r"--resume .*W: run.json is damaged \(it lacks task.*\); --overwrite")
        assert snapshot(w) == before
    # a value no run writes was told as a flag the user had not given ("--lr takes a number")
    for key, value, why in (("lr", "abc", "lr takes a number, got 'abc'"), ("mode", "banana", "unknown mode 'banana'"),
                            ("steps", -3, "steps -3 is out of range")):
        (w / "run.json").write_text(json.dumps(json.loads(good) | {key: value}))
        before = snapshot(w)
        expect_error(capsys, ["--resume", w, "--steps", last + 2],
                     rf"^mezo: error: --resume .*W: run.json is damaged \({why}.*\); --overwrite")
        assert snapshot(w) == before
    (w / "run.json").write_bytes(good)
    # to fewer steps than the log holds: refused (the resume would drop them), as past a checkpoint
    expect_error(capsys, ["--resume", w, "--steps", last - 1], rf"--resume .*W --steps {last - 1}: its log holds "
                 rf"steps up to {last}, .*give --steps {last} or more .*--replay .*W --out NEW_DIR --steps {last - 1}")
    assert snapshot(w) == before | {"run.json": good}
    resumed = _cli(["--resume", str(w), "--steps", str(last + 2)])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert "at step 0 (it stopped before its first checkpoint)" in out and f"steps 1-{last} rebuilt" in out, out
    unbroken = _cli(P(model_dir, out=straight, steps=last + 2, **flags))
    assert unbroken.wait(timeout=300) == 0
    a, b = load_file(w / checkpoints.CHECKPOINT), load_file(straight / checkpoints.CHECKPOINT)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the momentum buffers included
    records = lambda folder: [json.loads(x) for x in (folder / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("split")) for r in records(w)] == [(r["step"], r.get("split")) for r in records(straight)]


def test_4_a_run_folder_without_its_checkpoint_is_rebuilt_through_its_logged_evaluations(model_dir, tmp_path, capsys):
    """A run's folder as a clone of the repository holds it (results.py's runs/results keeps run.json, log.jsonl,
    summary.json and timing.json, not the tensors): --resume rebuilds every logged step, evaluations included,
    which it keeps from the log rather than running again (the whole test set at an earlier stop's last step
    too), and ends equal to a run that kept its checkpoints: tensors, log and pass counts. A step whose
    evaluation the log does not hold whole runs again, with its forwards."""
    kept, bare, cut = tmp_path / "kept", tmp_path / "bare", tmp_path / "cut"
    flags = dict(eval_every=2, lr="1e-2", eval_max=4)
    for steps in (4, 6):  # two stops, as results.py makes them: the first one's last evaluation is the whole test set
        argv = P(model_dir, out=kept, steps=steps, **flags) if steps == 4 else ["--resume", kept, "--steps", steps]
        assert run(argv, capsys)[0] == 0
    shutil.copytree(kept, bare)
    for name in (checkpoints.CHECKPOINT, "adapter"):
        shutil.rmtree(bare / name) if (bare / name).is_dir() else (bare / name).unlink(missing_ok=True)
    shutil.copytree(bare, cut)
    assert run(["--resume", kept, "--steps", 8], capsys)[0] == 0
    code, out, _ = run(["--resume", bare, "--steps", 8], capsys)
    assert code == 0 and f"steps 1-6 rebuilt from {bare}/log.jsonl" in out, out
    assert "2 steps, median" in out and "step      2 | dev" not in out  # steps 7 and 8 ran; no evaluation rerun
    a, b = load_file(kept / checkpoints.CHECKPOINT), load_file(bare / checkpoints.CHECKPOINT)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = lambda folder: [json.loads(x) for x in (folder / "log.jsonl").read_text().splitlines()]
    n = {r["step"]: r["n"] for r in records(kept) if r.get("split") == "test"}
    assert n[2] == 4 < n[4] == n[6] == n[8]  # steps 4 and 6 ended a stop: the whole test set
    assert records(bare) == records(kept)  # the same records, the evaluations' accuracies included
    assert json.loads((bare / "summary.json").read_text())["forwards"] == 16
    # step 6's test evaluation lost (a kill during it): steps 1-5 are rebuilt, step 6 runs again and evaluates
    lines = (cut / "log.jsonl").read_text().splitlines()
    (cut / "log.jsonl").write_text("".join(x + "\n" for x in lines if not ('"step": 6,' in x and '"test"' in x)))
    code, out, _ = run(["--resume", cut, "--steps", 8], capsys)
    assert code == 0 and "steps 1-5 rebuilt" in out and "step      6 | test" in out, out
    assert [(r["step"], r.get("split")) for r in records(cut)] == [(r["step"], r.get("split")) for r in records(kept)]
    assert torch.equal(load_file(cut / checkpoints.CHECKPOINT)[next(iter(a))], a[next(iter(a))])


def test_5_a_pipe_whose_reader_leaves_stops_the_run_in_one_line_and_it_resumes(model_dir, tmp_path):
    """`python mezo.py ... | head`: when stdout's reader leaves, the run stops with one `mezo: error:` line (no
    traceback, none at exit either) that says how to go on: the same command (or --overwrite) before the first checkpoint, --resume after
    it, and that command goes on."""
    said = "mezo: error: stdout was closed (its reader left, as `| head` does): the run stopped"
    w = tmp_path / "W"
    for wait_for_checkpoint in (False, True):
        flags = ["--overwrite"] if wait_for_checkpoint else []
        piped = _cli([*P(model_dir, out=w, steps=1_000_000, eval_every=2), *flags])
        assert piped.stdout.readline().startswith("mezo: ")  # stdout is a pipe: block-buffered, read when flushed
        deadline = time.time() + 300
        while wait_for_checkpoint and time.time() < deadline and not (w / checkpoints.CHECKPOINT).exists():
            time.sleep(0.2)  # (meanwhile the child may block on a full pipe: that is no error)
        piped.stdout.close()  # the reader leaves
        err = piped.stderr.read()
        assert piped.wait(timeout=300) == 1, err[-2000:]
        lines = [x for x in err.splitlines() if "error" in x.lower() or "Traceback" in x or "Exception" in x]
        if (w / checkpoints.CHECKPOINT).exists():
            assert lines == [f"{said}; --resume {w} goes on from its last checkpoint"], err[-2000:]
        elif (w / checkpoints.RUN_CONFIG).exists():  # the first pass, the reader gone before step 2's checkpoint
            assert lines == [f"{said} before its first checkpoint; --resume {w} goes on"], err[-2000:]
        else:  # (gone before the run started: nothing to go on with; with a log and no run.json, --overwrite)
            assert lines in ([f"{said} before it wrote anything; the same command starts it"],
                             [f"{said} before its first checkpoint; --overwrite starts it again"]), err[-2000:]
    stopped = step_of(w)
    resumed = _cli(["--resume", str(w), "--steps", str(stopped + 2)])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and step_of(w) == stopped + 2, err[-2000:]


@pytest.mark.parametrize("sig, name, code", [(signal.SIGINT, "Ctrl-C", 130), (signal.SIGTERM, "SIGTERM", 143),
                                             (signal.SIGHUP, "SIGHUP", 129)])
def test_5_ctrl_c_sigterm_or_sighup_checkpoints_the_step_under_way_and_it_resumes_bit_for_bit(model_dir, tmp_path,
                                                                                              sig, name, code):
    """SIGINT (Ctrl-C), SIGTERM (a scheduler's preemption) or SIGHUP (the terminal closed) mid-run, with no checkpoint due (--eval-every 0, no
    --save-every): the step under way finishes and is checkpointed, so no step is lost; exit 128 + the signal with one
    `mezo: error:` line that names the step and the --resume, no traceback, no temporary file and no lock held; the
    resumed run ends with the tensors of an unbroken one."""
    w, straight = tmp_path / "W", tmp_path / "straight"
    flags = dict(steps=1_000_000, eval_every=0)
    # as a terminal starts it: a shell's background job (nohup ... &, as CI may run the tests) inherits SIGINT and
    # SIGHUP ignored, and the run then leaves them ignored
    run_ = _cli(P(model_dir, out=w, **flags), preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL)
                                                                  for s in (signal.SIGINT, signal.SIGHUP)])
    log, deadline = w / "log.jsonl", time.time() + 300
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    assert not (w / checkpoints.CHECKPOINT).exists()  # none was due
    run_.send_signal(sig)
    _, err = run_.communicate(timeout=300)
    lines = [x for x in err.splitlines() if "error" in x.lower() or "Traceback" in x or "Interrupt" in x]
    assert run_.returncode == code, err[-2000:]
    said = re.fullmatch(rf"mezo: error: stopped by {name} after step (\d+), its checkpoint written: --resume "
                        rf"{re.escape(str(w))} goes on from there", lines[0]) if len(lines) == 1 else None
    assert said and f"mezo: {name}: stopping after this step" in err, err[-2000:]
    stopped = int(said[1])
    assert step_of(w) == stopped >= 1 and json.loads(log.read_text().splitlines()[-1])["step"] == stopped
    assert not [p for p in w.rglob(".*tmp*")]  # (and the lock went with the process: the resume takes it)
    resumed = _cli(["--resume", str(w), "--steps", str(stopped + 2)])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and step_of(w) == stopped + 2, err[-2000:]
    unbroken = _cli(P(model_dir, out=straight, **dict(flags, steps=stopped + 2)))
    _, err = unbroken.communicate(timeout=300)
    assert unbroken.returncode == 0, err[-2000:]
    a, b = load_file(w / checkpoints.CHECKPOINT), load_file(straight / checkpoints.CHECKPOINT)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_5_a_closed_terminal_stops_the_run_at_a_checkpointed_step(model_dir, tmp_path):
    """The run's terminal is a real pseudo-terminal, its controlling one (as a shell in a window or an ssh session
    starts it). Closing it hangs it up: the kernel sends SIGHUP, and every later write to the terminal fails (EIO),
    which had ended the run at its next progress bar, mid-step, with no checkpoint. Now the run goes on writing to
    /dev/null, finishes the step under way, checkpoints it, and exits 129; the checkpoint's step is the log's last."""
    import fcntl
    import pty
    import select
    import termios

    w = tmp_path / "W"
    master, slave = pty.openpty()

    def own_terminal():  # (and SIGHUP as a terminal's shell leaves it: a nohup'ed test run ignores it)
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run_ = subprocess.Popen([sys.executable, str(ROOT / "mezo.py"), *P(model_dir, out=w, steps=1_000_000, eval_every=0)],
                            cwd=ROOT, env=env, stdin=slave, stdout=slave, stderr=slave, preexec_fn=own_terminal)
    os.close(slave)
    log, deadline, shown = w / "log.jsonl", time.time() + 300, b""
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 4):
        if select.select([master], [], [], 0.2)[0]:
            shown += os.read(master, 1 << 16)  # (a terminal that is not read fills, and blocks the run)
    os.close(master)
    assert run_.wait(timeout=300) == 129, shown.decode(errors="replace")[-2000:]
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines() if "projected_grad" in line]
    assert step_of(w) == steps[-1] >= 3
    assert not [p for p in w.rglob(".*tmp*")]


def test_5_a_second_signal_stops_at_once_and_an_ignored_one_stays_ignored():
    """runs.StopOnSignal with real signals to this process: the first only asks (the step under way goes on), the
    second raises errors.Stopped at once; SIGINT ignored before (a nohup job) is not taken over; restore puts back
    the handlers there were."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN), signal.getsignal(signal.SIGTERM)
    try:
        stop = runs.StopOnSignal()
        stop.install()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.SIGINT not in stop.previous
        assert signal.getsignal(signal.SIGTERM) == stop._asked  # (else the signal below would end pytest)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal == "SIGTERM" and stop.code == 143  # asked: nothing raised
        with pytest.raises(Stopped) as e:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # (the handler runs at the next bytecode of the main thread)
        assert e.value.step is None and e.value.code == 143
        stop.restore()
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == (signal.SIG_IGN, before[1])
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


def test_5_ctrl_c_while_a_file_is_written_leaves_the_old_file_whole_and_no_temporary_one(tmp_path):
    target = tmp_path / "checkpoint.safetensors"
    target.write_text("the last good one")

    def interrupted(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        checkpoints.atomic_write(target, interrupted)
    assert [p.name for p in tmp_path.iterdir()] == [target.name] and target.read_text() == "the last good one"


def test_6_a_full_disk_or_a_read_only_folder_is_one_line_and_the_checkpoint_stays_whole(model_dir, tmpfs, capsys):
    a = tmpfs / "A"
    assert run(P(model_dir, steps=2, eval_every=0, mode="full", out=a), capsys)[0] == 0
    checkpoint = (a / checkpoints.CHECKPOINT).read_bytes()
    filler = fill_disk(tmpfs)
    line = expect_error(capsys, ["--resume", a, "--steps", 4], r"cannot write .* \(No space left on device\)")
    assert "--resume" in line and "free some space" in line
    assert (a / checkpoints.CHECKPOINT).read_bytes() == checkpoint
    assert not [p for p in a.rglob(".*tmp*")]  # no half-written temporary file left behind
    filler.unlink()
    before = snapshot(a)
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    expect_error(capsys, ["--resume", a, "--steps", 4], r"--out .*A: cannot write there \(Read-only file system\)")
    expect_error(capsys, P(model_dir, steps=2, out=a / "new"), r"--out .*new: cannot create it \(Read-only")
    assert snapshot(a) == before
    subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
    assert run(["--resume", a, "--steps", 4], capsys)[0] == 0  # space again: the run goes on


def test_6_a_file_written_over_a_folder_or_into_a_missing_one_names_that_fix(tmp_path):
    """results.py --output a folder, or a path whose folder does not exist: the line says what to change."""
    (tmp_path / "R.md").mkdir()
    (tmp_path / "R.md" / "kept").write_text("x")
    write = lambda tmp: tmp.write_text("new")
    with pytest.raises(UsageError, match=r"\(Is a directory\); .*: move that folder or pick another path"):
        checkpoints.atomic_write(tmp_path / "R.md", write, then="run it again")
    with pytest.raises(UsageError, match=rf"\(No such file or directory\); .*: create {tmp_path}/no/such, then"):
        checkpoints.atomic_write(tmp_path / "no" / "such" / "R.md", write, then="run it again")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["R.md", "kept"]  # nothing left behind


def test_7_replay_of_a_missing_folder_says_replay(tmp_path, capsys):
    expect_error(capsys, ["--replay", tmp_path / "nonexistent", "--out", tmp_path / "b"],
                 r"^mezo: error: --replay .*nonexistent: no such folder; point --replay at")


def test_5_a_signal_during_an_evaluation_cuts_it_short_and_the_resume_evaluates_the_step(model_dir, tmp_path, capsys):
    """SIGTERM while step 2 is evaluated, its checkpoint written first: the evaluation stops before its next forward
    (a scheduler's grace period is shorter than a whole test set on a CPU), none of it is logged, and the run stops at
    step 2. --resume evaluates step 2 first and goes on: its log and tensors are those of an unbroken run."""
    import mezo
    w, straight = tmp_path / "W", tmp_path / "straight"
    flags = dict(steps=4, eval_every=2, micro_batch=2, eval_max=16, eval_max_start=16)
    seen = []  # the forwards after the signal

    class SignalOnceCheckpointed(mezo.PromptForward):
        def __call__(self, batch):
            if seen:
                seen.append(batch)
            elif (w / checkpoints.CHECKPOINT).is_file():
                seen.append("signalled")
                os.kill(os.getpid(), signal.SIGTERM)  # (handled at the next bytecode: this forward goes on)
            return super().__call__(batch)

    cfg, _ = mezo.parse_args(P(model_dir, out=w, **flags))
    with pytest.raises(Stopped) as stopped:
        mezo.train(cfg, forward=SignalOnceCheckpointed, placement=mezo.Placement(torch.device("cpu")))
    assert stopped.value.step == 2 and seen == ["signalled"]  # no forward after the signal
    assert step_of(w) == 2
    logged = [json.loads(line) for line in (w / "log.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 2 and "projected_grad" in logged[-1]  # nothing of step 2's evaluation
    capsys.readouterr()
    code, out, err = run(["--resume", w, "--steps", 4], capsys)
    assert code == 0 and "step 2's evaluation is not in the log (a stop cut it short): it runs now" in out, err[-2000:]
    assert run(P(model_dir, out=straight, **flags), capsys)[0] == 0
    drop = lambda r: {k: v for k, v in r.items() if "time" not in k}
    read = lambda f: [drop(json.loads(line)) for line in (f / "log.jsonl").read_text().splitlines()]
    assert read(w) == read(straight) and [r["step"] for r in read(w) if r.get("split") == "test"] == [0, 2, 4]
    a, b = load_file(w / checkpoints.CHECKPOINT), load_file(straight / checkpoints.CHECKPOINT)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_5_a_signal_during_the_first_evaluation_stops_before_any_step_and_the_resume_starts_there(model_dir, tmp_path,
                                                                                                  capsys):
    """SIGTERM during step 0's evaluation (a zero-shot run's whole test set, minutes on a CPU): no checkpoint is due,
    since step 0's θ is the model's own, so the evaluation stops before its next forward, not after a whole test set
    and a first step. The run says how to go on, and --resume makes the run an unbroken one makes."""
    import mezo
    w, straight = tmp_path / "W", tmp_path / "straight"
    flags = dict(steps=2, eval_every=2, micro_batch=2, eval_max=16, eval_max_start=16)
    seen = []

    class SignalAtOnce(mezo.PromptForward):
        def __call__(self, batch):
            seen.append(batch if seen else "signalled")
            if len(seen) == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().__call__(batch)

    cfg, _ = mezo.parse_args(P(model_dir, out=w, **flags))
    with pytest.raises(Stopped) as stopped:
        mezo.train(cfg, forward=SignalAtOnce, placement=mezo.Placement(torch.device("cpu")))
    assert stopped.value.step == 0 and seen == ["signalled"]  # no forward after the signal
    assert runs.stopped(cfg, False, stopped.value) == f"stopped by SIGTERM at step 0's evaluation, before any step: --resume {w} starts there"
    assert not (w / checkpoints.CHECKPOINT).exists() and not (w / "log.jsonl").read_text()
    capsys.readouterr()
    assert run(["--resume", w], capsys)[0] == 0
    assert run(P(model_dir, out=straight, **flags), capsys)[0] == 0
    drop = lambda r: {k: v for k, v in r.items() if "time" not in k}
    read = lambda f: [drop(json.loads(line)) for line in (f / "log.jsonl").read_text().splitlines()]
    assert read(w) == read(straight) and [r["step"] for r in read(w) if r.get("split") == "test"] == [0, 2]
    a, b = load_file(w / checkpoints.CHECKPOINT), load_file(straight / checkpoints.CHECKPOINT)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_5_ctrl_c_before_anything_is_written_says_the_same_command_starts_the_run(tmp_path):
    """Ctrl-C while the model loads (--out not made yet, or made and empty) had said "--overwrite starts it again",
    for a folder that holds nothing to overwrite; with a log and no run.json it still names --overwrite."""
    import mezo
    out = tmp_path / "new"
    cfg = mezo.Config(task="synthetic", out=str(out))
    said = runs.stopped(cfg, False, KeyboardInterrupt())
    assert said == "interrupted (Ctrl-C): the run stopped before it wrote anything; the same command starts it"
    out.mkdir()
    (out / "log.jsonl").write_text("")
    assert runs.stopped(cfg, False, KeyboardInterrupt()).endswith("before its first checkpoint; --overwrite starts it again")
