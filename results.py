"""RESULTS.md, measured from the code: every task with data here at MeZO's budget (MeZO-LoRA at 100,
400 and 1,000 steps beside zero-shot and Adam-LoRA), SST-2 in bfloat16, the update rules,
MeZO-prefix, MeZO full-parameter and the peak memory of a step.

    python results.py plan     # the runs (experiments.py), their commands and expected time
    python results.py run      # every run into runs/results; run it again to resume
    python results.py table    # RESULTS.md and figures/budget.png from the logs (seconds)

The page's text is docs/RESULTS.template.md; this file fills it with what the logs say. Nothing on
the page is typed in: each figure comes from a run's log.jsonl, summary.json or timing.json, or from
bench/memory.py's output; the paper's figures are cited as such.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import string
import sys
from pathlib import Path

import numpy as np
from mezo.errors import UsageError

import experiments as ex
import plot
from experiments import finished, flag, run_dir, run_stats
from mezo import checkpoints, options, rules, runs, tasks

TEMPLATE = ex.ROOT / "docs" / "RESULTS.template.md"

# -----------------------------------------------------------------------------
# Reading the runs


def stats_at(root: Path, m: ex.Method, at: int) -> list[dict]:
    """Each seed's numbers at step `at`, for the seeds whose run has reached it."""
    return [dict(run_stats(run_dir(root, m, s), at), seed=s) for s in m.seeds
            if finished(run_dir(root, m, s), m, at)]


def mean_std(values) -> tuple[float, float]:
    """Mean and standard deviation (numpy's default, ddof = 0) of a list of numbers."""
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std())


def pct(mean: float, std: float | None = None) -> str:
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def acc(runs_: list[dict], key: str = "test") -> str:
    """Mean ± std over seeds, with n; one run alone is said so; none: a dash."""
    if not runs_:
        return "—"
    if len(runs_) == 1:
        return pct(runs_[0][key]) + " (one run)"
    return pct(*mean_std([r[key] for r in runs_])) + f" (n = {len(runs_)})"


def peak(runs_: list[dict]) -> str:
    """Peak RSS in MB over the seeds: lowest–highest where they differ (a process's, not a
    step's)."""
    values = sorted((f"{r['peak_mb']:.0f}" for r in runs_ if r.get("peak_mb") is not None), key=int)
    if not values:
        return "—"
    return values[0] if values[0] == values[-1] else f"{values[0]}–{values[-1]}"


def dev_curve(root: Path, m: ex.Method) -> dict[int, float]:
    """Step -> dev accuracy (whole dev set), the mean over the seeds that reached the last step."""
    seeds = [s for s in m.seeds if finished(run_dir(root, m, s), m)]
    by_step: dict[int, list[float]] = {}
    for s in seeds:
        for r in runs.read_log(run_dir(root, m, s) / "log.jsonl"):
            if r.get("split") == "dev":
                by_step.setdefault(r["step"], []).append(r["accuracy"])
    return {t: float(np.mean(v)) for t, v in sorted(by_step.items()) if len(v) == len(seeds)}


def rising(curve: dict[int, float], steps: int) -> str:
    """Whether dev accuracy still rises at the end: the least-squares slope of the mean dev curve
    over the run's second half, in points per 100 steps."""
    late = [(t, a) for t, a in curve.items() if t >= steps // 2]
    if len(late) < 3 or max(curve, default=0) < steps:
        return "—"
    slope = 100 * 100 * np.polyfit(*zip(*late), 1)[0]
    return f"yes (+{slope:.1f}/100 steps)" if slope > 0 else f"no ({slope:+.1f}/100 steps)"

# -----------------------------------------------------------------------------
# The page: docs/RESULTS.template.md, its pieces filled with the numbers above


def pieces() -> dict[str, str]:
    """The template's pieces by name: the text after each `<!-- name -->` line."""
    parts = re.split(r"^<!-- ([\w -]+) -->\n", TEMPLATE.read_text(), flags=re.M)
    return {name: text.strip("\n") for name, text in zip(parts[1::2], parts[2::2])}


def say(name: str, **values) -> str:
    return string.Template(pieces()[name]).substitute(values)


def task_parts(root: Path, task: str) -> dict:
    """A task's methods (its lr once the probes decide it) and their numbers at each stop."""
    methods = {m.name.split("/", 1)[1]: m for m in ex.task_methods(task, root)}
    # the chosen lr's method is there once the probes have picked it
    mezo = methods.get("mezo-lora")
    lr = flag(mezo, "--lr") if mezo else None
    return dict(lr=lr, methods=methods, zero=stats_at(root, methods["zero-shot"], 0),
                adam=stats_at(root, methods["adam-lora"], methods["adam-lora"].steps),
                mezo={t: stats_at(root, mezo, t) for t in ex.BUDGET} if mezo else {},
                probes=[(m, stats_at(root, m, m.steps)) for m in sorted(
                    (m for k, m in methods.items() if k.startswith("mezo-lora-lr")),
                    key=lambda m: float(flag(m, "--lr")))])


def budget_rows(root: Path, parts: dict) -> tuple[list[str], list[str]]:
    """The budget table's rows, and the probe table's."""
    rows, probes = [], []
    for task, p in parts.items():
        mezo, adam, last = p["mezo"], p["adam"], ex.BUDGET[-1]
        curve = dev_curve(root, p["methods"]["mezo-lora"]) if p["lr"] else {}
        done = mezo.get(last) or []
        passes = f"{done[0]['forwards']:,} / {done[0]['backwards']}" if done else "—"
        adam_passes = f"{adam[0]['forwards']} / {adam[0]['backwards']}" if adam else "—"
        test_n = (p["zero"] or adam or [{}])[0].get("test_n", "—")
        rows.append(f"| {task} | {tasks.num_classes(task)} | {test_n} | {acc(p['zero'])} | "
                    + " | ".join(acc(mezo.get(t, [])) for t in ex.BUDGET)
                    + f" | {acc(adam)} | {p['lr'] or '—'} | {passes} | {adam_passes} | "
                    f"{peak(done)} / {peak(adam)} | {rising(curve, last)} | "
                    f"{ex.PAPER_LORA.get(task, '—')} |")
        for m, st in p["probes"]:
            kept = "**kept**" if flag(m, "--lr") == p["lr"] else ""
            at = ex.diverged(run_dir(root, m, m.seeds[0]), m)
            if at is not None:
                kept, st = f"diverged at step {at}: out of the pick", []
            probes.append(f"| {task} | {flag(m, '--lr')} | {acc(st, 'dev')} | {acc(st)} | {kept} |")
    return rows, probes


def per_seed(parts: dict) -> list[str]:
    p, seeds = parts["sst2"], ex.SEEDS
    lines = ["| method | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|" + "---|" * len(seeds)]
    named = [(f"MeZO-LoRA, {t:,} steps", p["mezo"].get(t, [])) for t in ex.BUDGET]
    for name, st in named + [("Adam-LoRA, 32 steps", p["adam"])]:
        by = {r["seed"]: r["test"] for r in st}
        lines.append(f"| {name} | " + " | ".join(pct(by[s]) if s in by else "—" for s in seeds)
                     + " |")
    return lines


def figure(parts: dict, path: Path) -> Path | None:
    """Per task: test accuracy (whole test set) against passes over a training batch, MeZO's
    forwards and Adam's forwards + backwards; zero-shot dashed; mean over seeds, bars min..max."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("results: no figure (matplotlib is not installed: pip install matplotlib)",
              file=sys.stderr)
        return None
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    # passes: from half of Adam's (2 a step) to twice MeZO's at the end of the budget (2 a step)
    span = (ex.ADAM_STEPS, 4 * ex.BUDGET[-1])
    for ax, (task, p) in zip(axes.flat, parts.items()):
        mezo, adam = [g for g in p["mezo"].values() if g], [p["adam"]] if p["adam"] else []
        for label, groups, style in (("MeZO-LoRA", mezo, "o-"), ("Adam-LoRA", adam, "s")):
            if not groups:
                continue
            x = [g[0]["forwards"] + g[0]["backwards"] for g in groups]
            mean = [100 * np.mean([r["test"] for r in g]) for g in groups]
            low = [y - 100 * min(r["test"] for r in g) for y, g in zip(mean, groups)]
            high = [100 * max(r["test"] for r in g) - y for y, g in zip(mean, groups)]
            ax.errorbar(x, mean, yerr=[low, high], fmt=style, capsize=3, label=label)
        if p["zero"]:
            ax.axhline(100 * p["zero"][0]["test"], ls="--", c="gray", label="zero-shot")
        ax.set_xscale("log")
        ax.set_xlim(*span)
        ax.set_title(task)
        ax.set_xlabel("passes over a training batch")
        ax.set_ylabel("test accuracy, %")
    # one legend, in the first panel, of every kind drawn in any (SST-2's runs come last)
    shown = {label: h for ax in axes.flat for h, label in zip(*ax.get_legend_handles_labels())}
    if shown:
        axes.flat[0].legend(shown.values(), shown.keys(), fontsize=8)
    fig.tight_layout()
    try:
        plot.save(fig, path, "--figures", "results.py table", dpi=80)
    finally:
        plt.close(fig)  # (pyplot keeps every figure it made open: a caller's loop would hold them)
    return path


def precision_rows(root: Path, parts: dict) -> list[str]:
    """The float32 run of SST-2 seed 13 beside the bfloat16 runs, at each of their stops."""
    sst2 = parts["sst2"]["methods"].get(f"mezo-lora-lr{ex.PRECISION_LR}")
    rows = []
    for title, m in [("float32, LoRA in float32, ε 1e-3", sst2),
                     *[(x.title, x) for x in ex.PRECISION]]:
        if m is None:
            continue
        first, last = ex.PRECISION[0].stops
        # seed 13 alone: the float32 row is SST-2's probe at that lr
        at = {t: stats_at(root, m, t) for t in (first, last)}
        cells = [acc(at[first]), acc(at[last]), acc(at[last], "dev")]
        time = at[last][0].get("step_time") if at[last] else None
        rows.append(f"| {title} | " + " | ".join(cells)
                    + f" | {f'{time:.2f}' if time else '—'} |")
    return rows


def variants(root: Path, parts: dict) -> str:
    """The update rules and MeZO-prefix at their lr picked on dev, beside ZO-SGD's MeZO-LoRA (the
    SST-2 runs at their first stop, on the same seeds)."""
    sst2 = parts["sst2"]
    base = [r for r in sst2["mezo"].get(ex.BUDGET[0], []) if r["seed"] in ex.TASK_SEEDS]
    paper = ex.PAPER_LORA["sst2"]
    rows = [f"| MeZO-LoRA, ZO-SGD | {sst2['lr']} | {acc(base)} | 2 | {paper} |"] if base else []
    probes, ran = [], False
    for name, (title, flags, lrs, paper) in ex.VARIANT_FAMILIES.items():
        cands = ex.probed(name, title, flags, lrs)
        lr = ex.pick_lr(root, cands)
        for m in cands:
            st = stats_at(root, m, m.steps)
            ran = ran or bool(st)
            probes.append(f"| {title} | {flag(m, '--lr')} | {acc(st, 'dev')} | {acc(st)} |")
        kept = next((m for m in ex.probed(name, title, flags, lrs, lr=lr) if len(m.seeds) > 1),
                    None)
        st = stats_at(root, kept, kept.steps) if kept else []
        if st:
            rows.append(f"| {title} | {lr} | {acc(st)} | {st[0]['forwards'] // st[0]['steps']} "
                        f"| {paper} |")
    if not ran:
        return say("not run")
    return say("variants", rows="\n".join(rows), probes="\n".join(probes),
               steps=ex.BUDGET[0], seeds=", ".join(map(str, ex.TASK_SEEDS)))


def full(root: Path) -> str:
    m = ex.full_method(root)
    st = stats_at(root, m, m.steps) if m else []
    probes = [(p, stats_at(root, p, p.steps)) for p in ex.FULL_PROBES]
    if not st:
        return say("not run")
    return say("full", lr=flag(m, "--lr"), steps=m.steps, test=acc(st), dev=acc(st, "dev"),
               seed=m.seeds[0], probe_steps=probes[0][0].steps,
               values=f"{st[0]['trainable']:,}" if st[0]["trainable"] else "—",
               step_time=f"{st[0]['step_time']:.2f}",
               probes=", ".join(f"lr {flag(p, '--lr')}: dev {acc(s, 'dev')}" for p, s in probes))


def memory_table(root: Path) -> str:
    path = root / "memory.json"
    if not path.exists():
        return say("not run")
    memory = json.loads(path.read_text())
    names = {"inference": "inference (one forward, no autograd)", "mezo-lora": "MeZO step, LoRA",
             "mezo-full": "MeZO step, full-parameter", "adam-lora": "first-order step (Adam), LoRA",
             "adam-full": "first-order step (Adam), full-parameter"}
    for mode in ("lora", "full"):
        for rule in rules.RULES:
            names[f"mezo-{mode}-{rule}"] = f"MeZO step, {mode}, --rule {rule}"
    ref, lines = memory["rows"][0], []
    for r in memory["rows"]:
        values = f"{r['trainable']:,}" if r["case"] != "inference" and "trainable" in r else "—"
        peaks = r.get("peak_mb_runs", [])  # (with --repeat: the median, then every process's range)
        spread = f" ({peak([dict(peak_mb=p) for p in peaks])})" if len(peaks) > 1 else ""
        lines.append(f"| {names.get(r['case'], r['case'])} | {values} | {r['peak_mb']:.0f}{spread} "
                     f"| {r['above_model_mb']:.0f} | {r['peak_mb'] / ref['peak_mb']:.3f} |")
    n = memory.get("repeat", 1)
    repeat = (f", {n} times (the median; each process's lowest–highest peak in brackets)"
              if n > 1 else "")
    when = (f", {memory['date']}" if memory.get("date") else "") + (
        f", commit {memory['commit']}" if memory.get("commit") else "")  # (older files lack them)
    return say("memory", batch=memory["batch_size"], model=memory["model"], rows="\n".join(lines),
               device=memory["device"], threads=memory["threads"], when=when, repeat=repeat)


def write_table(root: Path, path: Path, figures: Path | None = None, tasks_=ex.TASKS) -> str:
    import torch
    parts = {t: task_parts(root, t) for t in tasks_}
    first = next((r for p in parts.values() for r in p["zero"] + p["adam"]), None)
    if first is None:
        raise UsageError(f"no finished runs under {root}; run `python results.py run` first")
    cfg = first["config"]
    rows, probes = budget_rows(root, parts)
    fig = figure(parts, figures / "budget.png") if figures else None
    shown = f"![budget]({os.path.relpath(fig, path.parent)})" if fig else ""
    prompts = [f"| {t} | {json.dumps(tasks.prompt(t, 'causal')[0])} | "
               f"{', '.join(repr(w) for w in tasks.prompt(t, 'causal')[1])} |" for t in tasks_]
    commands = ["python " + " ".join(m.command(s, run_dir(root, m, s), 1))
                for m in ex.all_methods(root) for s in m.seeds]
    done = [r for p in parts.values() for st in [p["adam"], *p["mezo"].values()] for r in st]
    threads = sorted({r["threads"] for r in done if r.get("threads")})
    now = datetime.datetime.now(datetime.timezone.utc)
    md = say("page", root=root, date=f"{now:%Y-%m-%d %H:%M}", cores=os.cpu_count(),
             arch=platform.machine(), torch=torch.__version__, python=platform.python_version(),
             device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU",
             model=cfg["model"], dtype=cfg["dtype"], batch=cfg["batch_size"], eps=f"{cfg['eps']:g}",
             seed=cfg["seed"], k=cfg["k"], stops=", ".join(map(str, ex.BUDGET)),
             budget_head=" | ".join(f"MeZO-LoRA, {t:,} steps" for t in ex.BUDGET),
             budget_sep="|---" * (11 + len(ex.BUDGET)) + "|", last=f"{ex.BUDGET[-1]:,}",
             adam_steps=ex.ADAM_STEPS,
             adam_lr=flag(ex.task_methods("sst2")[-1], "--lr"), first_seed=ex.TASK_SEEDS[0],
             first=ex.BUDGET[0], sst2_seeds=", ".join(map(str, ex.SEEDS)),
             task_seeds=" and ".join(map(str, ex.TASK_SEEDS)),
             p_first=ex.PRECISION[0].stops[0], p_last=ex.PRECISION[0].stops[-1],
             lrs=", ".join(sorted(ex.MEZO_LRS, key=float)), p_lr=ex.PRECISION_LR,
             diverge=ex.DIVERGE_FACTOR, start=max(1, ex.BUDGET[0] // 10), lower_lr=ex.MEZO_LOWER_LR,
             threads="/".join(map(str, threads)) or "?",
             rows="\n".join(rows), probes="\n".join(probes), figure=shown,
             per_seed="\n".join(per_seed(parts)), prompts="\n".join(prompts),
             precision="\n".join(precision_rows(root, parts)), variants=variants(root, parts),
             full=full(root), memory=memory_table(root),
             commands="\n".join(dict.fromkeys(commands)))
    checkpoints.atomic_write(path, lambda tmp: tmp.write_text(md + "\n"),
                             then="run results.py table again")
    return md


# in the first lines of every page write_table writes: a file without it is not one, and stays
GENERATED = "Generated by `python results.py table`"


def generated(path: Path) -> bool:
    """Whether a file is a page write_table wrote (and so one it may write over)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return GENERATED in f.read(400)
    except OSError:
        return False


def cmd_table(args) -> int:
    output = Path(args.output)
    if output.is_dir() or (output.exists() and not generated(output)):
        what = "a folder" if output.is_dir() else "a file results.py did not write"
        raise UsageError(f"--output {args.output} is {what}; give the path of a new page (or of a "
                         "page results.py wrote) (nothing was changed)")
    # the figure beside the page it is in: another --output leaves the repository's figure alone
    write_table(Path(args.root), output, Path(args.figures or output.parent / "figures"))
    print(f"results: wrote {args.output}")
    return 0


def main(argv=None) -> int:
    p = options.Parser(prog="results.py", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("plan", "run", "table"))
    p.add_argument("--root", default="runs/results",
                   help="where the runs live (default runs/results)")
    p.add_argument("--threads", type=options.count(1), default=os.cpu_count() or 1,
                   help="torch threads per run (default: cores)")
    p.add_argument("--jobs", type=options.count(1), default=1,
                   help="run: chains of runs at a time (a task, the bfloat16 runs, an update "
                   "rule, ...), each run with --threads threads (default 1)")
    p.add_argument("--only", choices=("all", "precision", "tasks", "variants", "full"),
                   default="all", help="run: every run (default), or one part of the page")
    p.add_argument("--output", default="RESULTS.md", help="table: the page (default RESULTS.md)")
    p.add_argument("--figures", default=None,
                   help="table: the figure's folder (default: figures/ beside --output)")
    args = p.parse_args(argv)
    try:
        if Path(args.root).exists() and not Path(args.root).is_dir():  # (plan had read it as empty)
            raise UsageError(f"--root {args.root} is a file, not a folder; give the study's "
                             "folder (default runs/results)")
        commands = {"plan": ex.cmd_plan, "run": ex.cmd_run, "table": cmd_table}
        return commands[args.command](args)
    except UsageError as e:
        print(f"results: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `results.py plan | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
