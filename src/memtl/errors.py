"""One exception type for every user-facing configuration/data problem.

The CLI turns a ``ConfigError`` into a single ``error: ...`` line and exit code 2,
so its message must name the offending key/value *and* the fix.
"""


class ConfigError(ValueError):
    pass
