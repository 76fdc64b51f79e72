"""The two ways a run stops on purpose, shared by the reference and its harness. The command line
prints either as one line (`mezo: error: ...`); anything else is a bug and keeps its traceback."""


class UsageError(ValueError):
    """Bad input: reported as one line that says what was wrong and how to fix it."""


class NonFiniteLoss(RuntimeError):
    """A loss came back NaN or infinite: the step is abandoned and θ is left as the last good step
    left it."""
