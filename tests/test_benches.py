"""Every benchmark in bench/ runs, as a user runs it: `python bench/X.py ...` in its own process, from a foreign
working folder, on the tiny Llama (or tiny tensors) and the fewest steps, to its table. A benchmark's numbers are
not tested here (they are timings and memory, read by a person); that it still runs after the code it calls
changes is. bench/precision.py once stopped with a TypeError after runs.Run changed its arguments, unnoticed.

bench/step.py runs only its plain backends here (its compiled ones take minutes to build on a CPU; tests/
test_compiled.py tests those). bench/gpu.sh needs a GPU, bench/same_steps.sh an earlier commit to compare with.
"""
import datetime
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import records, run, tiny_args

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def script(path: Path, *args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python path args...` in its own process, from cwd, on one thread and offline."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           **(env or {})}
    return subprocess.run([sys.executable, str(path), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def bench(name: str, *args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return script(BENCH / name, *args, cwd=cwd, env=env)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


# name -> (arguments, with {model} for the tiny Llama's folder; words its output must hold; extra environment)
CASES = {
    "cache.py": (["--model", "{model}", "--k-layers", "1", "--steps", "3", "--test-rows", "8", "--threads", "1"],
                 ["step ref step cache  ratio"], {}),
    "drift.py": (["--device", "cpu", "--numel", "1024", "--steps", "3"], ["float32", "bfloat16"], {}),
    "memory.py": (["--model", "{model}", "--cases", "inference,mezo-lora,adam-lora", "--threads", "1",
                   "--device", "cpu", "--json", "rows.json", "--repeat", "2"],
                  ["inference", "mezo-lora", "adam-lora"], {}),
    "trainer_memory.py": (["--model", "{model}", "--cases", "forward,mezo-lora", "--threads", "1",
                           "--device", "cpu"],
                          ["forward", "mezo-lora"], {}),
    "perturb.py": (["--device", "cpu", "--numel", "4096", "--repeat", "2"], ["reference"], {"TRITON_INTERPRET": "1"}),
    "rules.py": (["--device", "cpu", "--numel", "4096", "--tensors", "2", "--repeat", "1", "--threads", "1"],
                 ["momentum", "adam"], {}),
    "precision.py": (["--model", "{model}", "--steps", "3", "--eps", "1e-3,3e-2", "--threads", "1", "--json", "rows.json"],
                     ["| float16 | 0.001 |", "| bfloat16 | 0.03 |", "least error"], {}),
    "step.py": (["--device", "cpu", "--sizes", "tiny", "--modes", "lora", "--backends", "original,reference", "--repeat", "1",
                 "--batch-size", "1", "--seq-len", "8"], ["original", "reference"], {}),
    "tp.py": (["--model", "{model}", "--steps", "1", "--batch-size", "4", "--length", "8", "--threads", "1"],
              ["TP = 2", "DP = 2", "all_reduce"], {}),
    "ptx.py": (["--target", "sm_80"], ["update_kernel", "bfloat16"], {"TRITON_INTERPRET": "0"}),
}
NOT_HERE = {"compare_logs.py"}  # below, on two real logs

# a user's honest mistake with each benchmark: (its name, its arguments with {missing} for a path that is not there,
# what its one line says after "bench/NAME: error: ", extra environment)
MISTAKES = [
    ("cache.py", ["--steps", "0"], r"argument --steps: '0': give a whole number of 1 or more", {}),
    ("cache.py", ["--model", "{missing}", "--steps", "1", "--k-layers", "1"],
     r"cannot load model '.*missing': no such folder", {}),
    ("drift.py", ["--eps", "0"], r"argument --eps: '0': give a finite number over 0", {}),
    ("drift.py", ["--device", "cuda:7"], r"argument --device: .*cuda.*use .*--device cpu", {}),  # no GPU, or fewer than 8
    ("memory.py", ["--model", "{missing}", "--cases", "inference", "--device", "cpu", "--threads", "1"],
     r"cannot load model '.*missing': no such folder", {}),
    ("memory.py", ["--cases", "mezo-lora"], r"--cases mezo-lora: start with inference \(the reference\)", {}),
    ("trainer_memory.py", ["--max-length", "2"], r"argument --max-length: '2': give a whole number of 8 or more", {}),
    ("perturb.py", ["--device", "cpu"], r"this benchmark runs the Triton kernels: use --device cuda on a GPU, or set "
     r"TRITON_INTERPRET=1", {"TRITON_INTERPRET": "0"}),
    ("perturb.py", ["--numel", "-5"], r"argument --numel: '-5': give a whole number of 1 or more", {}),
    ("rules.py", ["--device", "cpu", "--numel", "10"], r"--numel 10 cuts into --tensors 32 of 64 columns", {}),
    ("precision.py", ["--eps", "1e-3,abc"], r"argument --eps: 'abc': give a finite number over 0", {}),
    ("precision.py", ["--json", "{steps0}"], r"argument --json: .*steps0 is a folder; give a file name", {}),
    ("memory.py", ["--json", "{text}"], r"argument --json: .*text.md is not a JSON file .*it was left as it is", {}),
    ("step.py", ["--sizes", "tiny,huge"], r"argument --sizes: huge: choose from tiny, smol, 135m, 1b", {}),
    ("tp.py", ["--model", "{missing}", "--steps", "1", "--batch-size", "4", "--length", "8"],
     r"cannot load model '.*missing': no such folder", {}),
    ("ptx.py", ["--target", "sm_70"], r"argument --target: invalid choice: 'sm_70'", {"TRITON_INTERPRET": "0"}),
    ("compare_logs.py", ["{missing}", "{missing}"], r".*missing: no log.jsonl there; give a run's folder", {}),
    ("compare_logs.py", ["{text}", "{text}"], r".*text.md: line 1 is not a log record", {}),
    ("compare_logs.py", ["{steps0}", "{steps0}"], r".*log.jsonl: no MeZO step logged in it", {}),
    ("compare_logs.py", ["", "{steps0}"], r"reference is empty; give a value$", {}),
]


def test_every_benchmark_is_run_here():
    benchmarks = {p.name for p in BENCH.glob("*.py") if not p.name.startswith("_")}  # (_cli.py: their shared part)
    assert benchmarks == set(CASES) | NOT_HERE == {name for name, *_ in MISTAKES}


@pytest.mark.parametrize("name, args, said, env", MISTAKES, ids=[f"{m[0]}:{m[1][1]}" for m in MISTAKES])
def test_a_benchmark_given_a_wrong_value_says_what_in_one_line(name, args, said, env, tmp_path):
    """A wrong value (out of range, not a number, not among the choices, a device or model not there, an unreadable
    log) is one line that names it, exit status 2, no traceback: checked by the benchmark's command line
    (bench/_cli.py) or by mezo's own checks in the code it calls."""
    if name in ("perturb.py", "ptx.py"):
        pytest.importorskip("triton")
    (tmp_path / "text.md").write_text("# not\na log\n")
    (tmp_path / "steps0").mkdir()  # a run of --steps 0: its evaluation, no step
    (tmp_path / "steps0" / "log.jsonl").write_text(json.dumps(dict(step=0, split="dev", accuracy=0.5, n=8)) + "\n")
    paths = dict(missing=tmp_path / "missing", text=tmp_path / "text.md", steps0=tmp_path / "steps0")
    proc = bench(name, *(a.format(**paths) for a in args), cwd=tmp_path, env=env)
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-3000:]
    assert re.match(rf"bench/{re.escape(name)}: error: {said}", errors[0]), errors[0]
    assert (tmp_path / "text.md").read_text() == "# not\na log\n"  # (a user's file given to --json)


@pytest.mark.parametrize("name", sorted(CASES))
def test_benchmark_runs_from_a_foreign_folder(name, model_dir, tmp_path):
    if name in ("perturb.py", "ptx.py"):
        pytest.importorskip("triton")
    args, words, env = CASES[name]
    (tmp_path / "rows.json").write_text("[]")  # an earlier run's rows: --json writes over them
    out = ok(bench(name, *(a.format(model=model_dir("llama+tasks")) for a in args), cwd=tmp_path, env=env))
    missing = [w for w in words if w not in out]
    assert not missing, f"{name} printed no {missing}:\n{out[-2000:]}"
    written = json.loads((tmp_path / "rows.json").read_text())
    if name == "precision.py":
        assert len(written) == 4  # (2 ε × 2 dtypes)
    if name == "memory.py":  # RESULTS.md's memory table says when, and from which commit, it was measured
        assert [r["case"] for r in written["rows"]] == ["inference", "mezo-lora", "adam-lora"]
        for r in written["rows"]:  # --repeat 2: each figure the median (here the mean) of two fresh processes
            assert len(r["peak_mb_runs"]) == 2 and r["peak_mb"] == sum(r["peak_mb_runs"]) / 2, r
        assert written["date"] == f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}"
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        assert (written["commit"] or "").split("+")[0] == (head.stdout.strip() if head.returncode == 0 else ""), written


def test_compare_logs_passes_a_run_against_itself_and_fails_an_edited_copy(model_dir, tmp_path, capsys):
    assert run(tiny_args(model_dir, tmp_path / "a", steps=3, eval_every=0), capsys)[0] == 0
    a = tmp_path / "a"
    ok(bench("compare_logs.py", str(a), str(a), cwd=tmp_path))
    b = tmp_path / "b"
    b.mkdir()
    rows = records(a)
    step = next(r for r in rows if "projected_grad" in r)
    step["projected_grad"] *= 1.01  # a 1% difference: over the default --tol 1e-3
    (b / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = bench("compare_logs.py", str(a), str(b), cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr


def test_the_trainer_example_runs_from_a_foreign_folder(model_dir, tmp_path):
    """examples/finetune_smollm2.py on the tiny Llama: MeZOTrainer with PEFT-LoRA on the causal-LM loss, 5 steps on
    real SST-2 sentences; it prints the perplexity before and after. A missing --data, a count of 0, more training
    sentences than the file has, a --model or --out that cannot be, a misspelt flag, each is one line, not a
    traceback and not argparse's usage."""
    pytest.importorskip("peft")
    example = ROOT / "examples" / "finetune_smollm2.py"
    out = ok(script(example, "--model", model_dir("llama+tasks"), "--steps", "5", "--train", "16", "--out",
                    str(tmp_path / "out"), cwd=tmp_path))
    assert "held-out perplexity:" in out and out.count("training loss") == 5, out[-2000:]
    proc = script(example, "--data", str(tmp_path / "none.tsv"), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "--data" in proc.stderr.splitlines()[-1]
    (tmp_path / "a-file").write_text("")
    for mistake, said in [(["--train", "0"], r"argument --train: '0': give a whole number of 1 or more"),
                          (["--stpes", "5"], r"unrecognized arguments: --stpes 5 \(did you mean --steps\?"),
                          (["--train", "100000"], r"--train 100000: .* has \d+ sentences .*give --train \d+ or fewer"),
                          (["--model", str(tmp_path / "gone")], r"cannot load model '.*gone': no such folder"),
                          (["--out", str(tmp_path / "a-file" / "out")], r"--out .*: cannot create it \(Not a directory\)"),
                          (["--out", ""], r"--out is empty; give a value, or leave it out for its default$")]:
        proc = script(example, *mistake, cwd=tmp_path)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and "usage:" not in proc.stderr, proc.stderr
        assert re.match(rf"finetune_smollm2.py: error: {said}", last), last
