"""The exception types a user acts on: one line, no traceback.

The CLI turns a ``ConfigError`` into a single ``error: ...`` line and exit code 2,
so its message must name the offending key/value *and* the fix. A ``RunError`` (the
run itself went wrong, e.g. a NaN loss) is one ``error: ...`` line and exit code 1.
"""


class ConfigError(ValueError):
    pass


class RunError(RuntimeError):
    exit_code = 1


class RunInterrupted(RunError):
    """SIGTERM or Ctrl-C: results.json says ``interrupted``; the same command resumes."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code
