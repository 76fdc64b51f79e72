"""SST-2 as the MeZO paper uses it: LM-BFF's few-shot splits of the sentence-level train set.

LM-BFF's generate_k_shot_data.py (Gao et al., 2021), for GLUE's tsv layout: np.random.seed(seed), shuffle the
train rows, take the first k of each label as train and the next k as dev. Done the same way here, the splits
reproduce LM-BFF's published md5s (../shared/data/lm-bff/k-shot-checksum; tests/test_data.py). Test is GLUE's
dev set (872 sentences). k = 0 trains on the whole phrase-level GLUE train set (67,349 rows).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from errors import UsageError
from tasks.files import find_data


def read_tsv(path: Path) -> list[tuple[str, int]]:
    """(sentence, label) rows of a GLUE-style tsv whose last column is the label; the header is skipped."""
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [(s.strip(), int(label)) for s, label in (line.rsplit("\t", 1) for line in lines)]


def lmbff_split(train_lines: list[str], k: int, seed: int) -> tuple[list[str], list[str]]:
    """LM-BFF's k-shot sampler for GLUE tsv: raw lines (after the header) in, k-shot train and dev lines out."""
    lines = list(train_lines)
    np.random.seed(seed)
    np.random.shuffle(lines)
    by_label: dict[str, list[str]] = {}
    for line in lines:  # labels in order of first appearance, as LM-BFF's dict does
        by_label.setdefault(line.strip().split("\t")[-1], []).append(line)
    short = {label: len(rows) for label, rows in by_label.items() if len(rows) < 2 * k}
    if short:  # LM-BFF would return fewer rows than asked for, silently
        raise UsageError(f"--k {k} needs 2k = {2 * k} examples of every class (k for train, k for dev), but "
                         + ", ".join(f"class {label} has {n}" for label, n in short.items()) + "; lower --k")
    train = [line for rows in by_label.values() for line in rows[:k]]
    dev = [line for rows in by_label.values() for line in rows[k:2 * k]]
    return train, dev


def load_sst2(k: int, data_seed: int, data_dir: str | None = None) -> dict:
    """{train, dev, test: [(sentence, label)], root: the data folder used}."""
    if k == 0:  # the whole phrase-level GLUE train set; GLUE dev serves as dev and test
        root = find_data(["sst2/train.tsv", "sst2/dev.tsv"], data_dir)
        test = read_tsv(root / "sst2" / "dev.tsv")
        return dict(train=read_tsv(root / "sst2" / "train.tsv"), dev=test, test=test, root=root)
    root = find_data(["lm-bff/SST-2/train.tsv", "sst2/dev.tsv"], data_dir)
    lines = (root / "lm-bff" / "SST-2" / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    train, dev = lmbff_split(lines[1:], k, data_seed)
    parse = lambda rows: [(s.strip(), int(label)) for s, label in (r.rstrip("\n").rsplit("\t", 1) for r in rows)]
    return dict(train=parse(train), dev=parse(dev), test=read_tsv(root / "sst2" / "dev.tsv"), root=root)
