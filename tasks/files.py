"""Where task data are found, and the downloads that fill the cache when they are not.

Order: an explicit --data-dir, else $MEZO_DATA, and nothing else when either is given (a mistyped
one would train on other data); else ../shared/data beside the checkout, ./shared/data, and the
cache folder (~/.cache/mezo/data, or $MEZO_CACHE/data), downloading into the cache when there is a
network.
"""
from __future__ import annotations

import io
import os
import shutil
import sys
import tarfile
import urllib.request
import zipfile
from pathlib import Path

from ..errors import UsageError

ROOT = Path(__file__).resolve().parents[1]  # the checkout: ../shared/data is looked for beside it
DATA_URLS = {"sst2": "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip",  # GLUE's own copy
             # LM-BFF's data/original
             "lm-bff": "https://nlp.cs.princeton.edu/projects/lm-bff/datasets.tar"}


def cache_dir() -> Path:
    """$MEZO_CACHE, else $XDG_CACHE_HOME/mezo, else ~/.cache/mezo: downloaded data and converted
    models."""
    return Path(os.environ.get("MEZO_CACHE")
                or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mezo")


def find_data(needed: list[str], data_dir: str | None = None, what: str = "SST-2",
              folders=("SST-2",)) -> Path:
    """The first folder holding every needed file (paths relative to it), downloading when none does
    (folders: the tasks' folders in LM-BFF's archive)."""
    given = data_dir or os.environ.get("MEZO_DATA")
    if given:
        candidates = [Path(given).expanduser()]
    else:
        # beside a checkout (those that are there: an installed package has none), then the cache
        candidates = [c for c in (ROOT.parent / "shared" / "data", ROOT / "shared" / "data")
                      if c.is_dir()] + [cache_dir() / "data"]
    for c in candidates:
        if all((c / f).is_file() for f in needed):
            return c
    if not given:
        try:
            root = download_data(cache_dir() / "data", needed, folders)
            if all((root / f).is_file() for f in needed):
                return root
            reason = (f"downloaded, but {', '.join(f for f in needed if not (root / f).is_file())} "
                      "not in it")
        except OSError as e:
            reason = f"download failed: {e}"
    else:
        reason = ("--data-dir was given" if data_dir else "$MEZO_DATA is set") + \
            ", so nothing else was tried"
        # a folder one or two above the given one (lm-bff/ or lm-bff/SST-2/ given), or its data/
        given = candidates[0]
        near = next((c for c in (given.parent, given.parent.parent, given / "data")
                     if all((c / f).is_file() for f in needed)), None)
        if near is not None:
            fix = f"--data-dir {near}" if data_dir else f"MEZO_DATA={near}"
            raise UsageError(f"{what} data not found in {given}, but {near} holds it "
                             f"({', '.join(needed)}): give {fix}")
    raise UsageError(f"{what} data not found: looked for {', '.join(needed)} in "
                     f"{', '.join(map(str, candidates))} ({reason}). Pass --data-dir DIR (or set "
                     "MEZO_DATA) pointing at a folder with those files (LM-BFF's "
                     f"{DATA_URLS['lm-bff']} holds lm-bff/'s as original/; GLUE's SST-2 zip "
                     "sst2/'s)")


def download_data(target: Path, needed: list[str], folders=("SST-2",)) -> Path:
    """GLUE's SST-2 zip into target/sst2, and the given task folders of LM-BFF's archive into
    target/lm-bff."""
    target.mkdir(parents=True, exist_ok=True)
    if any(f.startswith("sst2/") for f in needed) and not (target / "sst2" / "dev.tsv").exists():
        print(f"mezo: downloading GLUE SST-2 to {target}/sst2", file=sys.stderr)
        with (urllib.request.urlopen(DATA_URLS["sst2"], timeout=30) as r,
              zipfile.ZipFile(io.BytesIO(r.read())) as z):
            (target / "sst2").mkdir(exist_ok=True)
            for split in ("train", "dev"):
                (target / "sst2" / f"{split}.tsv").write_bytes(z.read(f"SST-2/{split}.tsv"))
    missing = [f for f in needed if f.startswith("lm-bff/") and not (target / f).exists()]
    if missing:
        print(f"mezo: downloading LM-BFF's {', '.join(folders)} to {target}/lm-bff",
              file=sys.stderr)
        with (urllib.request.urlopen(DATA_URLS["lm-bff"], timeout=60) as r,
              tarfile.open(fileobj=r, mode="r|") as t):
            for member in t:
                parts = Path(member.name).parts  # original/<folder>/<file>
                if (len(parts) == 3 and parts[0] == "original" and parts[1] in folders
                        and member.isfile()):
                    out = target / "lm-bff" / parts[1] / parts[2]
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with t.extractfile(member) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst)
    return target
