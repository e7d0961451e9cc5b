"""How the command fails: its exit codes, and the error that carries one up to :func:`~bnfold.cli.main.run`."""

from __future__ import annotations

__all__ = ["ExitCode", "CliError"]


class ExitCode:
    """The command's exit codes (listed in ``bnfold --help``)."""

    OK = 0
    INTERNAL = 1
    USAGE = 2
    UNREADABLE = 3
    VERIFICATION = 4
    OUTPUT = 5


class CliError(Exception):
    """A failure the command explains in one message and ends with ``code``."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code
