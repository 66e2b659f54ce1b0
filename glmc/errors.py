"""glmc's one error type for user mistakes.

A GlmcError is something the user can fix (a bad path, an unsupported config, a
prompt that does not fit). The CLI prints its message as one line and exits with
`exit_code`; anything else escaping is a bug and keeps its traceback.
"""


class GlmcError(Exception):
    """A problem with the user's input, stated in one line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class VerificationError(GlmcError):
    """A compiled artifact disagrees with the reference model beyond tolerance."""

    exit_code = 3


class GlmcWarning(UserWarning):
    """Something the user should know that does not stop the work (the CLI prints it as
    `glmc: warning: ...`; from Python it is an ordinary warning)."""


def warn(message: str) -> None:
    import warnings

    warnings.warn(message, GlmcWarning, stacklevel=3)
