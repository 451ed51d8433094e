"""The exception types a user acts on: one line, no traceback.

The CLI turns a ``ConfigError`` into a single ``error: ...`` line and exit code 2,
so its message must name the offending key/value *and* the fix. A ``RunError`` (the
run itself went wrong, e.g. a NaN loss) is one ``error: ...`` line and exit code 1.
"""


class ConfigError(ValueError):
    pass


class RunError(RuntimeError):
    pass
