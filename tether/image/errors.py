"""The one error type the build reports to the user.

Every failure the pipeline expects carries a message that says what went
wrong and what to do next; the CLI prints it and exits non-zero, without a
Python traceback for these expected failures.
"""


class BuildError(RuntimeError):
    """An expected build failure with an actionable message."""
