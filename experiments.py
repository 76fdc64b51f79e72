"""The runs behind RESULTS.md: what runs, with which flags, in what order; each resumable.

    python results.py plan     # the runs, their commands and the expected time; runs nothing
    python results.py run      # every run into runs/results (--jobs 2 --threads 1: two at a time);
                               # finished runs are skipped and a stopped one resumes: run it again

Every task at MeZO's budget: zero-shot; MeZO-LoRA to 1,000 steps, stopping at 100 and 400 for the
whole test set (a stop is a process: the run resumes from its checkpoint), at the lr its probes
pick on dev (a probe whose loss runs away is stopped; one lr lower when the smallest wins);
Adam-LoRA for 32 steps. Also SST-2 in low precision, the update rules and MeZO-prefix (100 steps),
and MeZO full-parameter. The study is chains of runs (a task, the bfloat16 runs, a rule family,
...), `--jobs` chains at a time.
Each run is `python mezo.py ...` in its own process; its wall time (process start to exit, model
loading included, summed over its stops) is kept in timing.json beside its log.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from mezo import baseline, checkpoints, errors, rules, runs  # noqa: E402

# LM-BFF's data seeds, as in the paper
SEEDS = (13, 21, 42, 87, 100)
# Test rows of each task, for the time estimate only (the others: 2,000)
TEST_ROWS = dict(sst2=872, sst5=2210, trec=500, rte=277)
# Seconds a MeZO-LoRA step on 2 cores, for the time estimate only: a step's time follows the padded
# length of its batch of 8 (SmolLM2's tokenizer, data seed 13, mean of 200 draws: sst2 54 tokens,
# sst5 42, mr 44, cr 32, mpqa 10, subj 52, trec 27, rte 175). 2.4 s at SST-2's length and 4.8 at
# RTE's were measured; the others are on the line through those two. Measured on a 2-core Intel
# machine (2026-12-05); a 2-core AMD EPYC took 5.7 s at SST-2 and 14 s at RTE (--jobs 2 --threads 1,
# 2026-12-07), so the plan says which machine its times are from (PACE).
PACE = "a 2-core Intel machine; a 2-core AMD EPYC took about 2.5x that"
TASK_STEP_S = dict(sst2=2.4, sst5=2.2, mr=2.2, cr=2.0, mpqa=1.5, subj=2.4, trec=1.9, rte=4.8)
# An Adam-LoRA step (a forward and a backward) against a MeZO-LoRA one (two forwards) on the same
# batch: 2.2 s against 2.4 at SST-2's length; 13 s against 14 at RTE's on the AMD EPYC
ADAM_STEP = 2.2 / 2.4
# Every run: 16-shot, batch 8, the default offline model and the task's prompt. During training the
# test score is taken on 32 rows spread through the test set (before 6f449f8: its first 32); the
# last evaluation uses the whole test set.
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
    # steps at which the run stops, is evaluated on the whole test set and resumes (the last: steps)
    stops: tuple[int, ...] = ()
    # its folder under the results root, when not its name (a probe's run that goes on)
    folder: str = ""
    # a candidate lr's probe through the budget: stopped once its training loss runs away (diverged)
    prune: bool = False

    def command(self, seed: int, out: Path, threads: int, steps: int | None = None) -> list[str]:
        steps = self.steps if steps is None else steps
        return ["mezo.py", "--task", self.task, *COMMON, *self.flags, "--steps", str(steps),
                "--data-seed", str(seed), "--threads", str(threads), "--out", str(out)]


# MeZO full-parameter: 100-step probes at each candidate lr on data seed 42 (dev decides), then
# FULL_STEPS steps at the winner, one seed: a step over every value costs seconds even compiled.
FULL_LRS, FULL_STEPS = ("3e-6", "1e-5", "3e-5"), 1000
FULL_PROBES = [Method(f"probe/mezo-full-lr{lr}", f"MeZO full-parameter, lr {lr} (probe)",
                      ["--mode", "full", "--fast", "--lr", lr, "--eval-every", "50"], 100, 4.5, "",
                      seeds=(42,))
               for lr in FULL_LRS]
# Every task at MeZO's budget: MeZO-LoRA to 1,000 steps, stopping at 100 and 400 for the whole test
# set. Each task's lr by a probe on dev, never on test: every candidate runs the first data seed
# through the whole budget, and the one with the higher dev accuracy at its end runs the other
# seeds. (A probe of 100 steps picked 2e-3 on SST-2 and SST-5, and at 2e-3 both diverged between
# steps 100 and 200: the lr is picked for the budget it is reported at.) A probe whose training loss
# runs away is stopped there and is out of the pick (`diverged`). SST-2 has 5 seeds, the others 2.
# Adam-LoRA: 32 steps at 1e-3. The default lr is probed first: the bfloat16 runs compare with it.
TASKS_HERE = ("sst5", "mr", "cr", "mpqa", "subj", "trec", "rte")
TASKS = ("sst2", *TASKS_HERE)
TASK_SEEDS, MEZO_LRS, BUDGET = (13, 21), ("1e-3", "5e-4", "2e-3"), (100, 400, 1000)
# When the pick is the grid's smallest lr, or every candidate diverged, the grid goes one lr lower
# (a pick should not sit at the grid's edge) and the pick is among all four. On SST-2, lr 1e-3
# reached dev 84.4 at step 200 and then ran away after step 500.
MEZO_LOWER_LR = "2e-4"
# A probe has diverged at step s (a multiple of the window, the budget's first stop) when its mean
# training loss over the window ending at s is over DIVERGE_FACTOR times the lowest it had been: its
# mean over its first tenth of a window (the loss it started from) or over any earlier window. At lr
# 2e-3 the loss of SST-2 went 0.82 -> 1.69 from the first 100 steps to the next 100 (SST-5: 1.79 ->
# 3.03) and never came back, while |projected_grad| grew a hundredfold; the probes that did not
# diverge lowered their loss. TREC's ran away within its first window (2.35 over steps 1-10, then
# 4.35 over 1-100) or after it had fallen (lr 5e-4: 1.55 over steps 201-300, 2.79 over 401-500),
# which a comparison with the first window alone missed: lr 2e-3, at chance on dev, had been picked.
DIVERGE_FACTOR = 1.5
# seconds between two looks at a running probe's log
POLL_S = 10.0
ADAM_STEPS = 32
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
# SST-2 with the model in bfloat16, 400 steps on seed 13 at lr 1e-3, beside SST-2's float32 probe
# at that lr at its step 400: LoRA in bfloat16 (the default, the model's dtype) or float32
# (--lora-dtype), at the default ε and at the ε that docs/precision.md's table recommends for
# bfloat16 (measured with LoRA in float32)
PRECISION_LR = "1e-3"
PRECISION = [Method(f"sst2/precision/bfloat16{'-lora-float32' if lora_flag else ''}-eps{eps}"
                    f"-lr{PRECISION_LR}",
                    f"bfloat16, LoRA in {'float32' if lora_flag else 'bfloat16'}, ε {eps}",
                    ["--mode", "lora", "--lr", PRECISION_LR, "--eval-every", "100", "--dtype",
                     "bfloat16", *lora_flag, "--eps", eps], 400, 1.4, "", seeds=(13,),
                    stops=(100, 400))
             for lora_flag in ((), ("--lora-dtype", "float32")) for eps in ("1e-3", "3e-2")]
# process start + model load; forward seconds per evaluated row (batch 8, 2 cores)
LOAD_S, ROW_S = 15.0, 0.05
# bench/memory.py's cases, each in MEMORY_REPEAT fresh processes, the median kept (a first-order
# step's peak differed by 8% from one process to the next); the full-parameter MeZO step is slow
MEMORY_REPEAT = 3
MEMORY_S = 480.0 * MEMORY_REPEAT
RULE_CASES = [f"mezo-{mode}-{rule}" for mode in ("lora", "full") for rule in rules.RULES]


def flag(m: Method, name: str, default=None):
    return m.flags[m.flags.index(name) + 1] if name in m.flags else default


def run_dir(root: Path, method: Method, seed: int) -> Path:
    return root / (method.folder or method.name) / f"seed{seed}"


def probed(name, title, flags, lrs, lr=None, paper="—"):
    """An SST-2 MeZO method to the budget's first stop, whose lr is probed: each candidate runs the
    first seed; the chosen `lr`, every seed."""
    return [Method(f"{name}-lr{x}", f"{title}, lr {x}", [*flags, "--lr", x, "--eval-every", "25"],
                   BUDGET[0], 1.7, paper, seeds=TASK_SEEDS if x == lr else TASK_SEEDS[:1])
            for x in lrs]


def pick_lr(root: Path, candidates: list[Method]) -> str | None:
    """The candidate whose probe (first seed) ends with the higher dev accuracy, the smaller lr on a
    tie, a diverged one never; None until every probe has concluded, or when all diverged."""
    outs = [(m, run_dir(root, m, m.seeds[0])) for m in candidates]
    outs = [(m, out, diverged(out, m)) for m, out in outs]
    if not all(at is not None or finished(out, m) for m, out, at in outs):
        return None
    dev = {flag(m, "--lr"): run_stats(out, m.steps)["dev"] for m, out, at in outs if at is None}
    return max(dev, key=lambda x: (dev[x], -float(x))) if dev else None


def full_method(root: Path) -> Method | None:
    """The full-parameter row at the probed lr; None until every probe has finished."""
    lr = pick_lr(root, FULL_PROBES)
    return None if lr is None else full_row(lr)


def full_row(lr: str) -> Method:
    flags = ["--mode", "full", "--fast", "--lr", lr, "--eval-every", "100"]
    return Method("mezo-full", f"MeZO full-parameter (--fast, lr {lr})", flags, FULL_STEPS, 4.5,
                  "90.5", seeds=(42,))


def task_probes(task: str, lower: bool = False) -> list[Method]:
    """A MeZO-LoRA probe per candidate lr: the first seed through every stop, stopped if it
    diverges; with `lower`, MEZO_LOWER_LR's too."""
    seeds = SEEDS if task == "sst2" else TASK_SEEDS
    return [Method(f"{task}/mezo-lora-lr{x}", f"MeZO-LoRA, lr {x}",
                   ["--mode", "lora", "--eval-every", str(BUDGET[0]), "--lr", x], BUDGET[-1],
                   TASK_STEP_S[task],
                   PAPER_LORA.get(task, "—"), seeds=seeds[:1], task=task, stops=BUDGET, prune=True)
            for x in (*MEZO_LRS, *([MEZO_LOWER_LR] if lower else []))]


def needs_lower(root: Path, task: str) -> bool:
    """Whether the grid goes one lr lower: its probes have concluded and the pick is its smallest
    lr, or every one diverged."""
    grid = task_probes(task)
    if not all(concluded(run_dir(root, m, m.seeds[0]), m) for m in grid):
        return False
    lr = pick_lr(root, grid)
    return lr is None or float(lr) == min(map(float, MEZO_LRS))


def task_lr(root: Path, task: str) -> str | None:
    """The task's MeZO-LoRA lr, by its probes; None until they decide it (or if all diverged)."""
    return pick_lr(root, task_probes(task, needs_lower(root, task)))


def task_methods(task: str, root: Path | None = None) -> list[Method]:
    """zero-shot, the MeZO-LoRA probes, the chosen lr's MeZO-LoRA on every seed (its probe is the
    first) and Adam-LoRA, as far as the runs in `root` have decided them: <task>/<method>."""
    seeds = SEEDS if task == "sst2" else TASK_SEEDS
    probes = task_probes(task, root is not None and needs_lower(root, task))
    # task_lr's pick, on the probes just made
    lr = pick_lr(root, probes) if root is not None else None
    chosen = [dataclasses.replace(m, name=f"{task}/mezo-lora", seeds=seeds, prune=False,
                                  folder=m.name) for m in probes if flag(m, "--lr") == lr]
    adam = ["--optimizer", "adam", "--mode", "lora", "--lr", "1e-3", "--eval-every", "8"]
    return [Method(f"{task}/zero-shot", "zero-shot", ["--eval-every", "0"], 0, 0.0, "",
                   seeds=seeds[:1], task=task),
            *probes, *chosen,
            Method(f"{task}/adam-lora", "Adam-LoRA", adam, ADAM_STEPS,
                   ADAM_STEP * TASK_STEP_S[task], "", seeds=seeds, task=task)]


def task_plan(root: Path) -> list[Method]:
    """Every task's methods as far as the probes have decided them."""
    return [m for t in TASKS for m in task_methods(t, root)]


def variant_methods(root: Path | None, families=None) -> list[Method]:
    """Every family's methods as far as its probes have decided them."""
    out = []
    for name, (title, flags, lrs, paper) in (families or VARIANT_FAMILIES).items():
        lr = pick_lr(root, probed(name, title, flags, lrs)) if root else None
        out += probed(name, title, flags, lrs, lr=lr, paper=paper)
    return out

# -----------------------------------------------------------------------------
# Running


def expected_s(m: Method) -> float:
    every = int(flag(m, "--eval-every", 0))
    evals = m.steps // every if m.steps and every else 0
    # start and middle evaluations on dev and a test slice; the whole test set at each stop
    stops = len({*m.stops, m.steps})
    rows = (64 if m.steps else 0) + 64 * max(evals - stops, 0) + 32 * stops \
        + stops * TEST_ROWS.get(m.task, 2000)
    return LOAD_S + rows * ROW_S + m.steps * m.step_s


def steps_done(out: Path) -> int:
    """The step a run's folder has reached (its summary.json), -1 before its first stop."""
    try:
        return int(json.loads((out / "summary.json").read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def reached(out: Path) -> int:
    """The step a run would resume from: its checkpoint's (saved every 100 steps), its last stop's,
    or, where its config is there to resume with (run.json or the checkpoint), its last logged
    step's, which a resume rebuilds from the log without forwards: the latest of them; 0 before it
    has begun. For the plan's progress, not for finished."""
    step = max(steps_done(out), 0)
    try:
        from safetensors import safe_open
        with safe_open(str(out / checkpoints.CHECKPOINT), "pt") as f:
            step = max(step, int((f.metadata() or {})["step"]))
    except Exception:  # no checkpoint yet, or one being replaced
        pass
    if ((out / checkpoints.CHECKPOINT).exists() or (out / checkpoints.RUN_CONFIG).exists()) and (
            out / "log.jsonl").exists():
        with contextlib.suppress(errors.UsageError):  # (a damaged log: the resume will say so)
            step = max([step] + [r["step"] for r in runs.read_log(out / "log.jsonl")
                                 if "projected_grad" in r])
    return step


def finished(out: Path, m: Method, at: int | None = None) -> bool:
    """The run reached step `at` (m.steps) and evaluated there on every test row: a stop of the run
    (it may have gone on since, from a resume)."""
    at = m.steps if at is None else at
    if steps_done(out) < at:
        return False
    try:
        log = runs.read_log(out / "log.jsonl")
    except (OSError, ValueError):  # a log that cannot be read: not finished
        return False
    return any(r.get("split") == "test" and r["step"] == at for r in log)


def diverged(out: Path, m: Method) -> int | None:
    """The step at which a pruned probe's training loss ran away (see DIVERGE_FACTOR), from its log;
    None while it has not, and for any other run."""
    window = BUDGET[0]
    try:
        log = runs.read_log(out / "log.jsonl") if m.prune else []
    except (OSError, ValueError):
        return None
    loss = {r["step"]: r["loss"] for r in log if "split" not in r and "loss" in r}

    def mean(first: int, last: int) -> float | None:
        span = range(first, last + 1)
        return float(np.mean([loss[t] for t in span])) if all(t in loss for t in span) else None
    lowest, end = mean(1, max(1, window // 10)), window
    while lowest is not None and (late := mean(end - window + 1, end)) is not None:
        if late > DIVERGE_FACTOR * lowest:
            return end
        lowest, end = min(lowest, late), end + window
    return None


def concluded(out: Path, m: Method) -> bool:
    """Finished, or a probe stopped because it diverged: nothing of it is left to run."""
    return finished(out, m) or diverged(out, m) is not None


def all_methods(root: Path) -> list[Method]:
    """Every run of the page, as far as the probes have decided them."""
    full = [m for m in [full_method(root)] if m]
    return task_plan(root) + PRECISION + variant_methods(root) + FULL_PROBES + full


def undecided_s(root: Path) -> float:
    """Expected seconds of the runs that wait on a pick, so not in the plan yet: each task's chosen
    lr on its other seeds, each variant family's on its second, the full-parameter run. Not
    counted: the lower lr's probe that a pick at the grid's edge adds, and a task whose every probe
    diverged (nothing waits on it)."""
    def waits(task: str) -> bool:
        probes = task_probes(task, needs_lower(root, task))
        return not all(concluded(run_dir(root, m, m.seeds[0]), m) for m in probes)
    left = sum(expected_s(task_probes(t)[0]) * (len(SEEDS if t == "sst2" else TASK_SEEDS) - 1)
               for t in TASKS if task_lr(root, t) is None and waits(t))
    for name, (title, flags, lrs, _) in VARIANT_FAMILIES.items():
        candidates = probed(name, title, flags, lrs)
        if pick_lr(root, candidates) is None:
            left += expected_s(candidates[0]) * (len(TASK_SEEDS) - 1)
    if full_method(root) is None:
        left += expected_s(full_row(flag(FULL_PROBES[0], "--lr")))
    return left


def plan(root: Path, threads: int, methods=None, jobs: int = 1) -> list[tuple[Method, int, Path]]:
    whole = methods is None
    if whole:
        methods = all_methods(root)
    todo = [(m, s, run_dir(root, m, s)) for m in methods for s in m.seeds]
    memory = 0.0 if (root / "memory.json").exists() else MEMORY_S
    # a run part done has the rest of its steps left
    left = sum(expected_s(m) * (1 - reached(out) / max(m.steps, 1))
               for m, _, out in todo if not concluded(out, m)) + memory
    total = sum(expected_s(m) for m, _, _ in todo) + MEMORY_S
    waiting = undecided_s(root) if whole else 0.0
    more = f" + {waiting / 60:.0f} min of runs that wait on a pick" if waiting else ""
    # a 1-thread run steps about as fast as a 2-thread one here (SST-2: 2.45 s a step against 2.4),
    # so --jobs 2 --threads 1 takes about half the time
    wall = f" (about {(left + waiting) / 3600 / jobs:.1f} h at --jobs {jobs})" if jobs > 1 else ""
    print(f"results: {len(todo)} runs + the memory table; expected {total / 60:.0f} min on 2 cores "
          f"from scratch, {left / 60:.0f} min left{more}{wall}; times as measured on {PACE}",
          flush=True)
    return todo


def cmd_plan(args) -> int:
    for m, s, out in plan(Path(args.root), args.threads, jobs=args.jobs):
        done = reached(out)
        state = ("done" if concluded(out, m) else f"~{expected_s(m) / 60:.1f} min" if not done
                 else f"{done}/{m.steps}")
        print(f"  [{state:>9s}] python {' '.join(m.command(s, out, args.threads))}")
    print(f"  [~{MEMORY_S / 60:.1f} min] {' '.join(memory_command(Path(args.root), args.threads))}")
    print("  (then the runs that wait on a pick, in the time above: each task's chosen lr on its "
          "other seeds, once its probes are done, and the full-parameter run at the lr its probes "
          "pick)")
    return 0


def memory_command(root: Path, threads: int) -> list[str]:
    cases = ["inference", "mezo-lora", "mezo-full", "adam-lora", "adam-full", *RULE_CASES]
    return ["python", "bench/memory.py", "--cases", ",".join(cases), "--threads", str(threads),
            "--repeat", str(MEMORY_REPEAT), "--json", str(root / "memory.json")]


class Stopping(runs.StopOnSignal):
    """Ctrl-C, SIGTERM or SIGHUP to `results.py run`: every run under way is asked to stop (SIGTERM:
    mezo.py finishes the step under way and checkpoints it), no run starts after, and `results.py
    run` again resumes them. A second signal kills them at once: each resumes from its last
    checkpoint and its log. The runs are in sessions of their own, so a terminal's Ctrl-C reaches
    this process alone, and it asks each run once."""

    def __init__(self):
        super().__init__()
        self.processes = set()

    def restore(self) -> None:
        super().restore()
        self.signal = self.code = None

    def _asked(self, signum, frame) -> None:
        runs.quiet_if_hung_up()  # (a closed terminal: no write to it may end this process)
        again, name = self.signal is not None, self.NAMES[signum]
        if not again:
            self.signal, self.code = name, 128 + signum
            print(f"results: {name}: each run under way stops once its step is done and "
                  f"checkpointed, and no other starts ({name} again kills them at once)",
                  file=sys.stderr, flush=True)
        for process in list(self.processes):
            process.kill() if again else ask_to_stop(process)

    def started(self, process) -> None:
        self.processes.add(process)
        if self.signal:  # (asked while this one started)
            ask_to_stop(process)


def ask_to_stop(process) -> None:
    """SIGTERM, once: mezo.py stops after the step under way, checkpointed (a second signal would
    stop it at once)."""
    if not getattr(process, "asked", False):
        process.asked = True
        process.terminate()


STOP = Stopping()


def subprocess_runner(cmd: list[str], threads: int, stop=None) -> int:
    """`python mezo.py ...` in a fresh process (its own memory and threads, its own session), from
    this folder; terminated once `stop()` holds (looked at every POLL_S seconds) or STOP is
    asked."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if not sys.stderr.isatty():
        # into a log file: the progress bar once a minute (tqdm reads TQDM_* from the environment),
        # not a line a step from each of --jobs runs woven together
        env.setdefault("TQDM_MININTERVAL", "60")
    with subprocess.Popen([sys.executable, str(ROOT / cmd[0]), *cmd[1:]], env=env,
                          start_new_session=True) as process:
        STOP.started(process)
        try:
            while True:
                try:
                    return process.wait(POLL_S)
                except subprocess.TimeoutExpired:
                    if stop is not None and stop():  # a probe whose loss ran away
                        ask_to_stop(process)
        except BaseException:  # an error here: the run goes with it
            process.kill()
            raise
        finally:
            STOP.processes.discard(process)


def run_one(m: Method, seed: int, out: Path, stop: int, threads: int, runner) -> int:
    """One run of m to step `stop`: afresh, or resumed from its folder. Its wall time adds up in
    timing.json over the processes it took."""
    resume = ((out / checkpoints.CHECKPOINT).exists() or (out / checkpoints.RUN_CONFIG).exists()
              ) and (out / "log.jsonl").exists()
    cmd = m.command(seed, out, threads, stop)
    if not resume and out.exists() and any(out.iterdir()):
        # killed before its first step was logged: nothing to resume, so it starts again
        cmd.append("--overwrite")
    if resume:
        cmd = ["mezo.py", "--resume", str(out), "--steps", str(stop), "--threads", str(threads)]
    print(f"results:   {'(resuming) ' if resume else ''}~{expected_s(m) / 60:.1f} min: "
          f"python {' '.join(cmd)}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    t = time.time()
    code = runner(cmd, threads, stop=(lambda: diverged(out, m) is not None) if m.prune else None)
    path = out / "timing.json"
    timing = dict(wall_s=0.0)
    if resume and path.exists():
        timing = json.loads(path.read_text())
    timing = dict(wall_s=timing["wall_s"] + time.time() - t, threads=threads,
                  command="python " + " ".join(m.command(seed, out, 2)),
                  processes=timing.get("processes", 0) + 1)
    checkpoints.atomic_write(path, lambda tmp: tmp.write_text(json.dumps(timing, indent=1)))
    return code


def run_all(root: Path, threads: int, methods, runner=subprocess_runner,
            memory: bool = True) -> int:
    todo = plan(root, threads, methods)
    t_all = time.time()
    for i, (m, seed, out) in enumerate(todo, 1):
        if STOP.signal:
            return STOP.code
        if concluded(out, m):
            print(f"results: [{i}/{len(todo)}] {m.name} seed {seed}: done, skipped", flush=True)
            continue
        for stop in [s for s in m.stops or (m.steps,) if not finished(out, m, s)]:
            print(f"results: [{i}/{len(todo)}] {m.name} seed {seed}, to step {stop}", flush=True)
            code = run_one(m, seed, out, stop, threads, runner)
            if STOP.signal:
                return STOP.code
            if (at := diverged(out, m)) is not None:
                print(f"results: {m.name} seed {seed} diverged at step {at} (its training loss "
                      f"over {DIVERGE_FACTOR}× its first {BUDGET[0]} steps'): out of the lr pick, "
                      "its stops left are skipped", flush=True)
                break
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
    probes run first, then what they decide (one lr lower, the chosen lr on the other seeds), until
    the runs decide nothing more. One after another."""
    for methods_of in stages:
        known, done = None, None
        while (methods := methods_of(known)) != done:
            code = run_all(root, threads, methods, runner or subprocess_runner, False)
            if code:
                return code
            known, done = root, methods
    return 0


def chains(root: Path, threads: int, only: str = "all", runner=None) -> list:
    """The study as chains of runs that do not wait on one another: SST-2 in bfloat16, each task,
    each variant family, the full-parameter probes and then the run at the lr they pick. Within a
    chain the runs go one after another, the probes before the lr they pick. SST-2's chain comes
    after the other tasks': its 5 seeds are the most runs, so every task reaches the page first."""
    def chain(*stages):
        return lambda: run_stages(root, threads, stages, runner)
    picked = {
        "precision": [chain(lambda r: PRECISION)],
        "tasks": [chain(lambda r, t=t: task_methods(t, r))
                  for t in sorted(TASKS, key=lambda t: t == "sst2")],
        "variants": [chain(lambda r, n=n, spec=spec: variant_methods(r, {n: spec}))
                     for n, spec in VARIANT_FAMILIES.items()],
        "full": [chain(lambda r: FULL_PROBES, lambda r: [m for m in [r and full_method(r)] if m])]}
    return picked[only] if only != "all" else [c for cs in picked.values() for c in cs]


def run_chains(chain_list: list, jobs: int = 1) -> int:
    """The chains, `jobs` at a time (each run with its own threads); the first failure's code."""
    with ThreadPoolExecutor(jobs) as pool:
        codes = list(pool.map(lambda c: c(), chain_list))
    return next((c for c in codes if c), 0)


def cmd_run(args) -> int:
    """Every run of --only's part, --jobs chains at a time; after all of them, the memory table."""
    root, threads = Path(args.root), args.threads
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise errors.UsageError(f"--root {root}: cannot make it ({e.strerror}); pick another "
                                "--root") from None
    # one study per root: a second `results.py run` would start the same runs (each refused by the
    # run folder's own lock, as a failed chain) and add to the same timing.json files
    lock = runs.FolderLock(root, root, "--root")
    STOP.install()
    try:
        code = run_chains(chains(root, threads, args.only), args.jobs)
        if not code and args.only == "all":
            code = run_all(root, threads, [])
        if STOP.signal:
            print(f"results: stopped by {STOP.signal}: each run kept its last step; `python "
                  f"results.py run` again goes on with them", file=sys.stderr)
        return code
    finally:
        STOP.restore()
        lock.release()


# -----------------------------------------------------------------------------
# Reading one run


def run_stats(out: Path, at: int | None = None) -> dict:
    """Dev/test accuracy at step `at` (the run's last by default), the passes up to it, wall time,
    peak memory and trainable values of one run."""
    from safetensors import SafetensorError, safe_open
    log = runs.read_log(out / "log.jsonl")
    try:  # (a clone holds no checkpoint: runs/results keeps the records, not the tensors)
        summary = json.loads((out / "summary.json").read_text())
        trainable, path = summary.get("trainable"), out / checkpoints.RUN_CONFIG
        config = json.loads(path.read_text()) if path.is_file() else None
        if config is None or trainable is None and (out / checkpoints.CHECKPOINT).is_file():
            # a run older than run.json or than summary.json's count: its checkpoint says
            with safe_open(str(out / checkpoints.CHECKPOINT), "pt") as f:
                trainable = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys()
                                if not k.startswith((baseline.ADAM, "rule.")))
                config = json.loads(f.metadata()["config"])
    except (OSError, ValueError, KeyError, SafetensorError) as e:  # deleted to save space, damaged
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise errors.UsageError(f"{out}: cannot read its summary.json, run.json or "
                                f"{checkpoints.CHECKPOINT} ({why}); remove the folder, and "
                                "`python results.py run` runs it again") from None
    at = summary["steps"] if at is None else at
    final = {r["split"]: r for r in log if "split" in r and r["step"] == at}
    passes = next((r for r in reversed(log) if "forwards" in r and r["step"] <= at), {})
    start = {r["split"]: r for r in log if "split" in r and r["step"] == 0}
    timing = {}
    if (out / "timing.json").exists():
        timing = json.loads((out / "timing.json").read_text())
    return dict(test=final["test"]["accuracy"], test_n=final["test"]["n"],
                dev=final["dev"]["accuracy"], dev_n=final["dev"]["n"],
                dev0=start.get("dev", {}).get("accuracy"), steps=at,
                forwards=passes.get("forwards", 2 * at),
                backwards=passes.get("backwards", 0), wall_s=timing.get("wall_s"),
                threads=timing.get("threads"), peak_mb=summary.get("peak_memory_mb"),
                trainable=trainable, config=config, step_time=summary.get("step_time"),
                ratio=summary.get("ratio"))


def mean_std(values) -> tuple[float, float]:
    """Mean and standard deviation (numpy's default, ddof = 0) of a list of numbers."""
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std())
