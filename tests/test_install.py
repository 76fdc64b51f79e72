"""Installed as a user installs it: `pip install .` and `pip install -e .` into a fresh virtual environment, then
`import mezo` from a folder of the user's own that holds a `models.py`, `tasks/`, `cache.py`, `runs.py` and
`errors.py`. Each decoy raises if imported, so any of ours that resolved to theirs (or the reverse) fails loudly.
The venv sees the packages of the Python that runs the tests (torch is not downloaded again); pip builds the
project in its own isolated build environment, as a user's pip does."""
import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DECOYS = ["models.py", "cache.py", "runs.py", "errors.py", "tasks/__init__.py"]

USE = """
import mezo, torch, torch.nn as nn
import mezo.fast, mezo.tp, mezo.cache, mezo.runs, mezo.tasks.prompts
torch.manual_seed(0)
model = nn.Linear(8, 1)
x = torch.randn(128, 8)
y = x @ torch.randn(8, 1)
opt = mezo.MeZO(model.parameters(), lr=5e-2, eps=1e-3, seed=0)
first = opt.step(lambda: nn.functional.mse_loss(model(x), y))
for _ in range(300):
    last = opt.step(lambda: nn.functional.mse_loss(model(x), y))
print(mezo.__file__)
print(mezo.runs.__file__)
print(f"{first:.6f} {last:.6f}")
"""


def fresh_venv(tmp_path: Path) -> Path:
    """A new venv that sees the packages of the Python running the tests (torch, transformers): the system's and,
    when the tests run inside a venv of their own, that venv's too (a venv made from a venv sees only the base
    Python's), through a .pth file after its own site-packages."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(env_dir)
    bin_dir = env_dir / "bin"
    own = subprocess.run([bin_dir / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    Path(own, "tests-python.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return bin_dir


def user_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "project"
    for decoy in DECOYS:
        (folder / decoy).parent.mkdir(parents=True, exist_ok=True)
        (folder / decoy).write_text(f"raise SystemExit('the user\\'s own {decoy} was imported')\n")
    return folder


@pytest.mark.parametrize("editable", [False, True], ids=["pip install .", "pip install -e ."])
def test_installed_mezo_imports_from_a_foreign_folder_with_decoys_and_learns(tmp_path, editable):
    source = tmp_path / "source"
    # A copy of the checkout, so that the editable install's link tree (build/) is not written into the repository.
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "runs", "*.egg-info", "__pycache__"))
    bin_dir = fresh_venv(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    target = ["-e", str(source)] if editable else [str(source)]
    subprocess.run([bin_dir / "python", "-m", "pip", "install", "-q", "--no-deps", *target], check=True, env=env,
                   cwd=tmp_path, capture_output=True)
    folder = user_folder(tmp_path)
    out = subprocess.run([bin_dir / "python", "-c", USE], cwd=folder, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    mezo_file, runs_file, losses = out.stdout.split("\n")[:3]
    # The module comes from the venv (or, editable, from the link tree pointing at the copy), never the decoys.
    assert str(folder) not in mezo_file and str(folder) not in runs_file
    assert Path(runs_file).resolve().parent == Path(mezo_file).resolve().parent / ("" if editable else "mezo")
    first, last = map(float, losses.split())
    assert last < first / 20, losses
    # Nothing of ours is importable at the top level: only `mezo` is.
    leak = subprocess.run([bin_dir / "python", "-c", "import fast"], cwd=tmp_path, env=env, capture_output=True)
    assert leak.returncode != 0
    help_out = subprocess.run([bin_dir / "mezo", "--help"], cwd=folder, env=env, capture_output=True, text=True)
    assert help_out.returncode == 0 and "--task" in help_out.stdout, help_out.stderr[-2000:]


def test_the_checkout_runs_as_a_script_from_a_folder_with_decoys(tmp_path):
    """`python path/to/mezo.py` finds its own files next to it, never the user's."""
    out = subprocess.run([sys.executable, str(ROOT / "mezo.py"), "--help"], cwd=user_folder(tmp_path),
                         capture_output=True, text=True)
    assert out.returncode == 0 and "--task" in out.stdout, out.stderr[-2000:]


WITHOUT_POSIX = """
import signal, sys
sys.modules["fcntl"] = None  # `import fcntl` raises ImportError, as on Windows
del signal.SIGHUP  # as on Windows
sys.path.insert(0, sys.argv.pop(1))
import mezo
exec(sys.argv.pop(1))  # USE: mezo.MeZO in a loop of one's own
sys.exit(mezo.main(sys.argv[1:]))
"""


def test_mezo_imports_learns_and_runs_without_fcntl_or_sighup_as_on_windows(model_dir, tmp_path):
    """Windows has neither fcntl nor SIGHUP, and `import mezo` failed there before any code of the user's ran. A
    Python without them imports mezo, learns with mezo.MeZO, and runs the command line (without --out: a run folder's
    lock takes msvcrt's on Windows, which this machine has not)."""
    from conftest import tiny_args
    args = tiny_args(model_dir, tmp_path / "unused")
    args = [str(a) for a in args[:args.index("--out")] + ["--device", "cpu", "--threads", "1"]]
    out = subprocess.run([sys.executable, "-c", WITHOUT_POSIX, str(ROOT), USE, *args], cwd=user_folder(tmp_path),
                         capture_output=True, text=True)
    assert out.returncode == 0 and "done in" in out.stdout, out.stderr[-3000:]
    first, last = map(float, out.stdout.splitlines()[2].split())
    assert last < 0.1 * first
