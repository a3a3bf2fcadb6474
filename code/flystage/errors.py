"""The one error convention: every failure a user can mend is a :class:`FlystageError`.

A command raises it with a message that says what is wrong and what to do; :func:`run_command`
(used by ``cli.main`` and ``python -m flystage_local``; the training program and the serve
entrypoint keep the exit codes SageMaker reads) is the one place that turns it into
``flystage COMMAND: error: MESSAGE`` on stderr and the exit code.
Library callers catch ``FlystageError`` (or the specific subclass) instead of a list of types.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class FlystageError(Exception):
    """A failure the user can mend: ``str(error)`` says what to do; ``exit_code`` is for the CLI.

    Subclasses keep their historical standard base as well (``ValueError``, ``RuntimeError``),
    so ``except ValueError`` in callers written before this base still works.
    """

    exit_code: int = 2

    def __init__(self, message: str = "", *args: object, exit_code: int | None = None):
        super().__init__(message, *args)
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def run_command(command: str, run: Callable[[], int | None]) -> int:
    """``run()``'s exit code (``None`` is 0); a :class:`FlystageError` it raises becomes
    ``flystage COMMAND: error: MESSAGE`` on stderr and the error's ``exit_code``.

    Anything else propagates: a traceback is the honest report of a bug.
    """
    try:
        return int(run() or 0)
    except FlystageError as exc:
        print(f"flystage {command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
