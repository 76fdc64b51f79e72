"""The README's "MeZO in your own loop" example runs as shown and prints what the README says it
prints."""
import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_own_loop_example_runs_and_prints_what_the_readme_shows():
    section = README.read_text().split("## MeZO in your own loop", 1)[1]
    code, shown = re.findall(r"```(?:python)?\n(.*?)```", section, re.S)[:2]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    got = [line.split() for line in out.getvalue().splitlines()]
    want = [line.split() for line in shown.strip().splitlines()]
    assert [g[0] for g in got] == [w[0] for w in want], (got, want)
    # the printed loss, to its 4 decimals (another CPU may round a last bit apart)
    for g, w in zip(got, want):
        # the README prints 4 decimals: a last bit may flip the 4th; abs 2e-4 is 2 of them
        assert float(g[1]) == pytest.approx(float(w[1]), rel=1e-3, abs=2e-4), (got, want)
    assert float(want[-1][1]) < 0.1 * float(want[0][1]), "the example does not show learning"
