"""How every command fails: one line ``zfatlas: <reason>`` on stderr and an exit code (2 for bad
input, 1 for anything else), the traceback only with ``-v``."""

from __future__ import annotations

import logging
import sys

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1

log = logging.getLogger("zfatlas")


def reason(exc: BaseException) -> str:
    """The one line that says what went wrong: for an error raised in a Ray actor or task, the
    original error's (Ray wraps it with its traceback)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)  # RayTaskError / RayActorError carry the original here
        if isinstance(cause, BaseException):
            exc = cause
            continue
        break
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if len(lines) > 1 and lines[0].startswith(("Traceback", "ray::", "\x1b")):
        return lines[-1]  # a traceback pasted into the message: its last line is the error
    first = lines[0]
    if isinstance(exc, KeyError) and first.startswith(("'", '"')):
        first = first[1:-1]  # KeyError's str() quotes its message
    return first


def fail(message: str, code: int = EXIT_FAILED) -> int:
    print(f"zfatlas: {message}", file=sys.stderr)
    return code


def fail_with(exc: BaseException, verbose: bool, code: int = EXIT_FAILED) -> int:
    """Report ``exc`` in one line (its traceback too when ``verbose``) and return ``code``."""
    if verbose:
        log.error("traceback", exc_info=exc)
    return fail(reason(exc), code)
