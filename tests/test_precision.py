"""--dtype float16/bfloat16 with an ε whose measured error of projected_grad is over 1 (runs.PRECISION_ERROR,
from bench/precision.py's table in docs/precision.md) prints one note naming the ε the table recommends, and
the run goes on; float32, or a faithful ε, prints none."""
import math

import pytest
from conftest import run, tiny_args

from mezo import runs


def nearest(errors: dict, eps: float) -> float:
    return min(errors, key=lambda e: abs(math.log(e / eps)))


@pytest.mark.parametrize("dtype", sorted(runs.PRECISION_ERROR))
def test_an_unfaithful_eps_in_low_precision_gets_one_note_and_the_run_goes_on(model_dir, tmp_path, capsys,
                                                                             dtype):
    errors = runs.PRECISION_ERROR[dtype]
    best = min(errors, key=errors.get)
    for eps in sorted(errors):
        argv = tiny_args(model_dir, tmp_path / f"{dtype}-{eps}", dtype=dtype, eps=eps, steps=1, eval_every=0)
        code, out, err = run(argv, capsys)
        notes = [line for line in out.splitlines() if line.startswith("mezo: note:")]
        assert code == 0, err[-2000:]
        if errors[nearest(errors, eps)] > 1:
            assert len(notes) == 1 and f"--eps {best:g}" in notes[0] and dtype in notes[0], notes
        else:
            assert notes == [], notes


def test_float32_gets_no_note(model_dir, tmp_path, capsys):
    code, out, _ = run(tiny_args(model_dir, tmp_path / "f32", eps=1e-3, steps=1, eval_every=0), capsys)
    assert code == 0 and "mezo: note:" not in out
