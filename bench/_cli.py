"""The command line every benchmark shares: a wrong value is one line that names the flag and what it
takes, not a traceback from deep in the benchmark. argparse reads each value with a type below, and
`main` turns a mezo.errors.UsageError from the code a benchmark calls (a model that is not there, a
--device this machine lacks) into the same one line, exit status 2."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mezo.errors import UsageError  # noqa: E402

from mezo import checkpoints, models, options  # noqa: E402

PROG = f"bench/{Path(sys.argv[0]).name}"


def parser(doc: str) -> argparse.ArgumentParser:
    """argparse with mezo's one-line errors, described by the first paragraph of `doc`."""
    return options.Parser(prog=PROG, description=doc.split("\n\n")[0])


# argparse type: a whole number of `low` or more (mezo.options', as results.py's counts)
count = options.count


def number(above: float | None = None, low: float | None = None):
    """argparse type: a finite number over `above` (or of `low` or more)."""
    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            x = math.nan
        if not math.isfinite(x) or (above is not None and x <= above) or (low is not None and x < low):
            bound = f"over {above:g}" if above is not None else f"of {low:g} or more"
            raise argparse.ArgumentTypeError(f"{text!r}: give a finite number {bound}")
        return x
    return parse


def listed(item, choices=None):
    """argparse type: comma-separated values, each read by `item` (and among `choices`), one at least."""
    def parse(text: str) -> list:
        words = [w for w in text.split(",") if w]
        if not words:
            raise argparse.ArgumentTypeError(f"{text!r}: give one value or more, comma-separated")
        bad = [w for w in words if choices is not None and w not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{', '.join(bad)}: choose from {', '.join(choices)}")
        return [item(w) for w in words]
    return parse


def json_file(text: str) -> Path:
    """argparse type: a file for --json, checked before the benchmark runs (a measurement is not
    lost to a path it cannot write at the end): not a folder, in a folder that exists, and new or
    a JSON file (a benchmark's earlier rows, written over); a user's other file is left alone."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name, as "
                                         f"{path / 'rows.json'}")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: there is no folder {path.parent}; create it, "
                                         "or give a file in a folder that exists")
    if path.exists():
        try:
            json.loads(path.read_text())
        except (OSError, ValueError):  # (UnicodeDecodeError is a ValueError)
            raise argparse.ArgumentTypeError(f"{text} is not a JSON file (a benchmark's rows): "
                                             "give a new file name; it was left as it is") from None
    return path


def measured_at() -> dict:
    """When and from what code a measurement was made, for the file it is written to: the UTC date
    and the checkout's commit (with "+changes" when a tracked .py file differs from it; None outside
    a git checkout, as from a pip install)."""
    import datetime
    import subprocess
    root = Path(__file__).resolve().parents[1]
    git = lambda *a: subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True)
    try:
        head = git("rev-parse", "--short", "HEAD")
        changed = git("diff", "--quiet", "HEAD", "--", ":(glob)**/*.py").returncode
    except OSError:  # no git
        head, changed = None, 0
    commit = head.stdout.strip() + ("+changes" if changed else "") if head and not head.returncode else None
    return dict(date=f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}", commit=commit)


def write_json(path: Path, rows) -> None:
    """rows as JSON at path, whole or not at all (a full disk is one line)."""
    checkpoints.atomic_write(path, lambda tmp: tmp.write_text(json.dumps(rows, indent=1) + "\n"),
                             then="run the benchmark again")


def device(text: str) -> str:
    """argparse type: auto, cpu, or an accelerator this machine has (mezo's --device rule)."""
    try:
        models.check_device(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--device {text}: ")) from None
    return models.resolve_device(text)


def needs_triton(dev: str, what: str) -> None:
    """The Triton kernels run on a GPU, or on a CPU under Triton's interpreter (slow: it checks, it
    does not time)."""
    if dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UsageError(f"{what} runs the Triton kernels: use --device cuda on a GPU, or set "
                         "TRITON_INTERPRET=1 to run them interpreted on this CPU")


def pass_on_error(process) -> None:
    """A benchmark's own process (a memory case, a tp worker) that failed on a UsageError (a
    --model not there): its one line, as this process's, status 2."""
    said = [line for line in process.stderr.splitlines() if line.startswith(f"{PROG}: error: ")]
    if process.returncode and said:
        raise UsageError(said[-1].removeprefix(f"{PROG}: error: "))


def main(body) -> None:
    """Run a benchmark's `body()` and exit with its status; a UsageError is one line, status 2."""
    try:
        code = body()
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
