"""One error style for every command: an expected error is one ``error: ...`` line and exit code 2.

Expected errors are the ones a user can fix: bad config or arguments, missing files, bad data
or checkpoints (``ValueError`` and its subclasses such as ``DataError`` and ``ConfigError``,
``FileNotFoundError``, a non-finite training loss), and what the file system refuses (a full
disk, a read-only or forbidden folder, a file where a folder is wanted: ``OSError`` with one of
``USER_ERRNOS``, reported with the file it names). Anything else is a bug and keeps its
traceback. ``PF_DEBUG=1`` shows the traceback of expected errors too.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable

USER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR,
                         errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.EFBIG})


class NonFiniteLoss(RuntimeError):
    """The training loss (or the gradient norm) stopped being finite; the run stops before the update.

    Defined here, at the bottom of the import map, so that this policy does not import the
    training script (and ``python -m pf.train`` raises the same class that ``pf.train`` names).
    """


def expected_errors() -> tuple[type[BaseException], ...]:
    return (ValueError, FileNotFoundError, NotADirectoryError, NonFiniteLoss)


def debug() -> bool:
    return os.environ.get("PF_DEBUG", "") not in ("", "0", "false", "False")


def is_expected(err: BaseException) -> bool:
    return isinstance(err, expected_errors()) or (isinstance(err, OSError) and err.errno in USER_ERRNOS)


def one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.errno in USER_ERRNOS and err.strerror:
        where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
        return "error: " + " ".join(f"{where + ': ' if where else ''}{err.strerror}".split())
    text = str(err).strip() or type(err).__name__
    if isinstance(err, KeyError) and text.startswith(("'", '"')):
        text = text[1:-1]
    return "error: " + " ".join(text.split())


def run_command(fn: Callable[[], object]) -> int:
    """Call ``fn()``; an expected error becomes one line on stderr and exit code 2."""
    try:
        result = fn()
    except Exception as err:
        if debug() or not is_expected(err):
            raise
        print(one_line(err), file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0
