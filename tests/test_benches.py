"""Every benchmark in bench/ runs, as a user runs it: `python bench/X.py ...` in its own process, from a foreign
working folder, on the tiny Llama (or tiny tensors) and the fewest steps, to its table. A benchmark's numbers are
not tested here (they are timings and memory, read by a person); that it still runs after the code it calls
changes is. bench/precision.py once stopped with a TypeError after runs.Run changed its arguments, unnoticed.

bench/step.py runs only its plain backends here (its compiled ones take minutes to build on a CPU; tests/
test_compiled.py tests those). bench/gpu.sh needs a GPU, bench/same_steps.sh an earlier commit to compare with.
"""
import json
import os
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
                   "--device", "cpu"],
                  ["inference", "mezo-lora", "adam-lora"], {}),
    "trainer_memory.py": (["--model", "{model}", "--cases", "forward,mezo-lora", "--threads", "1",
                           "--device", "cpu"],
                          ["forward", "mezo-lora"], {}),
    "perturb.py": (["--device", "cpu", "--numel", "4096", "--repeat", "2"], ["reference"], {"TRITON_INTERPRET": "1"}),
    "rules.py": (["--device", "cpu", "--numel", "4096", "--tensors", "2", "--repeat", "1", "--threads", "1"],
                 ["momentum", "adam"], {}),
    "precision.py": (["--model", "{model}", "--steps", "3", "--eps", "1e-3,3e-2", "--threads", "1"],
                     ["| float16 | 0.001 |", "| bfloat16 | 0.03 |", "least error"], {}),
    "step.py": (["--device", "cpu", "--sizes", "tiny", "--modes", "lora", "--backends", "original,reference", "--repeat", "1",
                 "--batch-size", "1", "--seq-len", "8"], ["original", "reference"], {}),
    "tp.py": (["--model", "{model}", "--steps", "1", "--batch-size", "4", "--length", "8", "--threads", "1"],
              ["TP = 2", "DP = 2", "all_reduce"], {}),
    "ptx.py": (["--target", "sm_80"], ["update_kernel", "bfloat16"], {"TRITON_INTERPRET": "0"}),
}
NOT_HERE = {"compare_logs.py"}  # below, on two real logs


def test_every_benchmark_is_run_here():
    assert {p.name for p in BENCH.glob("*.py")} == set(CASES) | NOT_HERE


@pytest.mark.parametrize("name", sorted(CASES))
def test_benchmark_runs_from_a_foreign_folder(name, model_dir, tmp_path):
    if name in ("perturb.py", "ptx.py"):
        pytest.importorskip("triton")
    args, words, env = CASES[name]
    out = ok(bench(name, *(a.format(model=model_dir("llama+tasks")) for a in args), cwd=tmp_path, env=env))
    missing = [w for w in words if w not in out]
    assert not missing, f"{name} printed no {missing}:\n{out[-2000:]}"


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
    real SST-2 sentences; it prints the perplexity before and after. A missing --data is one line, not a traceback."""
    pytest.importorskip("peft")
    example = ROOT / "examples" / "finetune_smollm2.py"
    out = ok(script(example, "--model", model_dir("llama+tasks"), "--steps", "5", "--train", "16", "--out",
                    str(tmp_path / "out"), cwd=tmp_path))
    assert "held-out perplexity:" in out and out.count("training loss") == 5, out[-2000:]
    proc = script(example, "--data", str(tmp_path / "none.tsv"), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "--data" in proc.stderr.splitlines()[-1]
