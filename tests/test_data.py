"""Data: LM-BFF's few-shot splits of every task reproduced byte for byte, the tasks' rows, data discovery, the
synthetic task."""
import hashlib
import re
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mezo.errors import UsageError
from mezo.tasks import files, lmbff, synthetic

from mezo import runs, tasks

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (SHARED / "lm-bff" / "SST-2" / "train.tsv").exists(),
                                reason="real task data not beside the checkout (../shared/data)")
HERE = ["sst2", "sst5", "mr", "cr", "mpqa", "subj", "trec", "rte"]  # the tasks whose data ../shared/data holds


def _published_md5s() -> dict[str, str]:
    lines = (SHARED / "lm-bff" / "k-shot-checksum").read_text().splitlines()
    return {path: md5 for md5, path in (line.split() for line in lines if line.strip())}


@needs_data
@pytest.mark.parametrize("name", HERE)
def test_kshot_files_match_lmbff_published_md5(name):
    """Our sampler writes LM-BFF's exact files: train, dev and test of every seed hash to LM-BFF's checksums
    (15 files per task, 120 in all)."""
    task, md5 = tasks.TASKS[name], _published_md5s()
    checked = 0
    for seed in (13, 21, 42, 87, 100):
        written = lmbff.kshot_files(task, SHARED / "lm-bff", 16, seed)
        assert len(written) == 3
        for file, text in written.items():
            got = hashlib.md5(text.encode("utf-8")).hexdigest()
            assert got == md5[f"{task.folder}/16-{seed}/{file}"], f"{task.folder} seed {seed} {file}: {got}"
            checked += 1
    assert checked == 15


@needs_data
@pytest.mark.parametrize("name", HERE)
def test_every_task_loads_balanced_disjoint_splits(name):
    task = tasks.TASKS[name]
    data = tasks.load(task.folder, 16, 42, str(SHARED))  # LM-BFF's spelling of the name works too
    n = len(task.labels)
    assert len(data["train"]) == len(data["dev"]) == 16 * n
    assert sorted(y for *_, y in data["train"]) == sorted(list(range(n)) * 16)
    # distinct rows of the training file (mpqa and cr repeat some phrases, so texts may repeat)
    everything = Counter(tasks.load(task.folder, 0, 42, str(SHARED))["train"]) if name != "sst2" else None
    assert everything is None or not Counter(data["train"] + data["dev"]) - everything
    assert all((b is not None) == task.pair and isinstance(a, str) for a, b, _ in data["train"] + data["dev"])
    sizes = dict(sst2=872, sst5=2210, mr=2000, cr=2000, mpqa=2000, subj=2000, trec=500, rte=277)
    assert len(data["test"]) == sizes[name] and {y for *_, y in data["test"]} == set(range(n))


@needs_data
@pytest.mark.parametrize("name", HERE)
def test_the_test_rows_evaluated_during_training_give_each_class_its_share(name):
    """--eval-max's rows (runs.spread_rows). LM-BFF's test files of MR, CR, MPQA and Subj are sorted by label: their
    first 200 rows were all class 0, and the test accuracy a run printed during training measured one class. Spread
    through the file, each class has its share: within one row of it on the sorted files, and within 10 % of the rows
    (total variation) on every task at the default 200."""
    test = tasks.load(name, 16, 42, str(SHARED))["test"]
    whole = Counter(y for *_, y in test)
    for limit in (32, 200):
        chosen = runs.spread_rows(test, limit)
        assert len(chosen) == limit and len(set(map(id, chosen))) == limit
        share = Counter(y for *_, y in chosen)
        off = {y: share[y] - n * limit / len(test) for y, n in whole.items()}
        if name in ("mr", "cr", "mpqa", "subj"):
            assert all(abs(d) <= 1 for d in off.values()), off
        if limit == 200:
            assert sum(abs(d) for d in off.values()) / 2 / limit <= 0.1, off


@given(st.integers(1, 500), st.integers(1, 600))
def test_spread_rows_are_evenly_spaced_distinct_rows_in_order(n, limit):
    """limit rows (all of them when limit >= n), in the file's order, no row twice, consecutive ones n/limit apart."""
    chosen = runs.spread_rows(list(range(n)), limit)
    assert len(chosen) == min(n, limit) and chosen == sorted(set(chosen))
    assert all(n // limit <= b - a <= -(-n // limit) for a, b in zip(chosen, chosen[1:]))


@needs_data
def test_sst2_test_set_is_lmbffs_and_k0_is_the_whole_glue_train_set():
    data = tasks.load("sst2", 16, 42, str(SHARED))
    # the test set is LM-BFF's test set: the GLUE dev sentences, tokenised and escaped a little differently
    lmbff_test = lmbff.examples(tasks.TASKS["sst2"], lmbff.read_rows(tasks.TASKS["sst2"], SHARED / "lm-bff" /
                                                                     "SST-2" / "dev.tsv"))
    norm = lambda rows: sorted((re.sub(r"[^a-z0-9]", "", s.lower()), y) for s, _, y in rows)
    assert norm(lmbff_test) == norm(data["test"])
    full = tasks.load("sst2", 0, 42, str(SHARED))
    assert len(full["train"]) == 67349 and full["dev"] == full["test"] == data["test"]


@needs_data
def test_rte_rows_are_premise_hypothesis_and_the_glue_label():
    data = tasks.load("RTE", 16, 13, str(SHARED))
    first = (SHARED / "lm-bff" / "RTE" / "dev.tsv").read_text().splitlines()[1].split("\t")
    assert data["test"][0] == (first[1], first[2], ["entailment", "not_entailment"].index(first[3]))


def test_mnli_layout_reads_its_columns(tmp_path):
    """MNLI is not in ../shared/data: a file in GLUE's MNLI layout (sentence1/2 in columns 8/9, gold label last;
    dev_matched has five annotator labels before it) reads as pairs with the right classes."""
    folder = tmp_path / "lm-bff" / "MNLI"
    folder.mkdir(parents=True)
    head = ["index", "promptID", "pairID", "genre", "s1_bin", "s2_bin", "s1_parse", "s2_parse", "sentence1",
            "sentence2"]
    rows = [[str(i), "0", "0", "g", "x", "x", "x", "x", f"premise {i}", f"hypothesis {i}", label]
            for i, label in enumerate(["neutral", "entailment", "contradiction"] * 4)]
    (folder / "train.tsv").write_text("\t".join(head + ["label1", "gold_label"]) + "\n" +
                                      "".join("\t".join(r[:10] + [r[10], r[10]]) + "\n" for r in rows))
    (folder / "dev_matched.tsv").write_text("\t".join(head + [f"label{i}" for i in range(1, 6)] + ["gold_label"])
                                            + "\n" + "".join("\t".join(r[:10] + [r[10]] * 6) + "\n" for r in rows))
    data = tasks.load("MNLI", 2, 13, str(tmp_path))
    assert len(data["train"]) == 6 and len(data["test"]) == 12
    assert data["test"][0] == ("premise 0", "hypothesis 0", 2)  # classes: contradiction, entailment, neutral
    assert all(a.replace("premise", "hypothesis") == b for a, b, _ in data["train"] + data["test"])


@pytest.mark.parametrize("name", ["mnli", "snli", "qnli"])
def test_tasks_without_data_here_say_where_to_get_it(name, tmp_path):
    with pytest.raises(UsageError,
                       match=rf"{name} \(\w+\) data not found: looked for lm-bff/\w+/train.tsv.*--data-dir.*"
                             r"lm-bff/datasets.tar holds lm-bff/'s as original/"):
        tasks.load(name, 16, 13, str(tmp_path / "nowhere"))


@needs_data
def test_data_is_found_through_the_environment_and_a_mistyped_one_is_not_passed_over(monkeypatch, tmp_path):
    """$MEZO_DATA, like --data-dir, is the one folder looked in: one that lacks the files is an error that names it,
    even where ../shared/data beside the checkout has them (before, the run went on with those, other data than
    the user named)."""
    monkeypatch.setenv("MEZO_DATA", str(SHARED))
    assert files.find_data(["sst2/dev.tsv"]) == SHARED
    monkeypatch.setenv("MEZO_DATA", str(tmp_path / "my-data"))
    with pytest.raises(UsageError, match=rf"^SST-2 data not found: looked for sst2/dev.tsv in {tmp_path}/my-data "
                                         r"\(\$MEZO_DATA is set, so nothing else was tried\)"):
        files.find_data(["sst2/dev.tsv"])


def test_a_data_folder_given_one_level_off_names_the_one_that_holds_the_files(monkeypatch, tmp_path):
    """--data-dir data/lm-bff or data/lm-bff/SST-2 (the folder the files are in), or the folder above data/: the line
    named only what it looked for; now it names the folder that holds them, and the flag or variable to give."""
    root = tmp_path / "shared" / "data"
    (root / "lm-bff" / "SST-2").mkdir(parents=True)
    (root / "lm-bff" / "SST-2" / "train.tsv").write_text("sentence\tlabel\n")
    needed = ["lm-bff/SST-2/train.tsv"]
    for off in (root / "lm-bff", root / "lm-bff" / "SST-2", root.parent):
        with pytest.raises(UsageError, match=rf"^SST-2 data not found in {off}, but {root} holds it "
                                             rf"\(lm-bff/SST-2/train.tsv\): give --data-dir {root}$"):
            files.find_data(needed, str(off))
    monkeypatch.setenv("MEZO_DATA", str(root / "lm-bff"))
    with pytest.raises(UsageError, match=rf": give MEZO_DATA={root}$"):
        files.find_data(needed)


def test_missing_data_says_where_it_looked_and_what_to_do(monkeypatch, tmp_path):
    with pytest.raises(UsageError, match=r"SST-2 data not found: looked for sst2/dev.tsv in .*nowhere"):
        files.find_data(["sst2/dev.tsv"], str(tmp_path / "nowhere"))
    # nothing anywhere, and no network: the download fails and the message says so
    monkeypatch.setattr(files, "ROOT", tmp_path / "x")
    monkeypatch.setenv("MEZO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MEZO_DATA", raising=False)
    monkeypatch.setitem(files.DATA_URLS, "sst2", "http://127.0.0.1:9/SST-2.zip")  # a closed port
    with pytest.raises(UsageError, match=rf"looked for sst2/dev.tsv in {tmp_path}/cache/data \(download failed"):
        files.find_data(["sst2/dev.tsv"])  # (not in the folders beside a checkout that are not there)


def test_synthetic_task_is_deterministic_and_balanced():
    a, b, c = synthetic.load_synthetic(16, 3), synthetic.load_synthetic(16, 3), synthetic.load_synthetic(16, 4)
    assert a["train"] == b["train"] and a["train"] != c["train"]
    assert sum(y for *_, y in a["train"]) == 16 and len(a["train"]) == 32
    for s, second, y in a["train"] + a["test"]:
        assert s.split()[-1] in synthetic.WORDS[y] and second is None


def test_task_names_accept_lmbff_spellings():
    assert [tasks.canonical(n) for n in ("SST-2", "sst-5", "RTE", "TREC", "Subj", "mr")] == \
        ["sst2", "sst5", "rte", "trec", "subj", "mr"]
    assert set(tasks.NAMES) == {*HERE, "mnli", "snli", "qnli", "synthetic"}


def test_batches_cycle_through_epochs_deterministically():
    n, bs = 10, 4
    seen = [i for step in range(1, 6) for i in runs.batch_indices(7, step, n, bs)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert runs.batch_indices(7, 3, n, bs) == runs.batch_indices(7, 3, n, bs)
    assert runs.batch_indices(7, 1, 3, 8) == [0, 1, 2]  # a batch larger than the set takes it whole
