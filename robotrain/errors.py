"""The one exception type robotrain shows to users.

A `UserError` is bad input — a config value, a path, a dataset, a checkpoint — found
where it is first known. Its message is one line that says what is wrong and how to fix
it; the CLI prints it as ``robotrain: error: <message>`` and exits with status 2, with no
traceback. Anything else that escapes is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input; ``str(err)`` is a one-line message that names the fix."""

    def __init__(self, message: str):
        if "\n" in message:
            raise ValueError(f"UserError messages must be one line, got: {message!r}")
        super().__init__(message)
