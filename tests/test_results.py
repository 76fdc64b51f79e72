"""The first-order baseline (--optimizer adam) against a hand-written torch.optim loop, and the results table and
plots made from logs of real short runs (tiny models, real SST-2 data)."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import load_tiny, records, run, tiny_args
from mezo.tasks import prompts, synthetic
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
                 r"--optimizer adam backpropagates the cross-entropy")

# -----------------------------------------------------------------------------
# results.py and plot.py on real short runs


def in_process(cmd, threads):
    assert cmd[0] == "mezo.py"
    return mezo.main(cmd[1:])


@pytest.fixture(scope="module")
def small_results(model_dir, tmp_path_factory):
    """A results tree made by results.run_all: real 16-shot SST-2 splits, a tiny Llama, a few steps a run."""
    if not (SHARED / "lm-bff" / "SST-2" / "train.tsv").exists():
        pytest.skip("no ../shared/data")
    import results
    model = ["--model", model_dir("llama"), "--max-length", "48"]
    methods = [
        results.Method("zero-shot", "zero-shot", [*model, "--eval-every", "0"], 0, 0.0, "79.0", seeds=(13,)),
        results.Method("mezo-lora", "MeZO LoRA", [*model, "--lr", "3e-2", "--eval-every", "2"], 4, 0.0, "91.4",
                       seeds=(13, 21)),
        results.Method("mezo-full", "MeZO full", [*model, "--mode", "full", "--lr", "3e-2", "--eval-every", "2"],
                       4, 0.0, "90.5", seeds=(13, 21, 42)),
        results.Method("adam-lora", "Adam LoRA", [*model, "--optimizer", "adam", "--lr", "3e-2", "--eval-every", "2"],
                       4, 0.0, "91.9", seeds=(13, 21)),
    ]
    tiny_tasks = ["--model", model_dir("llama+tasks"), "--max-length", "48"]  # every task's words in its vocabulary
    tasks_, task_args = ("rte", "trec"), dict(seeds=(13, 21), lrs=("3e-2", "1e-2"), extra=tiny_tasks)
    root = tmp_path_factory.mktemp("results")
    assert results.run_all(root, 1, methods, runner=in_process, memory=False) == 0
    assert results.run_tasks(root, 1, tasks_, **task_args, runner=in_process) == 0
    task_methods = results.task_plan(root, tasks_, **task_args)
    return results, root, methods, task_methods


def test_results_run_skips_finished_runs_and_resumes_stopped_ones(small_results, capsys):
    results, root, methods, task_methods = small_results
    before = {p: p.stat().st_mtime_ns for p in root.rglob("log.jsonl")}
    assert results.run_all(root, 1, methods + task_methods, runner=in_process, memory=False) == 0
    assert {p: p.stat().st_mtime_ns for p in root.rglob("log.jsonl")} == before  # nothing ran again
    assert capsys.readouterr().out.count("done, skipped") == 8 + 2 * 6  # per task: 1 + 2 probes + 1 + 2 Adam


def test_table_means_and_stds_match_a_hand_computation(small_results, tmp_path):
    results, root, methods, task_methods = small_results
    md = results.write_table(root, tmp_path / "RESULTS.md", None, methods, task_methods)
    for m in methods[1:]:
        finals = []
        for seed in m.seeds:
            log = [json.loads(x) for x in (root / m.name / f"seed{seed}" / "log.jsonl").read_text().splitlines()]
            finals.append([r["accuracy"] for r in log if r.get("split") == "test" and r["step"] == m.steps][0])
        mean = sum(finals) / len(finals)
        std = math.sqrt(sum((x - mean) ** 2 for x in finals) / len(finals))
        row = results.summarise(results.collect(root, methods), methods)[m.name]
        # the same float64 mean and std, summed in another order: ulps (1e-16); 1e-12
        assert row["test"] == pytest.approx((mean, std), rel=1e-12, abs=1e-15)
        line = next(x for x in md.splitlines() if x.startswith(f"| {m.title} |"))
        assert f"| {100 * mean:.1f} ± {100 * std:.1f} (n = {len(m.seeds)}) |" in line, line
        assert f"| {m.steps} | {m.steps * (1 if 'adam' in m.name else 2)} | {m.steps if 'adam' in m.name else 0} |" \
            in line, line
    full = [json.loads(x)["accuracy"] for s in (13, 21, 42)
            for x in (root / "mezo-full" / f"seed{s}" / "log.jsonl").read_text().splitlines() if '"test"' in x]
    assert len(set(full)) > 1, "every accuracy equal: the std check above would be vacuous"
    per_seed = next(x for x in md.splitlines() if x.startswith("| MeZO full |") and "±" not in x)
    finals = {s: [json.loads(x)["accuracy"] for x in (root / "mezo-full" / f"seed{s}" / "log.jsonl").read_text()
                  .splitlines() if '"test"' in x][-1] for s in (13, 21, 42)}
    assert per_seed == "| MeZO full | " + " | ".join(f"{100 * finals[s]:.1f}" for s in (13, 21, 42)) + " | — | — |"
    zero = next(x for x in md.splitlines() if x.startswith("| zero-shot |"))
    assert "(one run)" in zero and "| 79.0 |" in zero
    assert "Not measured yet" in md and "Not yet run: these need a GPU" in md
    assert "**MeZO-LoRA** moves" in md and "**First-order (Adam) LoRA** reaches" in md  # the generated sentences


def test_every_task_row_keeps_the_lr_with_the_better_dev_and_its_test_mean(small_results, tmp_path):
    """Each task's row: the MeZO-LoRA candidate whose probe (seed 13) ends with the higher dev accuracy (never
    test), which alone ran seed 21 too, and the mean ± std of its test accuracies; zero-shot and Adam beside it; the
    gaps; all against a hand computation from the logs."""
    results, root, methods, task_methods = small_results
    md = results.write_table(root, tmp_path / "RESULTS.md", None, methods, task_methods)
    final = lambda name, seed, split: [r["accuracy"] for r in
                                       map(json.loads, (root / name / f"seed{seed}" / "log.jsonl").read_text()
                                           .splitlines()) if r.get("split") == split][-1]
    stats = lambda values: (np.mean(values), np.std(values))
    for task, n_classes, test_n in (("rte", 2, 277), ("trec", 6, 500)):
        dev = {lr: final(f"{task}/mezo-lora-lr{lr}", 13, "dev") for lr in ("3e-2", "1e-2")}
        lr = max(dev, key=lambda x: (dev[x], -float(x)))
        other = next(x for x in dev if x != lr)
        assert (root / f"{task}/mezo-lora-lr{lr}/seed21/log.jsonl").exists()
        assert not (root / f"{task}/mezo-lora-lr{other}/seed21").exists()  # the probe that lost ran one seed
        mezo, adam = (stats([final(name, s, "test") for s in (13, 21)]) for name in
                      (f"{task}/mezo-lora-lr{lr}", f"{task}/adam-lora"))
        zero = final(f"{task}/zero-shot", 13, "test")
        row = next(x for x in md.splitlines() if x.startswith(f"| {task} | {n_classes} | {test_n} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[3] == f"{100 * zero:.1f} (one run)"
        assert cells[4] == f"{100 * mezo[0]:.1f} ± {100 * mezo[1]:.1f} (n = 2)" and cells[5] == lr
        assert cells[6] == f"{100 * adam[0]:.1f} ± {100 * adam[1]:.1f} (n = 2)"
        assert cells[7] == f"{100 * (mezo[0] - zero):+.1f}" and cells[8] == f"{100 * (adam[0] - mezo[0]):+.1f}"
        assert f"| {task} | {lr} |" in md and "**kept**" in md
    assert "| rte | `" in md and "Does this mean that" in md  # the prompts each task used
    assert "What each task's runs cost" in md


def test_plots_exist_open_and_carry_the_runs_labels(small_results, tmp_path):
    import matplotlib.image

    import plot
    results, root, methods, task_methods = small_results
    labelled = plot.labelled_runs(plot.find_logs([str(root)]), group=False)
    fig = plot.plot_runs(labelled, tmp_path / "curves.png")
    want = {f"{m.name}/seed{s}" for m in methods + task_methods for s in m.seeds}
    assert {t.get_text() for t in fig.legends[0].get_texts()} == want
    image = matplotlib.image.imread(tmp_path / "curves.png")
    assert image.ndim == 3 and image.shape[0] > 400 and image.shape[1] > 800 and image.std() > 0
    grouped = plot.labelled_runs(plot.find_logs([str(root / "mezo-full"), str(root / "adam-lora")]), group=True)
    assert [(label, len(logs)) for label, logs in grouped] == [("mezo-full", 3), ("adam-lora", 2)]  # given order
    assert {t.get_text() for t in plot.plot_runs(grouped).legends[0].get_texts()} == {"mezo-full", "adam-lora"}
    assert plot.main([str(root / "adam-lora"), "-o", str(tmp_path / "cli")]) == 0
    assert matplotlib.image.imread(tmp_path / "cli" / "curves.png").shape[2] in (3, 4)
    assert plot.main([str(tmp_path / "nothing-here"), "-o", str(tmp_path)]) == 2


def test_update_rules_and_prefix_rows_keep_the_lr_their_probe_picks(small_results, model_dir, tmp_path):
    """results.run_variants on tiny models: each family's probes on seed 13, the kept lr (higher dev) on seed 21
    too; the section's row is that lr's test mean ± std and its forwards a step, against the logs."""
    results, root, methods, task_methods = small_results
    model = ["--model", model_dir("llama"), "--max-length", "48"]
    families = {"rules/conservative": ("MeZO-LoRA, conservative", [*model, "--rule", "conservative"],
                                       ("3e-2", "1e-2"), "—"),
                "prefix/mezo-prefix": ("MeZO-prefix", [*model, "--mode", "prefix", "--eps", "1e-1"], ("3e-2", "1e-2"),
                                       "90.8")}
    assert results.run_variants(root, 1, families, runner=in_process) == 0
    md = results.write_table(root, tmp_path / "RESULTS.md", None, methods, task_methods, families)
    final = lambda name, seed, split: [r["accuracy"] for r in
                                       map(json.loads, (root / name / f"seed{seed}" / "log.jsonl").read_text()
                                           .splitlines()) if r.get("split") == split][-1]
    for name, (title, _, lrs, paper) in families.items():
        dev = {lr: final(f"{name}-lr{lr}", 13, "dev") for lr in lrs}
        lr = max(dev, key=lambda x: (dev[x], -float(x)))
        assert (root / f"{name}-lr{lr}/seed21").is_dir()
        assert not (root / f"{name}-lr{next(x for x in lrs if x != lr)}/seed21").exists()
        tests = [final(f"{name}-lr{lr}", s, "test") for s in (13, 21)]
        row = next(x for x in md.splitlines() if x.startswith(f"| {title} | {lr} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2] == f"{100 * np.mean(tests):.1f} ± {100 * np.std(tests):.1f} (n = 2)"
        assert cells[3] == ("5" if "conservative" in name else "2") and cells[5] == paper
    assert "| MeZO-LoRA, ZO-SGD |" in md and "Not yet run: `python results.py run` makes these" not in md
    sgd = np.mean([final("mezo-lora", s, "test") for s in (13, 21)])  # the reading line: each row against ZO-SGD
    reading = next(x for x in md.splitlines() if x.startswith("Test accuracy against ZO-SGD on the same seeds"))
    assert f"({100 * sgd:.1f})" in reading
    for name, (title, _, lrs, _) in families.items():
        dev = {lr: final(f"{name}-lr{lr}", 13, "dev") for lr in lrs}
        lr = max(dev, key=lambda x: (dev[x], -float(x)))
        diff = 100 * (np.mean([final(f"{name}-lr{lr}", s, "test") for s in (13, 21)]) - sgd)
        assert f"{title}: {diff:+.1f}" in reading
        assert (f"- {title}: its probes tied on dev" in md) == (len(set(dev.values())) == 1)


def test_each_rules_extra_memory_is_read_against_plain_mezo():
    import results
    rows = [dict(case="inference", peak_mb=900.0), dict(case="mezo-full", peak_mb=1000.0, trainable=3 * 2**20),
            dict(case="mezo-lora", peak_mb=990.0, trainable=2**18), dict(case="mezo-full-momentum", peak_mb=1011.5),
            dict(case="mezo-full-adam", peak_mb=1023.0), dict(case="mezo-lora-adam", peak_mb=995.0)]
    line = results.rule_memory(dict(rows=rows))[-1]
    assert "momentum +12 MB, adam +23 MB." in line and "of the 3,145,728 values is 12 MB" in line
    assert "LoRA's buffers (1.0 MB each)" in line
    assert results.rule_memory(dict(rows=rows[:3])) == [] and results.rule_memory(None) == []


def test_a_run_outside_the_protocol_is_listed_and_changes_no_row(small_results, tmp_path):
    """A finished run of the losing lr on the other seed (the earlier protocol made such runs) is named on the page
    with its dev and test accuracy, and the task's row is what it was without it."""
    results, root, methods, task_methods = small_results
    copy = tmp_path / "results"
    shutil.copytree(root, copy)
    before = results.write_table(copy, tmp_path / "before.md", None, methods, task_methods)
    kept = next(m for m in task_methods if m.task == "rte" and "mezo-lora" in m.name and len(m.seeds) > 1)
    lost = next(m for m in task_methods if m.task == "rte" and "mezo-lora" in m.name and m is not kept)
    out = results.run_dir(copy, lost, 21)
    assert in_process(lost.command(21, out, 1), 1) == 0
    after = results.write_table(copy, tmp_path / "after.md", None, methods, task_methods)
    row = lambda md: next(x for x in md.splitlines() if x.startswith("| rte | 2 |"))
    assert row(after) == row(before)
    stats = results.run_stats(out)
    assert "Runs outside this protocol" not in before
    assert (f"rte lr {results.flag(lost, '--lr')} seed 21: dev {results.pct(stats['dev'])}, test "
            f"{results.pct(stats['test'])}") in after


def test_the_full_parameter_probes_are_named_in_the_sizing_section(small_results, tmp_path, monkeypatch):
    """The full-parameter lr probes (data seed 42) appear with each one's final dev accuracy."""
    results, root, methods, task_methods = small_results
    copy = tmp_path / "results"
    shutil.copytree(root, copy)
    model = methods[0].flags[:4]  # --model DIR --max-length 48
    probes = [results.Method(f"probe/mezo-full-lr{lr}", f"probe {lr}", [*model, "--mode", "full", "--lr", lr,
                                                                         "--eval-every", "2"], 4, 0.0, "", seeds=(42,))
              for lr in ("3e-2", "1e-2")]
    monkeypatch.setattr(results, "FULL_PROBES", probes)
    assert results.run_all(copy, 1, probes, runner=in_process, memory=False) == 0
    md = results.write_table(copy, tmp_path / "RESULTS.md", None, methods, task_methods)
    line = next(x for x in md.splitlines() if x.startswith("- Its learning rate, from "))
    for m in probes:
        assert f"lr {results.flag(m, '--lr')} {results.pct(results.run_stats(results.run_dir(copy, m, 42))['dev'])}" \
            in line, line
