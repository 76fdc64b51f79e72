"""Data: LM-BFF's few-shot splits reproduced byte for byte, data discovery, the synthetic task."""
import hashlib
import re
from pathlib import Path

import pytest

import mezo
import runs
from tasks import files, lmbff, synthetic

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (SHARED / "lm-bff" / "SST-2" / "train.tsv").exists(),
                                reason="real SST-2 data not beside the checkout (../shared/data)")


def _published_md5s() -> dict[str, str]:
    lines = (SHARED / "lm-bff" / "k-shot-checksum").read_text().splitlines()
    return {path: md5 for md5, path in (line.split() for line in lines if line.strip())}


@needs_data
@pytest.mark.parametrize("seed", [13, 21, 42, 87, 100])
def test_sst2_splits_match_lmbff_published_md5(seed):
    """Our sampler writes LM-BFF's exact files: the md5 of train.tsv and dev.tsv equal LM-BFF's checksums."""
    lines = (SHARED / "lm-bff" / "SST-2" / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    train, dev = lmbff.lmbff_split(lines[1:], k=16, seed=seed)
    md5 = _published_md5s()
    for name, rows in (("train", train), ("dev", dev)):
        got = hashlib.md5((lines[0] + "".join(rows)).encode("utf-8")).hexdigest()
        assert got == md5[f"SST-2/16-{seed}/{name}.tsv"], f"seed {seed} {name}: {got}"
    assert len(train) == len(dev) == 32


@needs_data
def test_load_sst2_few_shot_and_full():
    data = lmbff.load_sst2(16, 42, str(SHARED))
    assert len(data["train"]) == len(data["dev"]) == 32 and len(data["test"]) == 872
    assert sorted(y for _, y in data["train"]) == [0] * 16 + [1] * 16
    assert not {s for s, _ in data["train"]} & {s for s, _ in data["dev"]}
    # the test set is LM-BFF's test set: the GLUE dev sentences, tokenised and escaped a little differently
    # ("(a)" vs "( a )", "\\/")
    lmbff_test = lmbff.read_tsv(SHARED / "lm-bff" / "SST-2" / "dev.tsv")
    norm = lambda rows: sorted((re.sub(r"[^a-z0-9]", "", s.lower()), y) for s, y in rows)
    assert norm(lmbff_test) == norm(data["test"])
    full = lmbff.load_sst2(0, 42, str(SHARED))
    assert len(full["train"]) == 67349


@needs_data
def test_data_is_found_through_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MEZO_DATA", str(SHARED))
    assert files.find_data(["sst2/dev.tsv"]) == SHARED


def test_missing_data_says_where_it_looked_and_what_to_do(monkeypatch, tmp_path):
    with pytest.raises(mezo.UsageError, match=r"SST-2 data not found: looked for sst2/dev.tsv in .*nowhere.*--data"):
        files.find_data(["sst2/dev.tsv"], str(tmp_path / "nowhere"))
    # nothing anywhere, and no network: the download fails and the message says so
    monkeypatch.setattr(files, "ROOT", tmp_path / "x")
    monkeypatch.setenv("MEZO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MEZO_DATA", raising=False)
    monkeypatch.setitem(files.DATA_URLS, "sst2", "http://127.0.0.1:9/SST-2.zip")  # a closed port
    with pytest.raises(mezo.UsageError, match="download failed"):
        files.find_data(["sst2/dev.tsv"])


def test_synthetic_task_is_deterministic_and_balanced():
    a = synthetic.load_synthetic(16, 3)
    b = synthetic.load_synthetic(16, 3)
    c = synthetic.load_synthetic(16, 4)
    assert a["train"] == b["train"] and a["train"] != c["train"]
    assert sum(y for _, y in a["train"]) == 16 and len(a["train"]) == 32
    for s, y in a["train"] + a["test"]:
        assert s.split()[-1] in synthetic.WORDS[y]


def test_batches_cycle_through_epochs_deterministically():
    n, bs = 10, 4
    seen = [i for step in range(1, 6) for i in runs.batch_indices(7, step, n, bs)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert runs.batch_indices(7, 3, n, bs) == runs.batch_indices(7, 3, n, bs)
    assert runs.batch_indices(7, 1, 3, 8) == [0, 1, 2]  # a batch larger than the set takes it whole
