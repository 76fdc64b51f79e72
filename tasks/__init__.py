"""tasks/: what a run trains on. The tasks of the MeZO paper's RoBERTa table and LM-BFF's
single-sentence tasks (`TASKS`), their data (files.py finds and downloads it; lmbff.py reads it and
samples LM-BFF's few-shot splits), a generated task for quick checks (synthetic.py), and prompts:
templates, label words, batches (prompts.py). Everything here takes and returns plain values (paths,
strings, lists, dicts, tensors).

Templates use {sentence} (or {sentence1} and {sentence2} for a pair) and {mask}. A field may carry
LM-BFF's two edits: `{sentence1:-}` drops a final punctuation mark (LM-BFF's `sent-`),
`{sentence2:l}` lower-cases the first letter (LM-BFF's `sentl`). Masked LMs read the label word at
{mask}; causal LMs read it after the text before {mask}, so a task whose mask is not at the end has
a causal form of its own.
"""
from __future__ import annotations

from dataclasses import dataclass

from .files import DATA_URLS


@dataclass(frozen=True)
class Task:
    name: str  # what --task takes
    folder: str  # the task's folder in LM-BFF's data/original layout
    # "glue": tsv with a header, the label last; "csv": no header, the label first (an int)
    layout: str
    test: str  # the evaluation file (GLUE's dev set for GLUE tasks; LM-BFF's test.csv otherwise)
    columns: tuple[int, ...]  # the sentence columns (one, or two for a pair)
    labels: tuple  # the raw labels in class order (csv: the ints 0..C-1)
    words: tuple[str, ...]  # masked LMs: one label word per class, LM-BFF's (run_experiment.sh)
    template: str  # masked LMs: LM-BFF's template, in this project's syntax
    # causal LMs: the MeZO paper's OPT template where it has one, else one in the same spirit
    causal: str
    causal_words: tuple[str, ...] | None = None  # causal LMs' label words, when not the masked ones

    @property
    def pair(self) -> bool:
        return len(self.columns) == 2

    def prompt(self, kind: str) -> tuple[str, tuple[str, ...]]:
        """(template, label words) for a model kind: "mlm", or "causal" (also a body read at its
        last token)."""
        return ((self.template, self.words) if kind == "mlm"
                else (self.causal, self.causal_words or self.words))


_IT_WAS = dict(template="{sentence} It was{mask}.", causal="{sentence} It was{mask}")
_NLI = dict(template="{sentence1:-}?{mask}, {sentence2:l}",
            causal='{sentence1}\nDoes this mean that "{sentence2}" is true? Yes or No?\n{mask}')
TASKS = {t.name: t for t in [
    # SST-2's causal prompt: the one the default run was tuned with (docs/defaults.md); LM-BFF's
    # scores worse
    Task("sst2", "SST-2", "glue", "dev.tsv", (0,), ("0", "1"), (" terrible", " great"),
         _IT_WAS["template"], "Review: {sentence}\nOverall, the movie was {mask}."),
    Task("sst5", "sst-5", "csv", "test.csv", (1,), (0, 1, 2, 3, 4),
         (" terrible", " bad", " okay", " good", " great"), **_IT_WAS),
    Task("mr", "mr", "csv", "test.csv", (1,), (0, 1), (" terrible", " great"), **_IT_WAS),
    Task("cr", "cr", "csv", "test.csv", (1,), (0, 1), (" terrible", " great"), **_IT_WAS),
    Task("mpqa", "mpqa", "csv", "test.csv", (1,), (0, 1), (" terrible", " great"), **_IT_WAS),
    Task("subj", "subj", "csv", "test.csv", (1,), (0, 1), (" subjective", " objective"),
         "{sentence} This is{mask}.", "{sentence} This is{mask}"),
    Task("trec", "trec", "csv", "test.csv", (1,), (0, 1, 2, 3, 4, 5),
         (" Description", " Entity", " Expression", " Human", " Location", " Number"),
         "{mask}: {sentence}", "Question: {sentence}\nType of answer:{mask}"),
    # RTE's causal prompt and words are the MeZO paper's OPT template (from PromptSource); the
    # answer follows "\n"
    Task("rte", "RTE", "glue", "dev.tsv", (1, 2), ("entailment", "not_entailment"), (" Yes", " No"),
         **_NLI, causal_words=("Yes", "No")),
    # Data not in ../shared/data: they run from LM-BFF's archive (DATA_URLS["lm-bff"]), downloaded
    # or unpacked
    Task("mnli", "MNLI", "glue", "dev_matched.tsv", (8, 9),
         ("contradiction", "entailment", "neutral"), (" No", " Yes", " Maybe"), **_NLI,
         causal_words=("No", "Yes", "Maybe")),
    Task("snli", "SNLI", "glue", "dev.tsv", (7, 8), ("contradiction", "entailment", "neutral"),
         (" No", " Yes", " Maybe"), **_NLI, causal_words=("No", "Yes", "Maybe")),
    Task("qnli", "QNLI", "glue", "dev.tsv", (1, 2), ("entailment", "not_entailment"),
         (" Yes", " No"), **_NLI, causal_words=("Yes", "No")),
]}
NAMES = (*TASKS, "synthetic")  # what --task accepts


def canonical(name: str) -> str:
    """LM-BFF's and GLUE's spellings (SST-2, sst-5, RTE, TREC, ...) as --task names (sst2, sst5,
    rte, trec)."""
    return name.lower().replace("-", "").replace("_", "")


def describe() -> str:
    """The --task help: each task with its data source."""
    return ("sst2, sst5, mr, cr, mpqa, subj, trec, rte, mnli, snli, qnli (LM-BFF's data/original: "
            f"in --data-dir, else downloaded once from {DATA_URLS['lm-bff']}); synthetic")


def prompt(task: str, kind: str) -> tuple[str, tuple[str, ...]]:
    """The task's default (template, label words) for a model kind; the synthetic task takes
    SST-2's."""
    return TASKS.get(canonical(task), TASKS["sst2"]).prompt(kind)


def fingerprint(data: dict) -> dict:
    """Each split's examples, in order, as 16 hex digits of their sha256: a checkpoint keeps them,
    so a resume that found other data (another --data-dir, $MEZO_DATA unset) is refused, not
    trained on."""
    import hashlib
    import json
    return {name: hashlib.sha256(json.dumps(data[name]).encode()).hexdigest()[:16]
            for name in ("train", "dev", "test")}


def num_classes(task: str) -> int:
    """How many classes a task's examples have (the synthetic task: 2), so one label word each."""
    return len(TASKS[canonical(task)].labels) if canonical(task) in TASKS else 2


def load(task: str, k: int, data_seed: int, data_dir: str | None = None) -> dict:
    """{train, dev, test: [(sentence, second sentence or None, class)], root: the data folder (None:
    generated)}."""
    from .lmbff import load_lmbff
    from .synthetic import load_synthetic
    task = canonical(task)
    if task == "synthetic":
        return load_synthetic(k, data_seed)
    return load_lmbff(TASKS[task], k, data_seed, data_dir)
