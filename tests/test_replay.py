"""--replay: a run's tensors rebuilt from its start and its log alone, against the checkpoints the run itself wrote,
bit for bit; and the logs that cannot rebuild it (truncated, edited, another run's settings) refused in one line."""
import json
import re
import shutil

import pytest
import torch
from conftest import expect_error, run, tiny_args
from safetensors.torch import load_file

from mezo import checkpoints


def _tensors(folder):
    return load_file(folder / checkpoints.CHECKPOINT)


@pytest.mark.parametrize("extra", [[], ["--n-samples", "2", "--weight-decay", "0.1"],
                                   ["--mode", "full", "--dtype", "bfloat16"], ["--mode", "full", "--fast"]])
def test_replay_equals_the_runs_checkpoints_bit_for_bit(model_dir, tmp_path, capsys, extra):
    """A 20-step run (its checkpoint at 20) and the same run stopped at 10 (its checkpoint at 10); the 20-step run's
    log replayed to step 10 and to step 20 gives each checkpoint exactly, and its adapter too."""
    long, short = tmp_path / "long", tmp_path / "short"
    assert run(tiny_args(model_dir, long, steps=20, eval_every=10) + extra, capsys)[0] == 0
    assert run(tiny_args(model_dir, short, steps=10, eval_every=10) + extra, capsys)[0] == 0
    for steps, want in ((10, short), (20, long)):
        out = tmp_path / f"replay{steps}"
        code, printed, err = run(["--replay", long, "--out", out, "--steps", steps], capsys)
        assert code == 0, err
        a, b = _tensors(want), _tensors(out)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), steps
        assert "accuracy" not in printed.split("mezo: done")[0].split("training")[1]  # no forward, no evaluation
        assert re.search(r"^mezo: done in \d+ s$", printed, re.M), printed  # and no "; " before nothing
        # what it did: the run's own checkpoint is at step 20 only
        said = f"mezo: step {steps}'s tensors rebuilt from {long}'s log, no forward run"
        assert printed.splitlines()[-1] == said + (", equal bit for bit to the run's checkpoint" if steps == 20
                                                   else "") + f": {out}", printed
    if "--mode" not in extra:
        adapter = lambda f: load_file(f / "adapter" / "adapter_model.safetensors")
        assert all(torch.equal(adapter(long)[k], adapter(tmp_path / "replay20")[k]) for k in adapter(long))


def test_a_truncated_or_edited_log_is_refused_in_one_line(model_dir, tmp_path, capsys):
    source = tmp_path / "run"
    assert run(tiny_args(model_dir, source, steps=8, eval_every=4), capsys)[0] == 0
    lines = (source / "log.jsonl").read_text().splitlines()
    # truncated: the records of steps 6.. are gone
    cut = tmp_path / "cut"
    shutil.copytree(source, cut)
    (cut / "log.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x)["step"] <= 5))
    expect_error(capsys, ["--replay", cut, "--out", tmp_path / "a"], r"log.jsonl has no record of step 6 .*--steps 5")
    # edited: one step's L+ changed, so its own replay gives another projected gradient
    edited = tmp_path / "edited"
    shutil.copytree(source, edited)
    records = [json.loads(x) for x in lines]
    step3 = next(r for r in records if r.get("step") == 3 and "seed" in r)
    step3["loss_plus"] += 1e-3
    (edited / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    expect_error(capsys, ["--replay", edited, "--out", tmp_path / "b"],
                 r"step 3's record does not match its own replay")
    # edited consistently (L+ and its projected gradient): only the run's own checkpoint can tell, and it does
    step3["projected_grad"] = (step3["loss_plus"] - step3["loss_minus"]) / (2 * 1e-3)
    step3["loss"] = (step3["loss_plus"] + step3["loss_minus"]) / 2
    (edited / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    expect_error(capsys, ["--replay", edited, "--out", tmp_path / "c"],
                 r"differ from the run's own checkpoint at step 8")
    # the run's own folder as --out, another run's settings, a first-order run
    expect_error(capsys, ["--replay", source, "--out", source], r"needs --out NEW_DIR, another folder")
    expect_error(capsys, ["--replay", source, "--out", tmp_path / "d", "--lr", "0.5"],
                 r"the run was trained with --lr 0.01; replay it with the same lr \(drop --lr 0.5\)")
    adam = tmp_path / "adam"
    assert run(tiny_args(model_dir, adam, steps=2, optimizer="adam"), capsys)[0] == 0
    expect_error(capsys, ["--replay", adam, "--out", tmp_path / "e"], r"only MeZO runs replay")


def test_a_replayed_folder_resumes_as_a_run(model_dir, tmp_path, capsys):
    """The replay's folder is a run folder: --resume continues it as the original run would have gone on."""
    straight, source, replayed = tmp_path / "straight", tmp_path / "source", tmp_path / "replayed"
    assert run(tiny_args(model_dir, straight, steps=6), capsys)[0] == 0
    assert run(tiny_args(model_dir, source, steps=3), capsys)[0] == 0
    assert run(["--replay", source, "--out", replayed], capsys)[0] == 0
    assert run(["--resume", replayed, "--steps", 6], capsys)[0] == 0
    a, b = _tensors(straight), _tensors(replayed)
    assert all(torch.equal(a[k], b[k]) for k in a)
