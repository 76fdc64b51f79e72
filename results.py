"""RESULTS.md, measured from the code: 16-shot SST-2 on the default offline model, five seeds per
method, and every other task of the paper's RoBERTa table that has data here (two seeds per trained
method), the update rules and MeZO-prefix.

    python results.py plan     # the runs, their commands and the expected time; runs nothing
    python results.py run      # every run, one after another, into runs/results; finished runs are
                               # skipped and an interrupted one resumes: just run it again
    python results.py table    # RESULTS.md and figures/curves.png from the logs (seconds)
    make results               # run, then table

Each run is `python mezo.py ...` in its own process; its wall time (process start to exit, model
loading included) is kept in timing.json beside its log. The page's text is
docs/RESULTS.template.md; this file fills it with what the logs say.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import string
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from mezo.errors import UsageError  # noqa: E402

from mezo import baseline, checkpoints, models, rules, runs, tasks  # noqa: E402

TEMPLATE = ROOT / "docs" / "RESULTS.template.md"
# LM-BFF's data seeds, as in the paper
SEEDS = (13, 21, 42, 87, 100)
# Test rows of each task, for the time estimate only (the others: 2,000)
TEST_ROWS = dict(sst2=872, sst5=2210, trec=500, rte=277)
# Every run: 16-shot, batch 8, the default offline model and the task's prompt. During training the
# test score is taken on a 32-row slice; the last evaluation uses the whole test set.
COMMON = ["--k", "16", "--batch-size", "8", "--eval-max", "32", "--eval-max-start", "32"]


@dataclass
class Method:
    # folder under the results root
    name: str
    # row of the table
    title: str
    # mezo.py flags beyond COMMON
    flags: list[str]
    steps: int
    # seconds a step on 2 cores, measured (for the time estimate only)
    step_s: float
    # the paper's RoBERTa-large figure beside it (Malladi et al. 2023, k = 16)
    paper: str
    seeds: tuple[int, ...] = SEEDS
    task: str = "sst2"

    def command(self, seed: int, out: Path, threads: int) -> list[str]:
        return ["mezo.py", "--task", self.task, *COMMON, *self.flags, "--steps", str(self.steps),
                "--data-seed", str(seed), "--threads", str(threads), "--out", str(out)]


# Learning rates from short probes (data seed 42): MeZO-LoRA at 2e-3, Adam-LoRA at 1e-3. MeZO over
# every value runs with --fast (the compiled CPU backend, the reference's numbers); its lr is picked
# by FULL_PROBES on dev, below.
METHODS = [
    Method("zero-shot", "zero-shot (no training)", ["--eval-every", "0"], 0, 0.0, "79.0",
           seeds=(13,)),
    Method("mezo-lora", "MeZO-LoRA (r 8, α 16, q/v, all 30 layers)",
           ["--mode", "lora", "--lr", "2e-3", "--eval-every", "25"], 100, 1.60, "91.4"),
    Method("adam-lora", "first-order: backprop + Adam, LoRA (same tensors)",
           ["--optimizer", "adam", "--mode", "lora", "--lr", "1e-3", "--eval-every", "8"], 32, 2.20,
           "91.9 (FT: full, Adam)"),
]
# MeZO full-parameter: 100-step probes at each candidate lr on data seed 42 (dev decides), then
# FULL_STEPS steps at the winner, one seed: a step over every value costs seconds even compiled.
FULL_LRS, FULL_STEPS = ("3e-6", "1e-5", "3e-5"), 1000
FULL_PROBES = [Method(f"probe/mezo-full-lr{lr}", f"MeZO full-parameter, lr {lr} (probe)",
                      ["--mode", "full", "--fast", "--lr", lr, "--eval-every", "50"], 100, 4.5, "",
                      seeds=(42,))
               for lr in FULL_LRS]
# The other tasks: each task's MeZO-LoRA lr by a probe on dev, never on test: every candidate runs
# the first data seed; the one with the higher dev accuracy runs the other seeds. Adam-LoRA at 1e-3.
TASKS_HERE = ("sst5", "mr", "cr", "mpqa", "subj", "trec", "rte")
TASK_SEEDS, MEZO_LRS = (13, 21), ("1e-3", "2e-3")
# MeZO-LoRA, RoBERTa-large, the paper's Table 18, k = 16
PAPER_LORA = dict(sst2="91.4", sst5="43.0", rte="64.9", trec="73.1")
# Issue 15's SST-2 rows: MeZO-LoRA under each update rule, and MeZO-prefix, each lr by the same
# probe. folder: (title, flags, candidate lrs, the paper's figure beside it)
VARIANT_FAMILIES = {
    "rules/momentum": ("MeZO-LoRA, --rule momentum (β 0.9)",
                       ["--mode", "lora", "--rule", "momentum"], ("2e-4", "5e-4"), "—"),
    "rules/adam": ("MeZO-LoRA, --rule adam", ["--mode", "lora", "--rule", "adam"], ("1e-4", "1e-3"),
                   "90.4 (MeZO-Adam)"),
    "rules/sign": ("MeZO-LoRA, --rule sign", ["--mode", "lora", "--rule", "sign"], ("1e-3", "3e-3"),
                   "—"),
    "rules/conservative": ("MeZO-LoRA, --rule conservative",
                           ["--mode", "lora", "--rule", "conservative"], ("2e-3", "5e-3"), "—"),
    "prefix/mezo-prefix": ("MeZO-prefix (5 tokens, eps 1e-1)",
                           ["--mode", "prefix", "--eps", "1e-1"], ("1e-3", "1e-2"), "90.8"),
}
# process start + model load; forward seconds per evaluated row (batch 8, 2 cores)
LOAD_S, ROW_S = 15.0, 0.05
# bench/memory.py's cases, each in a fresh process (the full-parameter MeZO step is slow)
MEMORY_S = 480.0
RULE_CASES = [f"mezo-{mode}-{rule}" for mode in ("lora", "full") for rule in rules.RULES]


def flag(m: Method, name: str, default=None):
    return m.flags[m.flags.index(name) + 1] if name in m.flags else default


def run_dir(root: Path, method: Method, seed: int) -> Path:
    return root / method.name / f"seed{seed}"


def probed(name, title, flags, lrs, seeds=TASK_SEEDS, lr=None, task="sst2", paper="—"):
    """A 100-step MeZO method whose lr is probed: each candidate runs the first seed; the chosen
    `lr`, every seed."""
    return [Method(f"{name}-lr{x}", f"{title}, lr {x}", [*flags, "--lr", x, "--eval-every", "25"],
                   100, 1.7, paper, seeds=seeds if x == lr else seeds[:1], task=task)
            for x in lrs]


def pick_lr(root: Path, candidates: list[Method]) -> str | None:
    """The candidate whose probe (first seed) ends with the higher dev accuracy, the smaller lr on a
    tie; None until every probe has finished."""
    if not all(finished(run_dir(root, m, m.seeds[0]), m) for m in candidates):
        return None
    dev = {flag(m, "--lr"): run_stats(run_dir(root, m, m.seeds[0]))["dev"] for m in candidates}
    return max(dev, key=lambda x: (dev[x], -float(x)))


def full_method(root: Path) -> Method | None:
    """The full-parameter row at the probed lr; None until every probe has finished."""
    lr = pick_lr(root, FULL_PROBES)
    if lr is None:
        return None
    flags = ["--mode", "full", "--fast", "--lr", lr, "--eval-every", "100"]
    return Method("mezo-full", f"MeZO full-parameter (--fast, lr {lr})", flags, FULL_STEPS, 4.5,
                  "90.5", seeds=(42,))


def task_methods(task, seeds=TASK_SEEDS, lrs=MEZO_LRS, extra=(), lr=None) -> list[Method]:
    """zero-shot, MeZO-LoRA at each candidate lr, Adam-LoRA: folders <task>/<method>."""
    adam = [*extra, "--optimizer", "adam", "--mode", "lora", "--lr", "1e-3", "--eval-every", "8"]
    return [Method(f"{task}/zero-shot", "zero-shot", [*extra, "--eval-every", "0"], 0, 0.0, "",
                   seeds=seeds[:1], task=task),
            *probed(f"{task}/mezo-lora", "MeZO-LoRA", [*extra, "--mode", "lora"], lrs, seeds, lr,
                    task, PAPER_LORA.get(task, "—")),
            Method(f"{task}/adam-lora", "Adam-LoRA", adam, 32, 2.2, "", seeds=seeds, task=task)]


def task_lr(root, task, seeds=TASK_SEEDS, lrs=MEZO_LRS, extra=()) -> str | None:
    """The task's MeZO-LoRA lr, by its probes."""
    candidates = [m for m in task_methods(task, seeds, lrs, extra) if "mezo-lora" in m.name]
    return pick_lr(root, candidates)


def task_plan(root, tasks_=TASKS_HERE, seeds=TASK_SEEDS, lrs=MEZO_LRS, extra=()) -> list[Method]:
    """Every task's methods as far as the probes have decided them."""
    return [m for t in tasks_
            for m in task_methods(t, seeds, lrs, extra, task_lr(root, t, seeds, lrs, extra))]


def variant_methods(root: Path | None, families=None, extra=()) -> list[Method]:
    """Every family's methods as far as its probes have decided them."""
    out = []
    for name, (title, flags, lrs, paper) in (families or VARIANT_FAMILIES).items():
        lr = pick_lr(root, probed(name, title, [*extra, *flags], lrs)) if root else None
        out += probed(name, title, [*extra, *flags], lrs, lr=lr, paper=paper)
    return out

# -----------------------------------------------------------------------------
# Running


def expected_s(m: Method) -> float:
    every = int(flag(m, "--eval-every", 0))
    evals = m.steps // every if m.steps and every else 0
    # start, middle and end evaluations
    rows = (64 if m.steps else 0) + 64 * max(evals - 1, 0) + 32 + TEST_ROWS.get(m.task, 2000)
    return LOAD_S + rows * ROW_S + m.steps * m.step_s


def finished(out: Path, m: Method) -> bool:
    """The run reached its last step and its final evaluation (which uses every test row)."""
    try:
        done = json.loads((out / "summary.json").read_text())["steps"] == m.steps
        log = runs.read_log(out / "log.jsonl")
    except (OSError, ValueError, KeyError):
        return False
    return done and any(r.get("split") == "test" and r["step"] == m.steps for r in log)


def plan(root: Path, threads: int, methods=None) -> list[tuple[Method, int, Path]]:
    if methods is None:
        methods = METHODS + task_plan(root) + variant_methods(root) + FULL_PROBES
    todo = [(m, s, run_dir(root, m, s)) for m in methods for s in m.seeds]
    memory = 0.0 if (root / "memory.json").exists() else MEMORY_S
    left = sum(expected_s(m) for m, _, out in todo if not finished(out, m)) + memory
    total = sum(expected_s(m) for m, _, _ in todo) + MEMORY_S
    print(f"results: {len(todo)} runs + the memory table; expected {total / 60:.0f} min on 2 cores "
          f"from scratch, {left / 60:.0f} min left", flush=True)
    return todo


def cmd_plan(args) -> int:
    for m, s, out in plan(Path(args.root), args.threads):
        state = "done" if finished(out, m) else f"~{expected_s(m) / 60:.1f} min"
        print(f"  [{state:>9s}] python {' '.join(m.command(s, out, args.threads))}")
    print(f"  [~{MEMORY_S / 60:.1f} min] {' '.join(memory_command(Path(args.root), args.threads))}")
    print("  (then each task's chosen lr on its other seeds, once its probes are done, and the "
          "full-parameter run at the lr its probes pick)")
    return 0


def memory_command(root: Path, threads: int) -> list[str]:
    cases = ["inference", "mezo-lora", "mezo-full", "adam-lora", "adam-full", *RULE_CASES]
    return ["python", "bench/memory.py", "--cases", ",".join(cases), "--threads", str(threads),
            "--json", str(root / "memory.json")]


def subprocess_runner(cmd: list[str], threads: int) -> int:
    """`python mezo.py ...` in a fresh process (its own memory and threads), from this folder."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.call([sys.executable, str(ROOT / cmd[0]), *cmd[1:]], env=env)


def run_all(root: Path, threads: int, methods=METHODS, runner=subprocess_runner,
            memory: bool = True) -> int:
    todo = plan(root, threads, methods)
    t_all = time.time()
    for i, (m, seed, out) in enumerate(todo, 1):
        if finished(out, m):
            print(f"results: [{i}/{len(todo)}] {m.name} seed {seed}: done, skipped", flush=True)
            continue
        resume = (out / checkpoints.CHECKPOINT).exists() and (out / "log.jsonl").exists()
        cmd = m.command(seed, out, threads)
        if resume:
            cmd = ["mezo.py", "--resume", str(out), "--threads", str(threads)]
        print(f"results: [{i}/{len(todo)}] {m.name} seed {seed}{' (resuming)' if resume else ''}, "
              f"expected ~{expected_s(m) / 60:.1f} min: python {' '.join(cmd)}", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        t = time.time()
        code = runner(cmd, threads)
        path = out / "timing.json"
        timing = dict(wall_s=0.0)
        if resume and path.exists():
            timing = json.loads(path.read_text())
        timing = dict(wall_s=timing["wall_s"] + time.time() - t, threads=threads,
                      command="python " + " ".join(m.command(seed, out, 2)),
                      processes=timing.get("processes", 0) + 1)
        path.write_text(json.dumps(timing, indent=1))
        if code:
            print(f"results: {m.name} seed {seed} failed (exit {code}); fix and run again to "
                  "resume", file=sys.stderr)
            return code
    if memory and not (root / "memory.json").exists():
        print(f"results: memory table: {' '.join(memory_command(root, threads))}", flush=True)
        code = subprocess_runner(memory_command(root, threads)[1:], threads)
        if code:
            return code
    print(f"results: all runs done ({(time.time() - t_all) / 60:.1f} min this time); now: "
          "python results.py table")
    return 0


def run_stages(root, threads, stages, runner=None) -> int:
    """Each stage is a function of the root (None: before the probes) giving its methods: the lr
    probes run first, then the chosen lr on the other seeds."""
    for methods_of in stages:
        for known in (None, root):
            code = run_all(root, threads, methods_of(known), runner or subprocess_runner, False)
            if code:
                return code
    return 0


def run_tasks(root, threads, tasks_=TASKS_HERE, seeds=TASK_SEEDS, lrs=MEZO_LRS, extra=(),
              runner=None) -> int:
    """Task by task: zero-shot, the lr probes and Adam-LoRA, then the chosen lr on the others."""
    def stage(t):
        return lambda r: task_methods(t, seeds, lrs, extra, r and task_lr(r, t, seeds, lrs, extra))
    return run_stages(root, threads, [stage(t) for t in tasks_], runner)


def run_variants(root, threads, families=None, extra=(), runner=None) -> int:
    """Family by family (update rules, prefix): the lr probes, then the chosen lr."""
    def stage(name, spec):
        return lambda r: variant_methods(r, {name: spec}, extra)
    families = families or VARIANT_FAMILIES
    return run_stages(root, threads, [stage(n, s) for n, s in families.items()], runner)


def cmd_run(args) -> int:
    root = Path(args.root)
    code = (run_all(root, args.threads, METHODS, memory=False) or run_tasks(root, args.threads)
            or run_variants(root, args.threads) or run_all(root, args.threads, FULL_PROBES))
    full = full_method(root) if code == 0 else None
    if full:
        return run_all(root, args.threads, [full], memory=False)
    return code

# -----------------------------------------------------------------------------
# Reading the runs: everything on the page is read here, from the logs; nothing is typed in.


def run_stats(out: Path) -> dict:
    """Final dev/test accuracy, counts, wall time, peak memory and trainable values of one run."""
    from safetensors import safe_open
    log = runs.read_log(out / "log.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    final = {r["split"]: r for r in log if "split" in r and r["step"] == summary["steps"]}
    start = {r["split"]: r for r in log if "split" in r and r["step"] == 0}
    timing = {}
    if (out / "timing.json").exists():
        timing = json.loads((out / "timing.json").read_text())
    with safe_open(str(out / checkpoints.CHECKPOINT), "pt") as f:
        trainable = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys()
                        if not k.startswith(baseline.ADAM))
        config = json.loads(f.metadata()["config"])
    return dict(test=final["test"]["accuracy"], test_n=final["test"]["n"],
                dev=final["dev"]["accuracy"], dev_n=final["dev"]["n"],
                dev0=start.get("dev", {}).get("accuracy"), steps=summary["steps"],
                forwards=summary.get("forwards", 2 * summary["steps"]),
                backwards=summary.get("backwards", 0), wall_s=timing.get("wall_s"),
                threads=timing.get("threads"), peak_mb=summary.get("peak_memory_mb"),
                trainable=trainable, config=config, step_time=summary.get("step_time"),
                ratio=summary.get("ratio"))


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
        done = [s for s in m.seeds if finished(run_dir(root, m, s), m)]
        if done:
            got[m.name] = {s: run_stats(run_dir(root, m, s)) for s in done}
    return got


def summarise(found: dict, methods=METHODS) -> dict:
    """method name -> mean/std of test and dev accuracy over seeds, and the per-run costs."""
    rows = {}
    for m in [m for m in methods if m.name in found]:
        r = list(found[m.name].values())
        row = dict(r[0], method=m, n=len(r), test=mean_std([x["test"] for x in r]),
                   dev=mean_std([x["dev"] for x in r]), model=r[0]["config"]["model"],
                   wall=[x["wall_s"] for x in r if x["wall_s"] is not None],
                   threads=sorted({x["threads"] for x in r if x["threads"]}),
                   peak=[x["peak_mb"] for x in r if x["peak_mb"] is not None])
        if 42 in found[m.name]:
            row["seed42"] = found[m.name][42]["test"]
        # zero-shot's dev accuracy per seed: step 0 of the LoRA runs (B = 0 leaves the model as is)
        if m.name == "zero-shot" and "mezo-lora" in found:
            row["dev"] = mean_std([x["dev0"] for x in found["mezo-lora"].values()])
            row["dev_seeds"] = len(found["mezo-lora"])
        rows[m.name] = row
    return rows

# -----------------------------------------------------------------------------
# The page: docs/RESULTS.template.md, its pieces filled with the numbers above.


def pieces() -> dict[str, str]:
    """The template's pieces by name: the text after each `<!-- name -->` line."""
    parts = re.split(r"^<!-- ([\w -]+) -->\n", TEMPLATE.read_text(), flags=re.M)
    return {name: text.strip("\n") for name, text in zip(parts[1::2], parts[2::2])}


def say(name: str, **values) -> str:
    return string.Template(pieces()[name]).substitute(values)


def fmt_time(seconds: list[float]) -> str:
    if not seconds:
        return "—"
    spread = f" ({min(seconds):.0f}–{max(seconds):.0f})" if len(seconds) > 1 else ""
    return f"{float(np.median(seconds)):.0f} s" + spread


def fmt_acc(r: dict | None) -> str:
    if r is None:
        return "—"
    if r["n"] == 1:
        return pct(r["test"][0]) + " (one run)"
    return pct(*r["test"]) + f" (n = {r['n']})"


def gap(a: dict | None, b: dict | None) -> str:
    return f"{100 * (a['test'][0] - b['test'][0]):+.1f}" if a and b else "—"


def paper(m: Method) -> float:
    return float(m.paper.split()[0])


def joined(items, sep="/") -> str:
    return sep.join(map(str, items)) or "?"


def run_prompt(cfg: dict) -> tuple[str, tuple[str, ...]]:
    """The template and label words a run used: its own, or its task's default for a causal LM."""
    template, words = tasks.prompt(cfg.get("task", "sst2"), "causal")
    return cfg.get("template") or template, tuple(cfg.get("label_words") or words)


def write_table(root: Path, path: Path, figures: Path | None = None, methods=METHODS,
                task_methods=None, families=None) -> str:
    if task_methods is None:
        task_methods = task_plan(root)
    families = VARIANT_FAMILIES if families is None else families
    found = collect(root, methods)
    if not found:
        raise UsageError(f"no finished runs under {root}; run `python results.py run` first")
    rows = summarise(found, methods)
    memory = None
    if (root / "memory.json").exists():
        memory = json.loads((root / "memory.json").read_text())
    md = render(root, found, rows, memory, figures, path.parent, methods, task_methods, families)
    path.write_text(md)
    return md


def render(root, found, rows, memory, figures, here, methods, task_methods, families) -> str:
    import torch
    first = next(iter(next(iter(found.values())).values()))
    cfg = first["config"]
    template, words = run_prompt(cfg)
    model = f"`{cfg['model']}`"
    if cfg["model"] == models.SMOLLM2["alias"]:
        model += say("smollm2")
    notes, spreads = [], []
    for row in rows.values():
        m, walls = row["method"], row["wall"]
        if f"note {m.name}" in pieces():
            notes.append(say(f"note {m.name}", title=m.title, steps=m.steps, lr=flag(m, "--lr"),
                             seeds=joined(m.seeds, ", "), candidates=", ".join(FULL_LRS)))
        # a run that shared the cores with other work took longer: say so, from the numbers
        if len(walls) > 1 and max(walls) > 1.5 * min(walls):
            spreads.append(say("spread", title=m.title, low=f"{min(walls):.0f}",
                             high=f"{max(walls):.0f}"))
    per_seed = ["| method | " + " | ".join(f"seed {s}" for s in SEEDS) + " |",
                "|---|" + "---|" * len(SEEDS)]
    for name, by_seed in found.items():
        cells = [pct(by_seed[s]["test"]) if s in by_seed else "—" for s in SEEDS]
        per_seed.append(f"| {rows[name]['method'].title} | " + " | ".join(cells) + " |")
    curves = make_figure(root, figures, methods, found) if figures is not None else None
    curve_text = ""
    if curves is not None:
        curve_text = "\n\n" + say("curves", path=os.path.relpath(curves, here), root=root,
                                folder=os.path.relpath(curves.parent, here), test_n=first["test_n"],
                                eval_max=cfg["eval_max"])
    task_runs = collect(root, task_methods)
    task_text = ""
    if task_runs:
        task_text = "\n\n" + task_section(found, rows, task_runs, task_methods, root)
    vmethods = variant_methods(root, families)
    commands = ["python " + " ".join(m.command(s, run_dir(root, m, s), 2))
                for m in [*methods, *task_methods] for s in m.seeds]
    commands += [" ".join(memory_command(root, 2)), f"python plot.py {root} --group -o figures"]
    threads = sorted({t for r in rows.values() for t in r["threads"]})
    now = datetime.datetime.now(datetime.timezone.utc)
    return say("page", root=root, date=f"{now:%Y-%m-%d %H:%M}",
               cores=os.cpu_count(), arch=platform.machine(), torch=torch.__version__,
               device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU",
               python=platform.python_version(), model=model, dtype=cfg["dtype"],
               prompt=json.dumps(template), words=", ".join(repr(w) for w in words),
               batch=cfg["batch_size"], eps=f"{cfg['eps']:g}", seed=cfg["seed"], k=cfg["k"],
               train=cfg["k"] * len(words), seeds=", ".join(map(str, SEEDS)),
               test_n=first["test_n"], dev_n=first["dev_n"],
               rows="\n".join(sst2_row(r) for r in rows.values()), threads=joined(threads),
               notes="\n".join(notes + spreads), per_seed="\n".join(per_seed), curves=curve_text,
               tasks=task_text, variants=variant_section(found, rows, collect(root, vmethods),
                                                        vmethods, families, memory),
               memory=memory_table(root, memory), differences=differences(rows, memory, cfg),
               sizing=sizing(rows, root, cfg), commands="\n".join(commands),
               gpu=gpu_section(root)) + "\n"


def sst2_row(row: dict) -> str:
    m, (dm, ds) = row["method"], row["dev"]
    n_dev = row.get("dev_seeds", row["n"])
    dev = pct(dm, ds) + f" (n = {n_dev})" if n_dev > 1 else pct(dm) + " (one run)"
    trainable = f"{row['trainable']:,}" if m.steps else "0"
    peak = f"{max(row['peak']):.0f} MB" if row["peak"] else "—"
    return (f"| {m.title} | {trainable} | {row['steps']} | {row['forwards']} | {row['backwards']} "
            f"| {fmt_acc(row)} | {dev} | {fmt_time(row['wall'])} | {peak} | {m.paper} |")


def make_figure(root: Path, figures: Path, methods, found) -> Path | None:
    import plot
    groups = [(m.name, [plot.curves(run_dir(root, m, s) / "log.jsonl") for s in found[m.name]])
              for m in methods if m.name in found and m.steps]
    if not groups:
        return None
    path = figures / "curves.png"
    try:
        plot.plot_runs(groups, path, "16-shot SST-2: mean over data seeds (band: min..max)")
    except UsageError as e:
        # no matplotlib: the table is still written
        print(f"results: no figure ({e})", file=sys.stderr)
        return None
    return path


def task_row(task, n_classes, test_n, zs, lora, lr, adam, paper="91.4") -> str:
    def wall(r):
        # median over the runs
        return f"{float(np.median(r['wall'])):.0f} s" if r and r["wall"] else "—"
    return (f"| {task} | {n_classes} | {test_n} | {fmt_acc(zs)} | {fmt_acc(lora)} | {lr} "
            f"| {fmt_acc(adam)} | {gap(lora, zs)} | {gap(adam, lora)} | {paper} "
            f"| {wall(lora)} / {wall(adam)} |")


def task_section(found, rows, task_runs, task_methods, root) -> str:
    """One row per task: zero-shot, MeZO-LoRA at the candidate whose probe has the better dev
    accuracy, Adam-LoRA and the gaps; every candidate; runs outside the protocol; prompts; costs."""
    by_task: dict[str, list[Method]] = {}
    for m in task_methods:
        by_task.setdefault(m.task, []).append(m)
    # finished runs in the candidates' folders that the protocol did not ask for
    spare = collect(root, [replace(m, seeds=tuple(s for s in TASK_SEEDS if s not in m.seeds))
                           for m in task_methods if "mezo-lora" in m.name])
    table, detail, prompts, costs, verdicts, others = [], [], [], [], [], []
    if all(name in rows for name in ("zero-shot", "mezo-lora", "adam-lora")):
        zs, lora, adam = rows["zero-shot"], rows["mezo-lora"], rows["adam-lora"]
        lr = flag(lora["method"], "--lr")
        table.append(task_row("sst2 (above)", 2, zs["test_n"], zs, lora, lr, adam))
    for task, ms in by_task.items():
        stats = summarise(task_runs, ms)
        zs, adam = stats.get(f"{task}/zero-shot"), stats.get(f"{task}/adam-lora")
        candidates = [stats[m.name] for m in ms if "mezo-lora" in m.name and m.name in stats]
        if not candidates and zs is None:
            continue

        def probe_dev(r):
            return task_runs[r["method"].name].get(r["method"].seeds[0], {}).get("dev", -1.0)

        def lr_of(r):
            return flag(r["method"], "--lr")
        best = max(candidates, key=lambda r: (probe_dev(r), -float(lr_of(r))), default=None)
        some = next(iter(task_runs[next(m.name for m in ms if m.name in task_runs)].values()))
        table.append(task_row(task, len(tasks.TASKS[task].labels), some["test_n"], zs, best,
                              lr_of(best) if best else "—", adam, PAPER_LORA.get(task, "—")))
        for r in candidates:
            kept = "**kept**" if r is best else ""
            detail.append(f"| {task} | {lr_of(r)} | {pct(probe_dev(r))} | {fmt_acc(r)} | {kept} |")
            for seed, x in sorted(spare.get(r["method"].name, {}).items()):
                others.append(f"{task} lr {lr_of(r)} seed {seed}: dev {pct(x['dev'])}, "
                              f"test {pct(x['test'])}")
        template, words = run_prompt(some["config"])
        prompts.append(f"| {task} | `{json.dumps(template)}` | {', '.join(map(repr, words))} |")
        walls = [w for r in stats.values() for w in r["wall"]]
        threads = sorted({t for r in stats.values() for t in r["threads"]})
        if walls:
            costs.append(f"{task} {sum(walls) / 60:.0f} min ({len(walls)} runs, "
                         f"{joined(threads)} torch threads)")
        if best and zs:
            to_adam = f", {gap(adam, best)} to Adam" if adam else ""
            verdicts.append(f"{task} {gap(best, zs)}{to_adam}")
    sst2 = {m.name.split("/")[1].split("-lr")[0]: m for m in task_methods}
    other_text = "\n" + say("others", runs="; ".join(others)) + "\n" if others else ""
    return say("tasks", k=rows["mezo-lora"]["config"]["k"] if "mezo-lora" in rows else 16,
               seeds=", ".join(map(str, TASK_SEEDS)), lrs=", ".join(MEZO_LRS), first=TASK_SEEDS[0],
               mezo_steps=sst2["mezo-lora"].steps, adam_steps=sst2["adam-lora"].steps,
               adam_lr=flag(sst2["adam-lora"], "--lr"), rows="\n".join(table),
               verdicts="; ".join(verdicts), detail="\n".join(detail), others=other_text,
               prompts="\n".join(prompts), costs="; ".join(costs))


def variant_section(found, rows, variant_runs, vmethods, families, memory=None) -> str:
    """One row per update rule and for the prefix at its lr picked on dev, beside ZO-SGD on the same
    seeds; each against ZO-SGD, the probes that tied, each rule's extra memory; every probe."""
    lora_runs = found.get("mezo-lora", {})
    sgd = [lora_runs[x] for x in TASK_SEEDS if x in lora_runs]
    base = mean_std([r["test"] for r in sgd]) if sgd else None
    table, detail, against, reading = [], [], [], []
    cfg, one = sgd_config(found)
    sizes = dict(first=TASK_SEEDS[0], steps=vmethods[0].steps if vmethods else 0,
                 test_n=one["test_n"], dev_n=one["dev_n"])
    seeds = ", ".join(map(str, TASK_SEEDS))
    intro = say("variants", k=cfg["k"], batch=cfg["batch_size"], seeds=seeds, **sizes)
    if sgd:
        lr = flag(rows["mezo-lora"]["method"], "--lr")
        wall = fmt_time([r["wall_s"] for r in sgd if r["wall_s"]])
        table.append(f"| MeZO-LoRA, ZO-SGD | {lr} | {pct(*base)} (n = {len(sgd)}) | 2 | {wall} "
                     f"| {PAPER_LORA['sst2']} |")
    for name, (title, _, _, paper_figure) in families.items():
        candidates = [m for m in vmethods if m.name.startswith(name + "-lr")]
        stats = summarise(variant_runs, candidates)
        probe = {m.name: variant_runs.get(m.name, {}).get(m.seeds[0]) for m in candidates}
        for m in [m for m in candidates if probe[m.name]]:
            x = probe[m.name]
            detail.append(f"| {title} | {flag(m, '--lr')} | {pct(x['dev'])} | {pct(x['test'])} |")
        # decided once every probe has run
        kept = next((m for m in candidates if len(m.seeds) > 1), None)
        r = stats.get(kept.name) if kept else None
        if r:
            table.append(f"| {title} | {flag(kept, '--lr')} | {fmt_acc(r)} "
                         f"| {r['forwards'] / r['steps']:g} | {fmt_time(r['wall'])} "
                         f"| {paper_figure} |")
        if r and base:
            diff = 100 * (r["test"][0] - base[0])
            within = abs(diff) <= 100 * max(r["test"][1], base[1])
            against.append(f"{title}: {diff:+.1f}" + (say("within") if within else ""))
        devs = {flag(m, "--lr"): probe[m.name]["dev"] for m in candidates if probe[m.name]}
        if kept and len(devs) > 1 and len(set(devs.values())) == 1:
            reading.append(say("tie", title=title, dev=pct(next(iter(devs.values()))),
                               lrs=" and ".join(devs)))
    if not detail:
        return intro + "\n\n" + say("variants not run")
    if against:
        reading.insert(0, say("against", sgd=pct(base[0]), against="; ".join(against)))
    threads = sorted({r["threads"] for seeds in variant_runs.values() for r in seeds.values()
                      if r.get("threads")})
    if threads:
        reading.append(say("variants wall", threads=" or ".join(map(str, threads))))
    return intro + "\n\n" + say("variants table", rows="\n".join(table), reading="\n".join(reading),
                                  memory="\n".join(rule_memory(memory) + [""]),
                                  detail="\n".join(detail), **sizes)


def sgd_config(found: dict) -> tuple[dict, dict]:
    """The config and the stats of the first finished run."""
    one = next(iter(next(iter(found.values())).values()))
    return one["config"], one


def rule_memory(memory: dict | None) -> list[str]:
    """Each rule's peak above plain MeZO in the memory table, against the size of its buffers."""
    by = {r["case"]: r for r in memory["rows"]} if memory else {}
    full = by.get("mezo-full")
    cases = [c for c in RULE_CASES if c in by and "-full-" in c]
    if not (full and cases):
        return []
    # one float32 buffer of every trainable value, MB
    one = full.get("trainable", 0) * 4 / 2**20
    extra = ", ".join(f"{c.split('-')[2]} {by[c]['peak_mb'] - full['peak_mb']:+.0f} MB"
                      for c in cases)
    text = say("rule memory", extra=extra, values=f"{full.get('trainable', 0):,}", one=f"{one:.0f}")
    lora = by.get("mezo-lora", {})
    diffs = [by[c]["peak_mb"] - lora["peak_mb"] for c in RULE_CASES if c in by and "-lora-" in c]
    if lora.get("trainable") and diffs:
        text += say("rule memory lora", lora=f"{lora['trainable'] * 4 / 2**20:.1f}",
                    low=f"{min(diffs):+.0f}", high=f"{max(diffs):+.0f}")
    return ["", text]


def memory_table(root: Path, memory: dict | None) -> str:
    if not memory:
        return say("memory not run", command=" ".join(memory_command(root, 2)))
    names = {"inference": "inference (one forward, no autograd)", "mezo-lora": "MeZO step, LoRA",
             "mezo-full": "MeZO step, full-parameter", "adam-lora": "first-order step (Adam), LoRA",
             "adam-full": "first-order step (Adam), full-parameter",
             "backward-lora": "forward + backward, LoRA"}
    for mode, title in (("lora", "LoRA"), ("full", "full-parameter")):
        for rule in rules.RULES:
            names[f"mezo-{mode}-{rule}"] = f"MeZO step, {title}, --rule {rule}"
    ref, lines = memory["rows"][0], []
    for r in memory["rows"]:
        values = f"{r['trainable']:,}" if r["case"] != "inference" and "trainable" in r else "—"
        lines.append(f"| {names.get(r['case'], r['case'])} | {values} | {r['peak_mb']:.0f} | "
                     f"{r['above_model_mb']:.0f} | {r['peak_mb'] / ref['peak_mb']:.3f} |")
    return say("memory", batch=memory["batch_size"], model=memory["model"], rows="\n".join(lines),
               device=memory["device"], threads=memory["threads"])


def differences(rows: dict, memory, cfg) -> str:
    """Sentences that follow from the numbers: each claim is conditioned on what the table shows."""
    out = []

    def get(name):
        return rows[name]["test"][0] * 100 if name in rows else None
    zs, lora, full, adam = get("zero-shot"), get("mezo-lora"), get("mezo-full"), get("adam-lora")
    if zs is not None and rows["zero-shot"]["model"] == models.SMOLLM2["alias"]:
        out.append(say("start", zs=f"{zs:.1f}", paper=rows["zero-shot"]["method"].paper))
    if zs is not None and lora is not None:
        r = rows["mezo-lora"]
        paper_gain = paper(r["method"]) - paper(rows["zero-shot"]["method"])
        times = 100_000 * 2 * 64 / (r["forwards"] * cfg["batch_size"])
        out.append(say("lora", gain=f"{lora - zs:+.1f}", steps=r["steps"], forwards=r["forwards"],
                       paper_gain=f"+{paper_gain:.1f}", times=f"{times:,.0f}"))
    if zs is not None and full is not None:
        r, m = rows["mezo-full"], rows["mezo-full"]["method"]
        moved = f"moves {full - zs:+.1f} points from"
        if abs(full - zs) < 2:
            moved = "stays within 2 points of"
        top = flag(m, "--top-layers")
        versus = ""
        if "mezo-lora" in rows:
            versus = f" against LoRA's {flag(rows['mezo-lora']['method'], '--lr')}"
        top = f", the top {top} blocks" if top else ""
        out.append(say("full", values=f"{r['trainable']:,}", top=top, moved=moved,
                       steps=r["steps"], lr=flag(m, "--lr", "1e-3"), against=versus))
        step = {x["case"]: x for x in memory["rows"]}.get("mezo-full") if memory else None
        if step and r.get("step_time"):
            out.append(say("full step", values=f"{step['trainable']:,}", threads=memory["threads"],
                           seconds=f"{step['seconds']:.0f}", fast=f"{r['step_time']:.1f}"))
        if lora is not None:
            lr_row = rows["mezo-lora"]
            seed42 = f"; seed 42 alone: {pct(lr_row['seed42'])}" if "seed42" in lr_row else ""
            out.append(say("full vs lora", order="above" if full > lora else "below",
                           full=f"{full:.1f}", steps=r["steps"], n=r["n"], lora=f"{lora:.1f}",
                           lora_n=lr_row["n"], lora_steps=lr_row["steps"], seed42=seed42,
                           paper_gap=f"{paper(lr_row['method']) - paper(m):.1f}"))
    if adam is not None and lora is not None:
        a, r = rows["adam-lora"], rows["mezo-lora"]
        out.append(say("adam", adam=f"{adam:.1f}", steps=a["steps"], forwards=r["forwards"],
                       ratio=f"{r['forwards'] / a['forwards']:.1f}x",
                       order="above" if adam > lora else "below", lora=f"{lora:.1f}",
                       paper=paper(a["method"]),
                       paper_gap=f"{paper(a['method']) - paper(r['method']):.1f}",
                       why=say("adam ahead" if adam > lora else "adam behind")))
        if a["wall"] and r["wall"]:
            out.append(say("adam wall", adam=fmt_time(a["wall"]), lora=fmt_time(r["wall"]),
                           test_n=a["test_n"]))
    if memory:
        out += memory_reading(memory)
    return "\n".join(out or [say("no runs")])


def memory_reading(memory: dict) -> list[str]:
    by = {r["case"]: r["peak_mb"] for r in memory["rows"]}
    inf = by.get("inference")
    names = (("mezo-lora", "MeZO-LoRA"), ("mezo-full", "MeZO full"), ("adam-lora", "Adam-LoRA"),
             ("adam-full", "Adam full"))
    parts = [f"{name} {by[case] / inf:.2f}x" for case, name in names if case in by]
    if not (inf and parts):
        return []
    peak = max(by[c] / inf for c in ("mezo-lora", "mezo-full") if c in by)
    verdict = say("memory flat") if peak <= 1.05 else say("memory above", peak=f"{peak:.2f}")
    return [say("memory reading", ratios=", ".join(parts), verdict=verdict,
                batch=memory["batch_size"])]


def sizing(rows: dict, root: Path, cfg: dict) -> str:
    import mezo
    lines = []
    total = sum(sum(r["wall"]) for r in rows.values())
    if total:
        lines.append(say("sizing total", minutes=f"{total / 60:.0f}"))
    if "mezo-lora" in rows:
        r = rows["mezo-lora"]
        lr, default = flag(r["method"], "--lr", "1e-3"), mezo.Config()
        seed42 = say("sizing seed42", test=pct(r["seed42"])) if "seed42" in r else ""
        lines.append(say("sizing lora", steps=r["steps"], lr=lr, default_steps=default.steps,
                         default_lr=f"{default.lr:g}", seed42=seed42, n=r["n"],
                         mean=pct(*r["test"]),
                         risk=say("sizing risk") if float(lr) > default.lr else ""))
    if "adam-lora" in rows:
        r = rows["adam-lora"]
        train = cfg["k"] * len(run_prompt(cfg)[1])
        lines.append(say("sizing adam", steps=r["steps"], lr=flag(r["method"], "--lr"), train=train,
                         passes=f"{r['steps'] * r['config']['batch_size'] / train:g}"))
    if "mezo-full" in rows:
        r = rows["mezo-full"]
        lines.append(say("sizing full", steps=r["steps"], wall=fmt_time(r["wall"]),
                         step_time=f"{r.get('step_time') or 0:.2f}",
                         ratio=f"{r.get('ratio') or 0:.2f}"))
    probes = [(m, run_stats(run_dir(root, m, 42))) for m in FULL_PROBES
              if finished(run_dir(root, m, 42), m)]
    if probes:
        lines.append(say("sizing probes", steps=probes[0][1]["steps"],
                         probes=", ".join(f"lr {flag(m, '--lr')} {pct(s['dev'])}"
                                          for m, s in probes),
                         minutes=f"{sum(s['wall_s'] or 0 for _, s in probes) / 60:.0f}"))
    lines.append(say("sizing end", eval_max=cfg["eval_max"]))
    return "\n".join(lines)


def gpu_section(root: Path) -> str:
    found = sorted(root.glob("roberta-*/**/log.jsonl"))
    if not found:
        return say("gpu not run", root=root)
    lines = []
    for log in found:
        tests = [r for r in runs.read_log(log) if r.get("split") == "test"]
        if tests:
            lines.append(f"| {log.parent.relative_to(root)} | {tests[-1]['step']} "
                         f"| {pct(tests[-1]['accuracy'])} |")
    return say("gpu table", rows="\n".join(lines))


def cmd_table(args) -> int:
    full = full_method(Path(args.root))
    methods = METHODS + ([full] if full else [])
    write_table(Path(args.root), Path(args.output), Path(args.figures), methods)
    print(f"results: wrote {args.output}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="results.py", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("plan", "run", "table"))
    p.add_argument("--root", default="runs/results",
                   help="where the runs live (default runs/results)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads per run (default: cores)")
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
