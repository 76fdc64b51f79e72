"""The first-order baseline (--optimizer adam) against a hand-written torch.optim loop, and the results table and
plots made from logs of real short runs (tiny models, real SST-2 data)."""
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import fill_disk, load_tiny, records, run, tiny_args
from mezo.tasks import prompts, synthetic
from safetensors import safe_open
from safetensors.torch import load_file

import mezo
from mezo import baseline, checkpoints, runs

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is as fast, and does not stall when other processes hold the cores. Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def synthetic_batches(tok, cfg, steps):
    data = synthetic.load_synthetic(cfg.k, cfg.data_seed)
    train = [dict(zip(("ids", "position"), prompts.encode(tok, s, cfg.template, "causal", cfg.max_length)), label=y)
             for s, _, y in data["train"]]
    return [[train[i] for i in runs.batch_indices(cfg.seed, step, len(train), cfg.batch_size)]
            for step in range(1, steps + 1)]


@pytest.mark.parametrize("mode,weight_decay", [("lora", 0.0), ("full", 0.1)])
def test_adam_step_equals_a_hand_written_torch_adam_loop(model_dir, mode, weight_decay):
    """Two models from the same folder: one stepped by baseline.adam_step, one by plain torch.optim on the same tensors
    (Adam when wd = 0; AdamW with decay on 2-D tensors only otherwise). Same batches: identical tensors."""
    kw = dict(task="synthetic", template="{sentence} It was {mask}", label_words=(" bad", " good"), k=8,
              batch_size=8, mode=mode, lr=1e-2, weight_decay=weight_decay, optimizer="adam")
    cfg, _, tok, params, forward = load_tiny(model_dir, "llama", **kw)
    _, _, _, ref_params, ref_forward = load_tiny(model_dir, "llama", **kw)
    assert [p.name for p in params] == [p.name for p in ref_params]
    if weight_decay:
        ref = torch.optim.AdamW([dict(params=[p.tensor for p in ref_params if p.tensor.dim() >= 2]),
                                 dict(params=[p.tensor for p in ref_params if p.tensor.dim() < 2], weight_decay=0.0)],
                                lr=cfg.lr, weight_decay=weight_decay)
    else:
        ref = torch.optim.Adam([p.tensor for p in ref_params], lr=cfg.lr)
    ours = baseline.adam_optimizer([(p.tensor, p.decay) for p in params], cfg.lr, cfg.weight_decay)
    for batch in synthetic_batches(tok, cfg, 2):
        loss = baseline.adam_step(ours, lambda: F.cross_entropy(*prompts.batch_logits(forward, batch, 8, 0, "cpu")))
        ref.zero_grad()
        ref_loss = F.cross_entropy(*prompts.batch_logits(ref_forward, batch, 8, 0, "cpu"))
        ref_loss.backward()
        ref.step()
        assert loss == ref_loss.item()
        for p, q in zip(params, ref_params):
            assert torch.equal(p.tensor, q.tensor), f"{p.name}: max diff {(p.tensor - q.tensor).abs().max():.3g}"
    changed = [p.name for p, q0 in zip(params, load_tiny(model_dir, "llama", **kw)[3]) if
               not torch.equal(p.tensor, q0.tensor)]
    assert changed, "the steps changed nothing"


def test_adam_lowers_the_training_loss(model_dir, tmp_path, capsys):
    code, out, err = run(tiny_args(model_dir, tmp_path, optimizer="adam", steps=24, eval_every=0, k=16), capsys)
    assert code == 0, err
    losses = [r["loss"] for r in records(tmp_path) if "loss" in r and "split" not in r]
    assert len(losses) == 24
    assert np.mean(losses[-6:]) < losses[0] - 0.1, losses


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the peak resident set is Linux's")
def test_the_cpu_peak_after_a_reset_leaves_out_the_heap_that_loading_freed():
    """Memory a process freed but glibc kept (as the offline model's conversion leaves ~200 MB) is not counted in the
    peak of the steps that follow: the reset gives it back first. In a fresh process: 4,000 tensors of 64 KiB (from
    the heap, not mmap), all freed but the last, which pins the heap's top."""
    code = ("import gc, sys, torch; sys.path.insert(0, sys.argv[1]); from mezo import runs\n"
            "def rss(): return next(int(l.split()[1]) / 1024 for l in open('/proc/self/status') if 'VmRSS' in l)\n"
            "before = rss(); ts = [torch.ones(16 * 1024) for _ in range(4000)]; keep = ts[-1]; del ts; gc.collect()\n"
            "print(before, rss(), runs.peak_memory_mb(torch.device('cpu'), reset=True))")
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parents[1])], capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    before, kept, peak = map(float, out.stdout.split())
    assert kept > before + 200, "glibc gave the freed heap back by itself: the test says nothing"
    assert peak < before + 50, (before, kept, peak)


def test_step_records_count_forward_and_backward_passes(model_dir, tmp_path, capsys):
    for name, extra, fwd, bwd in (("mezo", dict(n_samples=2), 4, 0), ("adam", dict(optimizer="adam"), 1, 1)):
        assert run(tiny_args(model_dir, tmp_path / name, **extra), capsys)[0] == 0
        steps = [r for r in records(tmp_path / name) if "split" not in r]
        assert [(r["forwards"], r["backwards"]) for r in steps] == [(fwd * s, bwd * s) for s in range(1, 7)]
        if name == "mezo":
            assert all(r["loss"] == (r["loss_plus"] + r["loss_minus"]) / 2 for r in steps)
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert (summary["forwards"], summary["backwards"], summary["optimizer"]) == (6 * fwd, 6 * bwd, name)
        assert summary["peak_memory_mb"] > 0
    # A resume with another --n-samples: the count goes on from the log, 4 forwards a step, then 2.
    assert mezo.main(["--resume", str(tmp_path / "mezo"), "--steps", "8", "--n-samples", "1",
                      "--device", "cpu"]) == 0
    steps = [r for r in records(tmp_path / "mezo") if "split" not in r]
    assert [r["forwards"] for r in steps] == [4 * s for s in range(1, 7)] + [26, 28]
    assert json.loads((tmp_path / "mezo" / "summary.json").read_text())["forwards"] == 28


def test_adam_resume_continues_the_identical_trajectory(model_dir, tmp_path, capsys):
    """6 steps straight == 3 + --resume + 3, with AdamW's moments restored from the checkpoint."""
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    assert run(tiny_args(model_dir, straight, optimizer="adam"), capsys)[0] == 0
    assert run(tiny_args(model_dir, halves, optimizer="adam", steps=3), capsys)[0] == 0
    code, out, err = run(["--resume", halves, "--steps", 6], capsys)
    assert code == 0 and "at step 3" in out, err
    strip = lambda log: [dict(r) for r in log]
    assert strip(records(halves)) == strip(records(straight))
    a, b = load_file(straight / checkpoints.CHECKPOINT), load_file(halves / checkpoints.CHECKPOINT)
    assert any(k.startswith(baseline.ADAM + "exp_avg_sq:") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The same resume with the moments dropped from the checkpoint continues differently: the check above has teeth.
    from safetensors import safe_open
    from safetensors.torch import save_file
    fresh = tmp_path / "fresh"
    assert run(tiny_args(model_dir, fresh, optimizer="adam", steps=3), capsys)[0] == 0
    with safe_open(str(fresh / checkpoints.CHECKPOINT), "pt") as f:
        meta, kept = f.metadata(), {k: f.get_tensor(k) for k in f.keys() if not k.startswith(baseline.ADAM)}
    save_file(kept, str(fresh / checkpoints.CHECKPOINT), metadata=meta)
    assert run(["--resume", fresh, "--steps", 6], capsys)[0] == 0
    assert strip(records(fresh))[:4] == strip(records(straight))[:4]  # step 0's evaluations and steps 1..3
    assert strip(records(fresh))[-1] != strip(records(straight))[-1]
    from conftest import expect_error
    expect_error(capsys, ["--resume", halves, "--optimizer", "mezo"], r"trained with --optimizer adam; resume it")


def test_adam_micro_batches_accumulate_the_batch_gradient(model_dir, tmp_path, capsys):
    """--optimizer adam --micro-batch 3 backpropagates each micro-batch before the next forward (one
    micro-batch's activations alive at a time) and sums the parts: the same steps as one batch of 8, up to
    float32 summation order."""
    for name, micro in (("whole", 8), ("parts", 3)):
        assert run(tiny_args(model_dir, tmp_path / name, optimizer="adam", micro_batch=micro, steps=4), capsys)[0] == 0
    a, b = ([r for r in records(tmp_path / name) if "split" not in r] for name in ("whole", "parts"))
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        # float32 sums of 3 + 3 + 2 examples vs one of 8: a few ulps; 1e-5 relative is ~80 ulps
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), (x, y)
    ta, tb = (load_file(tmp_path / name / checkpoints.CHECKPOINT) for name in ("whole", "parts"))
    moved = max((ta[k] - tb[k]).abs().max().item() for k in ta if not k.startswith(baseline.ADAM))
    # Adam's step lr·m̂/(√v̂+δ): ulp noise in ĝ moves θ ≪ lr = 1e-2; 1e-5 = lr/1000
    assert moved <= 1e-5, moved  # lr 1e-2 a step: a wrong scale of the parts moves tensors by ~1e-2


def test_adam_refuses_what_it_cannot_do(model_dir, tmp_path, capsys):
    from conftest import expect_error
    expect_error(capsys, tiny_args(model_dir, tmp_path, optimizer="sgd"), r"unknown --optimizer 'sgd'; choose one of "
                 "mezo, adam")
    expect_error(capsys, tiny_args(model_dir, tmp_path, optimizer="adam", objective="accuracy"),
                 r"--optimizer adam backpropagates the cross-entropy, and --objective accuracy is MeZO's: drop it$")
    # MeZO's drift-free restore and its directions per step have no meaning for a backward: refused, not ignored
    expect_error(capsys, [*tiny_args(model_dir, tmp_path, optimizer="adam", n_samples=4), "--exact-restore"],
                 r"--optimizer adam .* --exact-restore and --n-samples 4 are MeZO's: drop them$")

# -----------------------------------------------------------------------------
# experiments.py, results.py and plot.py on real short runs


def in_process(cmd, threads, stop=None):
    """A run in this process: it goes to its end (`stop` cannot interrupt it; a diverged probe is
    still found from its log afterwards)."""
    assert cmd[0] == "mezo.py"
    return mezo.main(cmd[1:])


def logged(root: Path, folder: str, seed: int, split: str, step: int) -> dict:
    """The evaluation record of a run's log at a step."""
    return next(r for r in records(root / folder / f"seed{seed}") if r.get("split") == split and r["step"] == step)


def mean_std(values) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def cells(md: str, start: str) -> list[str]:
    row = next(x for x in md.splitlines() if x.startswith(start))
    return [c.strip() for c in row.strip("|").split("|")]


@pytest.fixture(scope="module")
def study(model_dir, tmp_path_factory):
    """The whole study of experiments.py, shrunk: SST-2 (3 seeds) and RTE (2), a budget of 2 and 4 steps, two lr
    candidates, a bfloat16 run, two variant families and the full-parameter probes; real 16-shot splits and a tiny
    Llama whose vocabulary holds every task's words; every run in this process."""
    if not (SHARED / "lm-bff" / "SST-2" / "train.tsv").exists():
        pytest.skip("no ../shared/data")
    import experiments as ex
    import results
    lrs, Method = ("3e-2", "1e-2"), ex.Method
    with pytest.MonkeyPatch.context() as mp:
        for name, value in dict(
                COMMON=[*ex.COMMON, "--model", model_dir("llama+tasks"), "--max-length", "48", "--device", "cpu"],
                TASKS=("sst2", "rte"), SEEDS=(13, 21, 42), TASK_SEEDS=(13, 21), MEZO_LRS=lrs, MEZO_LOWER_LR="3e-3",
                PRECISION_LR="3e-2",
                BUDGET=(2, 4), ADAM_STEPS=4, FULL_STEPS=4,
                PRECISION=[Method("sst2/precision/bfloat16-eps3e-2", "MeZO-LoRA, bfloat16, ε 3e-2",
                                  ["--mode", "lora", "--lr", "3e-2", "--eval-every", "2", "--dtype", "bfloat16",
                                   "--eps", "3e-2"], 4, 0.0, "", seeds=(13,), stops=(2, 4))],
                VARIANT_FAMILIES={"rules/conservative": ("MeZO-LoRA, conservative", ["--rule", "conservative"], lrs,
                                                         "—"),
                                  "prefix/mezo-prefix": ("MeZO-prefix", ["--mode", "prefix", "--eps", "1e-1"], lrs,
                                                         "90.8")},
                FULL_PROBES=[Method(f"probe/mezo-full-lr{lr}", f"probe {lr}", ["--mode", "full", "--lr", lr,
                                                                              "--eval-every", "2"], 4, 0.0, "",
                                    seeds=(42,)) for lr in lrs]).items():
            mp.setattr(ex, name, value)
        root = tmp_path_factory.mktemp("results")
        for part in ("tasks", "precision", "variants", "full"):
            assert ex.run_chains(ex.chains(root, 1, part, in_process)) == 0
        yield ex, results, root


def by_hand(root: Path, task: str) -> tuple[str, list[str]]:
    """The task's lr by the rule, from the logs: the higher dev accuracy at the last stop (the smaller lr on a
    tie) among 3e-2 and 1e-2; when that is 1e-2, the grid's smallest, among 3e-2, 1e-2 and 3e-3. And the lrs
    that ran."""
    def pick(lrs):
        dev = {lr: logged(root, f"{task}/mezo-lora-lr{lr}", 13, "dev", 4)["accuracy"] for lr in lrs}
        return max(dev, key=lambda x: (dev[x], -float(x)))
    lrs = ["3e-2", "1e-2"]
    if pick(lrs) == "1e-2":
        lrs.append("3e-3")
    assert not (root / f"{task}/mezo-lora-lr3e-3").exists() or "3e-3" in lrs
    return pick(lrs), lrs


def test_a_budget_run_stops_at_each_stop_on_the_whole_test_set_and_a_rerun_runs_nothing(study, capsys):
    """Every probe runs seed 13 through the budget, whole-test evaluations at steps 2 and 4 (the stops), one
    process per stop; one lr lower when the grid's smallest wins; the kept lr alone runs seed 21 too. A second
    `run` finds every run done."""
    ex, _, root = study
    lr, ran = by_hand(root, "rte")
    assert ex.task_lr(root, "rte") == lr
    for seed in (13, 21):
        tests = [r for r in records(root / f"rte/mezo-lora-lr{lr}/seed{seed}") if r.get("split") == "test"]
        assert {r["step"]: r["n"] for r in tests if r["n"] == 277} == {2: 277, 4: 277}  # the whole RTE test set
        assert json.loads((root / f"rte/mezo-lora-lr{lr}/seed{seed}/timing.json").read_text())["processes"] == 2
    for other in set(ran) - {lr}:
        assert max(r["step"] for r in records(root / f"rte/mezo-lora-lr{other}/seed13")) == 4
        assert not (root / f"rte/mezo-lora-lr{other}/seed21").exists()
    before = {p: p.stat().st_mtime_ns for p in root.rglob("log.jsonl")}
    capsys.readouterr()
    assert ex.run_chains(ex.chains(root, 1, "tasks", in_process), jobs=2) == 0
    assert {p: p.stat().st_mtime_ns for p in root.rglob("log.jsonl")} == before  # nothing ran again
    # each task's plan is read until it stops changing: before the probes decide (sst2: zero-shot, 2 probes, 3
    # Adam; rte 1 + 2 + 2), then after (the probes that ran, the kept lr's 3 or 2 seeds, Adam), then once more,
    # the same, and not run
    probes = {task: len(by_hand(root, task)[1]) for task in ("sst2", "rte")}
    assert capsys.readouterr().out.count("done, skipped") == (6 + 7 + probes["sst2"]) + (5 + 5 + probes["rte"])


def test_the_budget_table_matches_a_hand_computation_from_the_logs(study, tmp_path):
    """Each task's row: zero-shot, MeZO-LoRA at each stop (mean ± std over seeds) at the lr whose probe had the
    higher dev accuracy (never test), Adam-LoRA, the passes of each; all from the logs by hand."""
    ex, results, root = study
    md = results.write_table(root, tmp_path / "RESULTS.md", tmp_path / "figures", ex.TASKS)
    for task, n_classes, test_n, seeds in (("sst2", 2, 872, (13, 21, 42)), ("rte", 2, 277, (13, 21))):
        lr, _ = by_hand(root, task)
        zero = logged(root, f"{task}/zero-shot", 13, "test", 0)["accuracy"]
        row = cells(md, f"| {task} | {n_classes} | {test_n} |")
        assert row[3] == f"{100 * zero:.1f} (one run)"
        for i, step in ((4, 2), (5, 4)):
            m, s = mean_std([logged(root, f"{task}/mezo-lora-lr{lr}", x, "test", step)["accuracy"] for x in seeds])
            assert row[i] == f"{100 * m:.1f} ± {100 * s:.1f} (n = {len(seeds)})", (task, step, row)
        m, s = mean_std([logged(root, f"{task}/adam-lora", x, "test", 4)["accuracy"] for x in seeds])
        assert row[6] == f"{100 * m:.1f} ± {100 * s:.1f} (n = {len(seeds)})"
        assert row[7] == lr and row[8] == "8 / 0" and row[9] == "4 / 4"  # MeZO 2 forwards a step; Adam 1 + 1
        peaks = [sorted(round(json.loads((root / task / m / f"seed{x}" / "summary.json").read_text())["peak_memory_mb"])
                        for x in seeds) for m in (f"mezo-lora-lr{lr}", "adam-lora")]
        assert row[10] == " / ".join(f"{p[0]}" if p[0] == p[-1] else f"{p[0]}–{p[-1]}" for p in peaks), row[10]
        assert f"| {task} | {lr} |" in md and "**kept**" in md
    sst2 = cells(md, "| MeZO-LoRA, 4 steps |")
    lr = ex.task_lr(root, "sst2")
    assert sst2 == ["MeZO-LoRA, 4 steps", *(f"{100 * logged(root, f'sst2/mezo-lora-lr{lr}', x, 'test', 4)['accuracy']:.1f}"
                                            for x in (13, 21, 42))]
    import matplotlib.image
    image = matplotlib.image.imread(tmp_path / "figures" / "budget.png")
    assert image.ndim == 3 and image.shape[1] > 800 and image.std() > 0
    assert "![budget](figures/budget.png)" in md


def test_the_peak_memory_cell_gives_the_spread_over_seeds_not_only_its_top():
    """MPQA's MeZO runs peaked at 1,074 and 1,414 MB: "1414" alone had read as more than Adam's 1,168."""
    import results
    assert results.peak([dict(peak_mb=1413.5), dict(peak_mb=1073.7), dict(peak_mb=None)]) == "1074–1414"
    assert results.peak([dict(peak_mb=1000.2), dict(peak_mb=999.1)]) == "999–1000"  # as numbers, not as text
    assert results.peak([dict(peak_mb=1000.4), dict(peak_mb=999.6)]) == "1000"
    assert results.peak([dict(peak_mb=None)]) == results.peak([]) == "—"


def test_the_memory_table_says_when_and_from_which_commit_bench_memory_measured_it(tmp_path):
    """bench/memory.py's JSON carries its date and commit (tests/test_benches.py); a file written before it did
    is still read, without them. Ratios are to the first row, inference."""
    import results
    rows = [dict(case="inference", peak_mb=1000.0, above_model_mb=50.0, trainable=10),
            dict(case="adam-lora", peak_mb=1380.0, above_model_mb=430.0, trainable=10)]
    head = dict(model="m", batch_size=8, device="cpu", threads=1)
    (tmp_path / "memory.json").write_text(json.dumps(dict(head, date="2026-12-07", commit="72386b6", rows=rows)))
    md = results.memory_table(tmp_path)
    assert "(`bench/memory.py`, 2026-12-07, commit 72386b6): peak" in md
    assert "| first-order step (Adam), LoRA | 10 | 1380 | 430 | 1.380 |" in md
    (tmp_path / "memory.json").write_text(json.dumps(dict(head, rows=rows)))
    assert "(`bench/memory.py`): peak" in results.memory_table(tmp_path)
    # --repeat 3: each figure the median of 3 processes, and the peaks' range beside it
    rows[1].update(peak_mb_runs=[1484.6, 1608.7, 1380.0])
    (tmp_path / "memory.json").write_text(json.dumps(dict(head, repeat=3, rows=rows)))
    md = results.memory_table(tmp_path)
    assert "(`bench/memory.py`), 3 times (the median; each process's lowest–highest peak in brackets): peak" in md
    assert "| first-order step (Adam), LoRA | 10 | 1380 (1380–1609) | 430 | 1.380 |" in md


def test_dev_still_rising_is_the_slope_of_the_second_half():
    import results
    curve = {0: 0.5, 100: 0.52, 500: 0.60, 600: 0.62, 800: 0.64, 1000: 0.66}
    # least squares over (500, .60), (600, .62), (800, .64), (1000, .66): Sxy / Sxx = 0.017 / 147,500 = 1.15e-4
    # a step, +1.15 points per 100 steps
    assert results.rising(curve, 1000) == "yes (+1.2/100 steps)"
    assert results.rising({k: 1 - v for k, v in curve.items()}, 1000) == "no (-1.2/100 steps)"
    assert results.rising({0: 0.5, 500: 0.6}, 1000) == "—"  # the run has not reached 1,000


def test_low_precision_rows_sit_beside_the_float32_run_at_the_same_stops(study, tmp_path):
    ex, results, root = study
    md = results.write_table(root, tmp_path / "RESULTS.md", None, ex.TASKS)
    for title, folder in (("float32, LoRA in float32, ε 1e-3", "sst2/mezo-lora-lr3e-2"),
                          ("MeZO-LoRA, bfloat16, ε 3e-2", "sst2/precision/bfloat16-eps3e-2")):
        row = cells(md, f"| {title} |")
        want = [logged(root, folder, 13, "test", 2), logged(root, folder, 13, "test", 4),
                logged(root, folder, 13, "dev", 4)]
        assert row[1:4] == [f"{100 * r['accuracy']:.1f} (one run)" for r in want], row
    saved = checkpoints.saved_config(root / "sst2/precision/bfloat16-eps3e-2/seed13", "--resume")
    assert saved["dtype"] == "bfloat16" and saved["eps"] == 3e-2


def test_update_rules_and_prefix_rows_keep_the_lr_their_probe_picks(study, tmp_path):
    """Each family's probes on seed 13, the kept lr (higher dev) on seed 21 too; the row is that lr's test mean ±
    std and its forwards a step, beside ZO-SGD: the SST-2 budget runs at their first stop on the same seeds."""
    ex, results, root = study
    md = results.write_table(root, tmp_path / "RESULTS.md", None, ex.TASKS)
    for name, (title, _, lrs, paper) in ex.VARIANT_FAMILIES.items():
        dev = {lr: logged(root, f"{name}-lr{lr}", 13, "dev", 2)["accuracy"] for lr in lrs}
        lr = max(dev, key=lambda x: (dev[x], -float(x)))
        assert not (root / f"{name}-lr{next(x for x in lrs if x != lr)}/seed21").exists()
        m, s = mean_std([logged(root, f"{name}-lr{lr}", x, "test", 2)["accuracy"] for x in (13, 21)])
        row = cells(md, f"| {title} | {lr} |")
        assert row[2] == f"{100 * m:.1f} ± {100 * s:.1f} (n = 2)"
        assert row[3] == ("5" if "conservative" in name else "2") and row[4] == paper
    lr = ex.task_lr(root, "sst2")
    m, s = mean_std([logged(root, f"sst2/mezo-lora-lr{lr}", x, "test", 2)["accuracy"] for x in (13, 21)])
    assert cells(md, "| MeZO-LoRA, ZO-SGD |")[2] == f"{100 * m:.1f} ± {100 * s:.1f} (n = 2)"
    full = next(x for x in md.splitlines() if x.startswith("Every one of the model's"))
    lr = ex.pick_lr(root, ex.FULL_PROBES)
    test = logged(root, "mezo-full", 42, "test", 4)["accuracy"]
    assert f"at lr {lr}" in full and f"test accuracy {100 * test:.1f} (one run)" in full
    for p in ex.FULL_PROBES:
        dev = logged(root, p.name, 42, "dev", 4)["accuracy"]
        assert f"lr {ex.flag(p, '--lr')}: dev {100 * dev:.1f} (one run)" in full


def test_plots_exist_open_and_carry_the_runs_labels(study, tmp_path):
    import matplotlib.image

    import plot
    ex, _, root = study
    labelled = plot.labelled_runs(plot.find_logs([str(root)]), group=False)
    fig = plot.plot_runs(labelled, tmp_path / "curves.png")
    want = {str(ex.run_dir(root, m, s).relative_to(root)) for m in ex.all_methods(root) for s in m.seeds}
    assert {t.get_text() for t in fig.legends[0].get_texts()} == want
    image = matplotlib.image.imread(tmp_path / "curves.png")
    assert image.ndim == 3 and image.shape[0] > 400 and image.shape[1] > 800 and image.std() > 0
    grouped = plot.labelled_runs(plot.find_logs([str(root / "sst2/adam-lora"), str(root / "rte/adam-lora")]),
                                 group=True)
    assert [(label, len(logs)) for label, logs in grouped] == [("sst2/adam-lora", 3), ("rte/adam-lora", 2)]
    assert plot.main([str(root / "rte/adam-lora"), "-o", str(tmp_path / "cli")]) == 0
    assert matplotlib.image.imread(tmp_path / "cli" / "curves.png").shape[2] in (3, 4)
    assert plot.main([str(tmp_path / "nothing-here"), "-o", str(tmp_path)]) == 2


def test_the_budget_figure_has_one_legend_of_every_kind_drawn_while_sst2_has_not_run(study, tmp_path, monkeypatch):
    """SST-2's runs come last, and its panel is the first: the legend there names every kind any panel draws."""
    import plot
    ex, results, root = study
    parts = {t: results.task_parts(root, t) for t in ("sst2", "rte")}
    parts["sst2"] = dict(parts["sst2"], mezo={}, adam=[], zero=[])  # as before SST-2's chain has run
    drawn = []
    monkeypatch.setattr(plot, "save", lambda fig, *a, **k: drawn.append(fig))
    results.figure(parts, tmp_path / "budget.png")
    legend = drawn[0].axes[0].get_legend()
    assert legend is not None and sorted(t.get_text() for t in legend.get_texts()) == ["Adam-LoRA", "MeZO-LoRA",
                                                                                         "zero-shot"]
    assert not drawn[0].axes[0].lines  # the SST-2 panel itself is empty


def test_a_run_killed_before_its_first_checkpoint_starts_again(study, tmp_path):
    """A fresh run killed while it evaluated step 0 leaves log.jsonl and no checkpoint: nothing to resume, and
    `run` starts it again (--overwrite) instead of stopping at mezo.py's refusal of a folder that holds a run."""
    ex, _, root = study
    copy = tmp_path / "results"
    shutil.copytree(root, copy)
    zero = next(m for m in ex.task_methods("rte") if m.name == "rte/zero-shot")
    out = ex.run_dir(copy, zero, 13)
    want = (out / "log.jsonl").read_text()
    shutil.rmtree(out)
    out.mkdir()
    (out / "log.jsonl").write_text(want.splitlines()[0] + "\n")
    assert ex.run_all(copy, 1, [zero], runner=in_process, memory=False) == 0
    assert (out / "log.jsonl").read_text() == want and ex.finished(out, zero)


def test_a_probe_whose_loss_runs_away_is_stopped_and_out_of_the_lr_pick(model_dir, tmp_path, monkeypatch, capsys):
    """Two lr probes through a budget of 5, 10 and 300 steps, each stop a real `python mezo.py` process. At lr 3e-2
    the tiny Llama's full-parameter loss runs away: the run's process is terminated once its log shows it (its
    mean loss over a window of 5 steps over 1.5× the lowest it had been: its first step's, or an earlier
    window's), and the other lr is picked. Run again,
    nothing runs."""
    if not (SHARED / "lm-bff" / "SST-2" / "train.tsv").exists():
        pytest.skip("no ../shared/data")
    import experiments as ex
    for name, value in dict(BUDGET=(5, 10, 300), POLL_S=0.05,
                            COMMON=[*ex.COMMON, "--model", model_dir("llama+tasks"), "--max-length", "48", "--device", "cpu"]).items():
        monkeypatch.setattr(ex, name, value)
    probes = [ex.Method(f"sst2/probe-lr{lr}", lr, ["--mode", "full", "--lr", lr, "--eval-every", "5"], 300, 0.0, "",
                        seeds=(13,), stops=(5, 10, 300), prune=True) for lr in ("3e-2", "1e-4")]
    assert ex.run_all(tmp_path, 1, probes, memory=False) == 0
    wild, calm = (ex.run_dir(tmp_path, m, 13) for m in probes)
    loss = [r["loss"] for r in records(wild) if "loss_plus" in r]
    assert [r["step"] for r in records(wild) if "loss_plus" in r] == list(range(1, len(loss) + 1))
    lowest = [loss[0]]  # its first tenth of a window (a step), then each window's mean
    for end in range(5, len(loss) + 1, 5):
        if np.mean(loss[end - 5:end]) > 1.5 * min(lowest):
            by_hand = end
            break
        lowest.append(np.mean(loss[end - 5:end]))
    assert ex.diverged(wild, probes[0]) == by_hand
    # terminated on its way to 300: the process for the last stop did not reach it
    assert len(loss) < 300 and not ex.finished(wild, probes[0]) and ex.concluded(wild, probes[0])
    assert ex.finished(calm, probes[1]) and ex.diverged(calm, probes[1]) is None
    assert ex.pick_lr(tmp_path, probes) == "1e-4"
    assert f"sst2/probe-lr3e-2 seed 13 diverged at step {by_hand}" in capsys.readouterr().out
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("log.jsonl")}
    assert ex.run_all(tmp_path, 1, probes, memory=False) == 0
    assert capsys.readouterr().out.count("done, skipped") == 2
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("log.jsonl")} == before


def test_sigterm_to_the_study_stops_each_run_at_a_checkpointed_step_and_starts_no_other(model_dir, tmp_path,
                                                                                        monkeypatch, capsys):
    """SIGTERM to this process, as `results.py run` installs its handler (experiments.STOP), while a real `python
    mezo.py` run of a chain trains: the run (in a session of its own) is asked to stop, checkpoints the step it was
    on and exits 143; the chain starts no other run and returns 143. Run again, the run resumes from that step."""
    import experiments as ex
    monkeypatch.setattr(ex, "COMMON", ["--model", model_dir("llama"), "--device", "cpu", "--eval-max", "8",
                                       "--eval-max-start", "8"])
    monkeypatch.setattr(ex, "POLL_S", 0.05)
    long, after = (ex.Method(name, name, ["--eval-every", "0"], steps, 0.0, "", seeds=(13,), task="synthetic")
                   for name, steps in (("long", 1_000_000), ("after", 4)))
    log = ex.run_dir(tmp_path, long, 13) / "log.jsonl"

    def signal_once_it_trains():
        deadline = time.time() + 300
        while time.time() < deadline and not (log.exists() and '"step": 2,' in log.read_text()):
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)

    ex.STOP.install()
    try:
        threading.Thread(target=signal_once_it_trains, daemon=True).start()
        code = ex.run_chains([lambda: ex.run_all(tmp_path, 1, [long, after], memory=False)])
        assert (code, ex.STOP.signal) == (143, "SIGTERM") and not ex.STOP.processes
    finally:
        ex.STOP.restore()
    err = capsys.readouterr().err
    assert "results: SIGTERM: each run under way stops once its step is done" in err and "failed" not in err
    stopped = records(ex.run_dir(tmp_path, long, 13))[-1]["step"]
    with safe_open(str(ex.run_dir(tmp_path, long, 13) / checkpoints.CHECKPOINT), "pt") as f:
        assert int(f.metadata()["step"]) == stopped >= 2  # the step it was on, whole
    assert not ex.run_dir(tmp_path, after, 13).exists()
    short = dataclasses.replace(long, steps=stopped + 2)
    assert ex.run_all(tmp_path, 1, [short], memory=False) == 0
    assert "(resuming)" in capsys.readouterr().out and records(ex.run_dir(tmp_path, long, 13))[-1]["step"] > stopped


def test_a_diverged_probe_reads_as_such_on_the_page(study, tmp_path):
    """The losing RTE probe's training losses of steps 3 and 4 doubled in a copy of the study: over 1.5× those
    of steps 1 and 2 (the window is the budget's first stop, 2), so it diverged at step 4, and its row says so
    instead of its accuracy."""
    ex, results, root = study
    copy = tmp_path / "results"
    shutil.copytree(root, copy)
    lr = ex.task_lr(copy, "rte")
    other = next(m for m in ex.task_methods("rte") if m.prune and ex.flag(m, "--lr") != lr)
    out = ex.run_dir(copy, other, 13)
    assert ex.diverged(out, other) is None
    log = records(out)
    for r in log:
        if "loss_plus" in r and r["step"] in (3, 4):
            r["loss"] *= 2
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    assert ex.diverged(out, other) == 4 and ex.task_lr(copy, "rte") == lr
    md = results.write_table(copy, tmp_path / "RESULTS.md", None, ex.TASKS)
    assert cells(md, f"| rte | {ex.flag(other, '--lr')} |")[2:] == ["—", "—", "diverged at step 4: out of the pick"]


def test_a_page_written_elsewhere_gets_its_figure_beside_it_and_leaves_the_checkouts_alone(study, tmp_path,
                                                                                           monkeypatch, capsys):
    """`results.py table --output OTHER/page.md` (a look at the page before it is committed): the figure goes to
    OTHER/figures/ and the page links it there; the figures/ of the folder it is run from stays byte for byte."""
    ex, results, root = study
    here = tmp_path / "checkout"
    (here / "figures").mkdir(parents=True)
    (here / "figures" / "budget.png").write_bytes(b"committed")
    monkeypatch.chdir(here)
    page = tmp_path / "elsewhere" / "page.md"
    page.parent.mkdir()
    assert results.main(["table", "--root", str(root), "--output", str(page)]) == 0
    assert (here / "figures" / "budget.png").read_bytes() == b"committed"
    assert (page.parent / "figures" / "budget.png").read_bytes()[:4] == b"\x89PNG"
    assert "](figures/budget.png)" in page.read_text()
    assert results.main(["table", "--root", str(root), "--output", str(page)]) == 0  # its own page: written again
    capsys.readouterr()
    # a file of the user's (--output README.md, notes.md) was written over: it is refused, and stays
    notes = tmp_path / "mine" / "notes.md"
    notes.parent.mkdir()
    notes.write_text("# my notes\n")
    for output, what in ((notes, "a file results.py did not write"), (notes.parent, "a folder")):
        assert results.main(["table", "--root", str(root), "--output", str(output)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"results: error: --output {output} is {what}; give the path of a new page (or of a page "
                       "results.py wrote) (nothing was changed)"], err
    assert notes.read_text() == "# my notes\n" and sorted(notes.parent.iterdir()) == [notes]


def test_the_plan_counts_no_wait_for_a_task_whose_every_probe_diverged(study, tmp_path):
    """Every RTE probe diverged (its training losses of steps 3 and 4 doubled in a copy of the study, as above; the
    lower lr's probe, which a grid that all diverged adds, is the first probe's folder where the study did not need
    it): no pick will come, so nothing waits on one, and `plan` counts no time for RTE's other seeds."""
    ex, _, root = study
    copy = tmp_path / "results"
    shutil.copytree(root, copy)
    first = ex.run_dir(copy, ex.task_probes("rte")[0], 13)
    probes = ex.task_probes("rte", lower=True)
    for out in [ex.run_dir(copy, m, 13) for m in probes]:
        if not out.exists():
            shutil.copytree(first, out)
    for m in probes:
        out = ex.run_dir(copy, m, 13)
        log = records(out)
        for r in log:
            if "loss_plus" in r and r["step"] in (3, 4):
                r["loss"] *= 2
        (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        assert ex.diverged(out, m) == 4
    assert ex.needs_lower(copy, "rte") and ex.task_lr(copy, "rte") is None
    assert ex.undecided_s(copy) == ex.undecided_s(root) == 0


@pytest.mark.parametrize("bad", [["--jobs", "0"], ["--threads", "-1"], ["--jobs", "two"]])
def test_results_py_refuses_a_count_below_one_in_one_line_and_runs_nothing(bad, tmp_path, capsys):
    import results
    with pytest.raises(SystemExit) as e:
        results.main(["run", "--root", str(tmp_path / "r"), *bad])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and bad[0] in err[-1] and "1 or more" in err[-1]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("command", ["run", "plan", "table"])
def test_results_py_refuses_an_empty_root_which_would_be_the_working_folder(command, tmp_path, capsys, monkeypatch):
    import results
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        results.main([command, "--root", ""])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == ["results.py: error: --root is empty; give a value, or leave it "
                                         "out for its default"]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["run", "plan", "table"])
def test_results_py_refuses_a_root_that_is_a_file(command, tmp_path, capsys):
    """plan had shown every run to do, and table had said "no finished runs under" the user's file."""
    import results
    (tmp_path / "notes.txt").write_text("mine")
    assert results.main([command, "--root", str(tmp_path / "notes.txt")]) == 2
    assert capsys.readouterr().err == (f"results: error: --root {tmp_path / 'notes.txt'} is a file, not a folder; give "
                                       "the study's folder (default runs/results)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_second_results_py_run_on_the_same_root_is_refused_in_one_line(tmp_path, capsys):
    """One study per --root: while a `results.py run` holds the root (its flock), a second one says so in one line,
    names the holder's PID and starts nothing; a root that cannot be made is one line too."""
    import subprocess
    import sys

    import results
    root = tmp_path / "r"
    root.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; "
                               "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); "
                               "print('held', flush=True); time.sleep(60)", str(root / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert results.main(["run", "--root", str(root), "--only", "precision"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"PID {holder.pid}" in err[0] and "--root" in err[0], err
        assert [p.name for p in root.iterdir()] == [".lock"]  # nothing started
    finally:
        holder.kill()
        holder.wait()
    (tmp_path / "file").write_text("")
    assert results.main(["run", "--root", str(tmp_path / "file" / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--root" in err[0] and "cannot make it" in err[0], err


def test_the_plan_counts_a_killed_run_from_the_step_its_checkpoint_resumes_at(study, tmp_path, capsys):
    """A run killed after a checkpoint and before its next stop resumes at the checkpoint's step: `plan` shows that
    step as its progress (summary.json holds only the last stop's). With the checkpoint gone, run.json and the log
    still rebuild its logged steps; with run.json gone too, the last stop's step is its progress."""
    ex, results, root = study
    copy = tmp_path / "results"
    shutil.copytree(root, copy)
    lr = ex.task_lr(copy, "rte")
    m = next(m for m in ex.task_plan(copy) if m.name == f"rte/mezo-lora-lr{lr}")
    out = ex.run_dir(copy, m, 21)
    # its state had it been killed after the step-4 checkpoint, before its stop at 4 evaluated
    summary = json.loads((out / "summary.json").read_text())
    (out / "summary.json").write_text(json.dumps({**summary, "steps": 2}))
    (out / "log.jsonl").write_text("".join(line for line in (out / "log.jsonl").read_text().splitlines(True)
                                           if not ('"split"' in line and json.loads(line)["step"] == 4)))
    assert ex.steps_done(out) == 2 and ex.reached(out) == 4 and not ex.finished(out, m)

    def progress() -> str:
        capsys.readouterr()
        assert results.main(["plan", "--root", str(copy)]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.endswith(f"--out {out}"))
        return line.split("]")[0].strip(" [")
    assert progress() == "4/4"
    (out / checkpoints.CHECKPOINT).unlink()  # a resume rebuilds steps 1-4 from run.json and the log
    assert (out / checkpoints.RUN_CONFIG).exists() and ex.reached(out) == 4 and progress() == "4/4"
    (out / checkpoints.RUN_CONFIG).unlink()  # nothing to resume with
    assert ex.reached(out) == 2 and progress() == "2/4"


def test_the_records_the_repository_keeps_give_the_same_page_and_resume_and_a_lost_one_is_one_line(study, tmp_path,
                                                                                                      capsys):
    """runs/results is kept in the repository without its tensors: .gitignore keeps each run's run.json, log.jsonl,
    summary.json and timing.json, and memory.json, and no checkpoint, adapter or lock. Over what a clone holds,
    `results.py table` writes the page it writes over the runs with their checkpoints, and `results.py run` finds
    every run done. A run folder left with neither run.json nor checkpoint is one line that names it and says what
    to do, and writes no page."""
    import results
    ex, _, root = study
    kept = ("log.jsonl", "run.json", "summary.json", "timing.json")
    if (ROOT / ".git").exists():  # the rule itself, as git reads it
        names = [f"runs/results/sst2/mezo-lora-lr5e-4/seed13/{n}" for n in kept] + ["runs/results/memory.json"] + [
            f"runs/results/sst2/mezo-lora-lr5e-4/seed13/{n}" for n in (
                "checkpoint.safetensors", "adapter/adapter_model.safetensors", "adapter/adapter_config.json", ".lock")]
        git = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=ROOT, input="\n".join(names),
                             capture_output=True, text=True)
        assert git.stdout.split() == names[5:], git.stderr
    clone = tmp_path / "clone"
    for f in root.rglob("*"):
        if f.is_file() and f.name in (*kept, "memory.json"):
            (clone / f.relative_to(root)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, clone / f.relative_to(root))
    assert list(root.rglob("*.safetensors")) and not list(clone.rglob("*.safetensors"))
    page = lambda r, name: re.sub(r"\(\d{4}-\d\d-\d\d \d\d:\d\d UTC\)", "", results.write_table(
        r, tmp_path / name, None, ex.TASKS)).replace(str(r), "ROOT")
    assert page(clone, "clone.md") == page(root, "runs.md")
    before = {p: p.read_bytes() for p in clone.rglob("*") if p.is_file()}
    assert ex.run_chains(ex.chains(clone, 1, "tasks", in_process)) == 0
    assert {p: p.read_bytes() for p in clone.rglob("*") if p.is_file()} == before  # nothing ran again
    adam = next(m for m in ex.task_methods("rte") if m.name == "rte/adam-lora")
    out = ex.run_dir(clone, adam, 13)
    (out / "run.json").unlink()
    page = tmp_path / "RESULTS.md"
    capsys.readouterr()
    assert results.main(["table", "--root", str(clone), "--output", str(page), "--figures", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(rf"results: error: {re.escape(str(out))}: cannot read its summary.json, run.json "
                                      r"or checkpoint.safetensors \(No such file .*\); remove the folder, and "
                                      r"`python results.py run` runs it again$", err[0]), err
    assert not page.exists()


def test_a_full_disk_or_an_output_that_cannot_be_made_keeps_the_page_and_figures_whole(study, tmpfs, capsys):
    """RESULTS.md, figures/budget.png and plot.py's curves.png are written atomically: on a full disk, `results.py
    table` and `plot.py` end in one line that says what to run after the fix, the page and figures already there stay
    byte for byte as they were, and no temporary file is left; an -o that cannot be made is one line too."""
    from mezo.errors import UsageError

    import plot
    import results
    ex, _, root = study
    page, figures, plots = tmpfs / "RESULTS.md", tmpfs / "figures", tmpfs / "plots"
    table = ["table", "--root", str(root), "--output", str(page), "--figures", str(figures)]
    curves = [str(root / "rte/adam-lora"), "-o", str(plots)]
    assert results.main(table) == 0 and plot.main(curves) == 0
    files = [page, figures / "budget.png", plots / "curves.png"]
    before = [f.read_bytes() for f in files]
    capsys.readouterr()
    filler = fill_disk(tmpfs)
    assert results.main(table) == 2  # the figure is written first: it is the one refused
    assert plot.main(curves) == 2
    with pytest.raises(UsageError, match=r"cannot write .*RESULTS.md \(No space left on device\).*run results.py "
                                         r"table again"):
        results.write_table(root, page)  # the page alone
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2, err
    assert re.match(r"results: error: cannot write .*budget.png \(No space left on device\); what was there is kept "
                    r"whole: .* then run results.py table again$", err[0]), err
    assert re.match(r"plot: error: cannot write .*curves.png \(No space left.* then run plot.py again$", err[1]), err
    assert [f.read_bytes() for f in files] == before
    assert not [p for p in tmpfs.rglob(".*tmp*")]
    filler.unlink()
    (tmpfs / "a-file").write_text("")
    assert plot.main([str(root / "rte/adam-lora"), "-o", str(tmpfs / "a-file" / "plots")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(r"plot: error: --out .*a-file/plots: cannot create it \(Not a directory\); pick a "
                                      r"folder you can write to$", err[0]), err


def test_the_plan_counts_the_runs_that_wait_on_a_pick(study, tmp_path, capsys):
    """`plan`'s time left includes the runs no pick has put in the plan yet (each task's chosen lr on its other
    seeds, each variant family's second seed, the full-parameter run), once each: none when every pick is made, and
    a task whose probes are undone again counts its other seeds once more."""
    import results
    ex, _, root = study
    assert ex.undecided_s(root) == 0
    copy = tmp_path / "results"
    shutil.copytree(root, copy)
    rte = ex.task_probes("rte")
    shutil.rmtree(ex.run_dir(copy, rte[0], 13))
    assert ex.task_lr(copy, "rte") is None
    assert ex.undecided_s(copy) == pytest.approx(ex.expected_s(rte[0]) * (len(ex.TASK_SEEDS) - 1))
    assert results.main(["plan", "--root", str(copy)]) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert f"+ {ex.undecided_s(copy) / 60:.0f} min of runs that wait on a pick" in head, head
    sst2 = ex.task_probes("sst2")[0]
    assert ex.undecided_s(tmp_path / "empty") == pytest.approx(
        ex.expected_s(sst2) * 2 + ex.expected_s(rte[0])
        + sum(ex.expected_s(ex.probed(name, *family[:3])[0]) for name, family in ex.VARIANT_FAMILIES.items())
        + ex.expected_s(ex.full_row("1e-5")))
