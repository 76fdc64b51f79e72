"""tasks/: what a run trains on. Data discovery and downloads (files.py), LM-BFF's few-shot splits of SST-2
(lmbff.py), a generated task for quick checks (synthetic.py), and prompts: templates, label words, batches
(prompts.py). Everything here takes and returns plain values (paths, strings, lists, dicts, tensors)."""
from __future__ import annotations

from tasks.lmbff import load_sst2
from tasks.synthetic import load_synthetic

NAMES = ("sst2", "synthetic")  # what --task accepts


def load(task: str, k: int, data_seed: int, data_dir: str | None = None) -> dict:
    """{train, dev, test: [(sentence, label)], root: the data folder used (None for a generated task)}."""
    if task == "synthetic":
        return load_synthetic(k, data_seed)
    return load_sst2(k, data_seed, data_dir)
