"""The paper's tasks as LM-BFF keeps them (data/original), and LM-BFF's few-shot splits of them.

LM-BFF's tools/generate_k_shot_data.py (Gao et al., 2021), for a seed: np.random.seed(seed), shuffle
the training rows (GLUE tsv: the raw lines after the header; csv: the parsed rows), group them by
label in shuffled order, take the first k of each label as train and the next k as dev; test is the
task's evaluation file unchanged. `kshot` does the same and `kshot_files` writes what LM-BFF writes,
byte for byte: the md5s match LM-BFF's published k-shot-checksum for every task and seed
(tests/test_data.py). k = 0 trains on the whole training file (for SST-2: GLUE's 67,349 phrases),
with the evaluation file as dev and test.
"""
from __future__ import annotations

import csv
import io
import string
from pathlib import Path

import numpy as np

from ..errors import UsageError
from .files import find_data


def read_rows(task, path: Path) -> list:
    """A training or evaluation file's rows as LM-BFF holds them: raw lines after the header (GLUE
    tsv), or [label, sentence, ...] lists with an int label (csv, as pandas.read_csv(header=None)
    reads them). A file that is not UTF-8, or a row short of the task's columns or with a label not
    among its labels, is refused in one line that names the file and the line."""
    try:
        with open(path, encoding="utf-8", newline=None if task.layout == "glue" else "") as f:
            text = f.read()  # GLUE: universal newlines (as read_text); csv: as csv wants it
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        byte = e.object[e.start:e.start + 1]
        raise UsageError(f"{path}: line {line} is not UTF-8 text (byte {byte!r}); save the file as "
                         "UTF-8") from None
    if task.layout == "glue":
        rows, first = text.splitlines(keepends=True)[1:], 2  # after the header
        fields = [row.rstrip("\n").split("\t") for row in rows]
    else:
        rows = fields = list(csv.reader(io.StringIO(text, newline="")))
        first = 1
    need = max(task.columns) + 1
    # blank lines (an editor's trailing newline) are no rows
    kept = [(n, row, cells) for n, (row, cells) in enumerate(zip(rows, fields), first)
            if "".join(cells).strip()]
    if not kept:
        raise UsageError(f"{path} holds no examples{' after its header' if first == 2 else ''}; "
                         "point --data-dir at a folder with the task's full files")
    rows = [row for _, row, _ in kept]
    for n, row, cells in kept:
        label = label_of(task, row) if task.layout == "glue" else cells[0] if cells else ""
        if len(cells) < need or label not in [str(x) for x in task.labels]:
            labels = ", ".join(str(x) for x in task.labels)
            problem = f"has {len(cells)} fields, {task.name} needs {need}" if len(cells) < need \
                else f"has the label {label!r}, not one of {labels}"
            raise UsageError(f"{path}: line {n} {problem}; fix or delete that line")
    return rows if task.layout == "glue" else [[int(row[0]), *row[1:]] for row in rows]


def label_of(task, row):
    return row.strip().split("\t")[-1] if task.layout == "glue" else row[0]


def kshot(task, rows: list, k: int, seed: int) -> tuple[list, list]:
    """LM-BFF's k-shot sampler: (train, dev) rows, k of each label each, in LM-BFF's order."""
    rows = list(rows)
    np.random.seed(seed)
    np.random.shuffle(rows)
    by_label: dict = {}
    for row in rows:  # labels in order of first appearance, as LM-BFF's dict does
        by_label.setdefault(label_of(task, row), []).append(row)
    counts = {str(label): len(rows) for label, rows in by_label.items()}
    counts.update({str(label): 0 for label in task.labels if str(label) not in counts})
    short = {label: n for label, n in counts.items() if n < 2 * k}  # a class with none, too
    missing = [label for label, n in counts.items() if n == 0]
    if missing:  # no --k helps
        raise UsageError(f"{task.name}'s training file has no example of class "
                         f"{', '.join(missing)}; point --data-dir at the task's full files")
    if short:  # LM-BFF would return fewer rows than asked for, silently
        raise UsageError(f"--k {k} needs 2k = {2 * k} examples of every class (k for train, k for "
                         "dev), but "
                         + ", ".join(f"class {label} has {n}" for label, n in short.items())
                         + "; lower --k")
    return ([r for rows in by_label.values() for r in rows[:k]],
            [r for rows in by_label.values() for r in rows[k:2 * k]])


def kshot_files(task, root: Path, k: int, seed: int) -> dict[str, str]:
    """{file name: text} of LM-BFF's k-shot folder <task>/<k>-<seed>: train, dev and test, as LM-BFF
    writes them."""
    folder, ext = root / task.folder, "tsv" if task.layout == "glue" else "csv"
    train, dev = kshot(task, read_rows(task, folder / f"train.{ext}"), k, seed)
    if task.layout == "glue":
        header = (folder / f"train.{ext}").read_text(encoding="utf-8").splitlines(keepends=True)[0]
        return {"train.tsv": header + "".join(train), "dev.tsv": header + "".join(dev),
                task.test.replace("dev", "test"): (folder / task.test).read_text(encoding="utf-8")}
    return {"train.csv": _csv(train), "dev.csv": _csv(dev),
            "test.csv": _csv(read_rows(task, folder / task.test))}


def _csv(rows: list) -> str:
    # pandas' DataFrame.to_csv(header=False, index=False): minimal quoting, "\n"
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


def examples(task, rows: list) -> list[tuple[str, str | None, int]]:
    """(sentence, second sentence or None, class) of each row."""
    out = []
    for row in rows:
        fields = row.rstrip("\n").split("\t") if task.layout == "glue" else row
        texts = [fields[c].strip() for c in task.columns]
        out.append((texts[0], texts[1] if task.pair else None,
                    task.labels.index(label_of(task, row))))
    return out


def load_lmbff(task, k: int, data_seed: int, data_dir: str | None = None) -> dict:
    """{train, dev, test: [(sentence, second or None, class)], root}. SST-2 is tested on GLUE's own
    dev file (the 872 sentences LM-BFF's test.tsv holds, in GLUE's order and spelling), as this
    project always has."""
    ext = "tsv" if task.layout == "glue" else "csv"
    files = [f"lm-bff/{task.folder}/train.{ext}", f"lm-bff/{task.folder}/{task.test}"]
    if task.name == "sst2":
        files = ["sst2/train.tsv", "sst2/dev.tsv"] if k == 0 else [files[0], "sst2/dev.tsv"]
    root = find_data(files, data_dir, what=f"{task.name} ({task.folder})", folders=[task.folder])
    if task.name == "sst2":
        test = examples(task, read_rows(task, root / "sst2" / "dev.tsv"))
        train = read_rows(task, root / "sst2" / "train.tsv") if k == 0 else None
    else:
        test = examples(task, read_rows(task, root / "lm-bff" / task.folder / task.test))
        train = None
    rows = (read_rows(task, root / "lm-bff" / task.folder / f"train.{ext}") if train is None
            else train)
    if k == 0:
        return dict(train=examples(task, rows), dev=test, test=test, root=root)
    train, dev = kshot(task, rows, k, data_seed)
    return dict(train=examples(task, train), dev=examples(task, dev), test=test, root=root)


def drop_final_punctuation(text: str) -> str:
    """LM-BFF's `sent-` field: the sentence without its last character, which is meant to be its
    punctuation."""
    return text[:-1] if text and text[-1] in string.punctuation else text
