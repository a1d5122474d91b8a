"""One error style for every command: an expected error is one ``error: ...`` line and exit code 2.

Expected errors are the ones a user can fix: bad config or arguments, missing files, bad data
or checkpoints (``ValueError`` and its subclasses such as ``DataError`` and ``ConfigError``,
``FileNotFoundError``, a non-finite training loss). Anything else is a bug and keeps its
traceback. ``PF_DEBUG=1`` shows the traceback of expected errors too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


class NonFiniteLoss(RuntimeError):
    """The training loss (or the gradient norm) stopped being finite; the run stops before the update.

    Defined here, at the bottom of the import map, so that this policy does not import the
    training script (and ``python -m pf.train`` raises the same class that ``pf.train`` names).
    """


def expected_errors() -> tuple[type[BaseException], ...]:
    return (ValueError, FileNotFoundError, NotADirectoryError, NonFiniteLoss)


def debug() -> bool:
    return os.environ.get("PF_DEBUG", "") not in ("", "0", "false", "False")


def one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    if isinstance(err, KeyError) and text.startswith(("'", '"')):
        text = text[1:-1]
    return "error: " + " ".join(text.split())


def run_command(fn: Callable[[], object]) -> int:
    """Call ``fn()``; an expected error becomes one line on stderr and exit code 2."""
    try:
        result = fn()
    except expected_errors() as err:
        if debug():
            raise
        print(one_line(err), file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0
