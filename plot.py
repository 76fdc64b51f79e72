"""Learning curves from mezo.py runs: training loss, dev and test accuracy, against steps and
against forward passes.

    # one curve per run (a run's --out folder or its log.jsonl)
    python plot.py runs/sst2 runs/adam -o plots/
    # every run below; the runs in one folder averaged (its seeds)
    python plot.py runs/results --group -o plots/
    make plot    # python plot.py runs -o plots

Writes plots/curves.png: six panels, several runs overlaid and labelled (label = the run's folder
relative to the folders given; with --group, the parent folder, averaged over its runs with a
min-max band). The x axis "forward passes" counts forwards over a training batch (MeZO: 2 a step;
--optimizer adam: 1 a step plus a backward), so the methods are compared per unit of forward
compute. Needs matplotlib: pip install -e ".[plot]".
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mezo import UsageError, checkpoints, options, runs  # noqa: E402


def curves(path: Path) -> dict:
    """A log.jsonl as arrays: steps, loss and forwards of the step records, and each split's
    evaluations. The records are runs.read_log's (a last line cut short by a crash is dropped)."""
    steps, loss, forwards, evals = [], [], [], {}
    for r in runs.read_log(Path(path)):
        if "split" in r:
            evals.setdefault(r["split"], []).append((r["step"], r["accuracy"], r["n"]))
        elif "loss" in r:  # logs written before the loss/forwards fields have neither
            steps.append(r["step"])
            loss.append(r["loss"])
            forwards.append(r.get("forwards", r["step"] * 2))
    if not steps and not evals:
        raise UsageError(f"{path} has no step or evaluation records; is it a mezo.py log.jsonl?")
    per_step = forwards[-1] / steps[-1] if steps else 0.0  # every step of a run costs the same
    return dict(step=np.array(steps), loss=np.array(loss), forwards=np.array(forwards),
                per_step=per_step,
                # (E, 3): step, accuracy, n
                evals={s: np.array(v, dtype=float) for s, v in evals.items()})


def find_logs(paths: list[str]) -> list[Path]:
    """log.jsonl files: each path is one, or a run folder holding one, or a folder searched below.
    """
    found = []
    for p in map(Path, paths):
        run = p / "log.jsonl"
        here = [p] if p.is_file() else [run] if run.is_file() else sorted(p.rglob("log.jsonl"))
        if not here:
            there = "no log.jsonl there" if p.exists() else "no such file or folder"
            raise UsageError(f"{p}: {there}; give run folders (mezo.py --out) or log.jsonl files")
        found.extend(here)
    return found


def labelled_runs(logs: list[Path], group: bool) -> list[tuple[str, list[dict]]]:
    """(label, [logs]) per curve. Labels are the run folders relative to their common parent."""
    keys = [log.resolve().parent.parent if group else log.resolve().parent for log in logs]
    common = Path(os.path.commonpath(keys))
    runs: dict[str, list[dict]] = {}
    for key, log in zip(keys, logs):
        label = str(key.relative_to(common)) if key != common else key.name
        runs.setdefault(label, []).append(curves(log))
    return list(runs.items())


def _common(logs: list[dict], x: list[np.ndarray], y: list[np.ndarray]):
    """The x values every log has, with the mean, min and max of y there (one log: itself)."""
    shared = sorted(set.intersection(*[set(v.tolist()) for v in x]))
    ys = np.array([[dict(zip(xi.tolist(), yi.tolist()))[s] for s in shared]
                   for xi, yi in zip(x, y)])
    return np.array(shared), ys.mean(0), ys.min(0), ys.max(0)


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (the first points average what there is): a batch of 8 makes the loss
    noisy."""
    c = np.cumsum(np.insert(y, 0, 0.0))
    i = np.arange(1, len(y) + 1)
    return (c[i] - c[np.maximum(i - window, 0)]) / np.minimum(i, window)


def plot_runs(runs: list[tuple[str, list[dict]]], path: Path | None = None, title: str = ""):
    """One figure: rows = against steps, against forward passes; columns = training loss, dev, test
    accuracy. Returns the matplotlib Figure (and saves it as a PNG when path is given)."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError('plotting needs matplotlib: pip install matplotlib (or pip install '
                         '-e ".[plot]")') from None
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5), squeeze=False)
    longest = max((len(log["step"]) for _, logs in runs for log in logs), default=1)
    window = max(1, longest // 25)
    for i, (label, logs) in enumerate(runs):
        color, legend = f"C{i % 10}", [label]  # the label goes on the first line drawn for the run
        for row, axis in enumerate(("step", "forwards")):
            scale = lambda log, steps: steps * (log["per_step"] if axis == "forwards" else 1)
            if all(len(log["step"]) for log in logs):
                x, mean, lo, hi = _common(logs, [scale(g, g["step"]) for g in logs],
                                          [smooth(g["loss"], window) for g in logs])
                _curve(axes[row][0], x, mean, lo, hi, color, legend.pop() if legend else None)
            for col, split in ((1, "dev"), (2, "test")):
                if all(split in log["evals"] for log in logs):
                    x, mean, lo, hi = _common(logs,
                                              [scale(g, g["evals"][split][:, 0]) for g in logs],
                                              [g["evals"][split][:, 1] for g in logs])
                    _curve(axes[row][col], x, mean, lo, hi, color, legend.pop() if legend else None,
                           marker="o")
    n_runs = sorted({len(logs) for _, logs in runs})
    band = (f"; mean of {'/'.join(map(str, n_runs))} runs, band = min..max"
            if max(n_runs, default=1) > 1 else "")
    average = f"moving average of {window} steps" if window > 1 else "per step"
    titles = (f"training loss ({average}{band})", f"dev accuracy{band}",
              "test accuracy (a fixed slice during training, all rows at the end)")
    for row, xlabel in enumerate(("step", "forward passes over a training batch")):
        for col in range(3):
            ax = axes[row][col]
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(titles[col], fontsize=10)
        axes[row][0].set_ylabel("cross-entropy")
        axes[row][1].set_ylabel("accuracy")
    fig.legend(loc="upper center", bbox_to_anchor=(0.5, 0.965), ncol=min(len(runs), 5),
               frameon=False)
    if title:
        fig.suptitle(title, y=0.995)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    if path is not None:
        save(fig, Path(path), "--out", "plot.py", dpi=110)
    return fig


def save(fig, path: Path, flag: str, again: str, dpi: int) -> None:
    """The figure as a PNG, written atomically: a full disk or a folder (given by flag) that cannot
    be made is one line (again: the command to run after the fix), and a figure already there
    stays whole."""
    runs.make_out(path.parent, path.parent, flag, "for the figure")
    checkpoints.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"),
                             then=f"run {again} again")


def _curve(ax, x, mean, lo, hi, color, label, marker=None):
    ax.plot(x, mean, color=color, label=label, marker=marker, markersize=3)
    if (hi > lo).any():
        ax.fill_between(x, lo, hi, color=color, alpha=0.15, linewidth=0)


def main(argv=None) -> int:
    p = options.Parser(prog="plot.py", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+",
                   help="run folders (mezo.py --out), log.jsonl files, or folders holding runs")
    p.add_argument("-o", "--out", default="plots", help="folder for curves.png (default plots)")
    p.add_argument("--group", action="store_true",
                   help="average the runs of each folder (e.g. the seeds of a method)")
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    try:
        runs = labelled_runs(find_logs(args.paths), args.group)
        path = Path(args.out) / "curves.png"
        plot_runs(runs, path, args.title)
    except UsageError as e:
        print(f"plot: error: {e}", file=sys.stderr)
        return 2
    print(f"plot: {path} ({len(runs)} curves: {', '.join(label for label, _ in runs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
