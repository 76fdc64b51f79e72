"""The ways a run stops on purpose, shared by the reference and its harness. The command line
prints either as one line (`mezo: error: ...`); anything else is a bug and keeps its traceback."""

import os


class UsageError(ValueError):
    """Bad input: reported as one line that says what was wrong and how to fix it."""


class NonFiniteLoss(RuntimeError):
    """A loss came back NaN or infinite: the step is abandoned and θ is left as the last good step
    left it."""


class Stopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a run with --out (runs.StopOnSignal). `signal` names the signal;
    `step` is the step whose checkpoint was written before the stop, or None for a second signal,
    which stops at once; `code` is the shell's exit status for the signal (128 + its number)."""

    def __init__(self, signal: str, step: int | None, code: int):
        super().__init__(signal if step is None else f"{signal} after step {step}")
        self.signal, self.step, self.code = signal, step, code


def says_mistakes() -> bool:
    """Whether this process prints a UsageError. Under torchrun every rank of a machine meets the
    same mistake (the same flags, files and checks): local rank 0 alone says it, once a machine."""
    world, local = os.environ.get("WORLD_SIZE", ""), os.environ.get("LOCAL_RANK", "")
    return not (world.isdigit() and int(world) > 1 and local.isdigit() and int(local) > 0)
