"""What the command prints besides its results, and how it stops on Ctrl-C.

Quiet and plain by default: log records of WARNING and above as ``zfatlas: warning: ...`` on
stderr, nothing from Ray below a warning (no "Started a local Ray instance", no "Uploading
package" lines, no token-auth notice), library warnings (the ``warnings`` module) hidden. ``-v``
shows INFO records with timestamps and everything Ray says; ``-vv`` adds DEBUG.

Ctrl-C: the first press raises :class:`KeyboardInterrupt` (jobs unwind: a run is left
uncommitted, a training run keeps its checkpoints), and the records its unwinding logs below
ERROR are dropped, so the command ends with the one line it prints itself; a second press says
that it is still stopping, a third stops the process at once.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a process stopped by Ctrl-C
HANDLER_NAME = "zfatlas-cli"
VERBOSE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _State:
    verbosity = 0
    interrupts = 0
    saved: tuple[int, int, bool] | None = None  # root level, py.warnings level, warnings captured


STATE = _State()


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (a test's capture replaces it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        """Ignored: StreamHandler sets it once; the record goes to the current ``sys.stderr``."""


class PlainFormatter(logging.Formatter):
    """``zfatlas: warning: <message>``: no time, no logger name."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"zfatlas: {record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def _not_after_interrupt(record: logging.LogRecord) -> bool:
    # After Ctrl-C the command prints one line saying what was kept; what the unwinding jobs log
    # on the way out ("run ... failed before commit (KeyboardInterrupt)") would repeat it.
    return STATE.interrupts == 0 or record.levelno >= logging.ERROR


def _not_ray_notice(record: logging.LogRecord) -> bool:
    # Ray 2.60 warns on every local start that it enabled token authentication (and, when it is
    # off, that it is off): advice about Ray's own set-up, not about the command the user ran.
    return not (record.name.startswith("ray._private.authentication") and record.levelno < logging.ERROR)


def verbosity() -> int:
    """0 by default, 1 with ``-v``, 2 with ``-vv``."""
    return STATE.verbosity


def configure(level: int) -> None:
    """Set up logging for a run of the command (``level``: the number of ``-v``)."""
    STATE.verbosity = level
    STATE.interrupts = 0
    root = logging.getLogger()
    if STATE.saved is None:
        captured = logging.getLogger("py.warnings")
        STATE.saved = (root.level, captured.level, logging._warnings_showwarning is not None)
    for old in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(old)
    handler = _CurrentStderr()
    handler.set_name(HANDLER_NAME)
    if level:
        handler.setFormatter(logging.Formatter(VERBOSE_FORMAT))
    else:
        handler.setFormatter(PlainFormatter())
        handler.addFilter(_not_after_interrupt)
        # Libraries that set their own loggers' levels (botocore's "Found credentials", werkzeug's
        # request lines) still stop here: quiet means warnings and errors only.
        handler.setLevel(logging.WARNING)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if level > 1 else logging.INFO if level else logging.WARNING)
    logging.captureWarnings(True)  # the warnings module's messages become records of py.warnings
    logging.getLogger("py.warnings").setLevel(logging.WARNING if level else logging.ERROR)


def unconfigure() -> None:
    """Undo :func:`configure` (for callers that run several commands in one process: tests)."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(old)
    if STATE.saved is not None:
        root_level, captured_level, captured = STATE.saved
        STATE.saved = None
        root.setLevel(root_level)
        logging.getLogger("py.warnings").setLevel(captured_level)
        logging.captureWarnings(captured)


def quiet_ray() -> None:
    """Import Ray and keep its driver-side logging below warnings off the terminal (unless ``-v``).

    Ray configures its ``ray`` logger when imported (level INFO, its own stderr handler, no
    propagation) and again in ``ray.init`` (the level from ``RAY_LOGGER_LEVEL``); child loggers
    such as the Jobs SDK's set their own INFO level. The handler's level is the one place all of
    them pass, and neither step touches it.
    """
    import ray  # noqa: F401  (its logging configuration is made on import)

    forget_colorama()
    if STATE.verbosity:
        return
    for handler in logging.getLogger("ray").handlers:
        handler.setLevel(logging.WARNING)
        if _not_ray_notice not in handler.filters:
            handler.addFilter(_not_ray_notice)


def forget_colorama() -> None:
    """Ray's CLI logger calls ``colorama.init()`` when imported, which registers an exit hook that
    writes an ANSI reset (ESC[0m) to a terminal after the command's last line: unregister it."""
    for name in ("colorama.initialise", "ray.thirdparty_files.colorama.initialise"):
        module = sys.modules.get(name)
        reset = getattr(module, "reset_all", None)
        if reset is not None:
            atexit.unregister(reset)


def interrupted() -> bool:
    """Whether Ctrl-C was pressed during this command."""
    return STATE.interrupts > 0


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    STATE.interrupts += 1
    if STATE.interrupts == 1:
        raise KeyboardInterrupt
    if STATE.interrupts == 2:
        sys.stderr.write("zfatlas: still stopping (cleaning up); Ctrl-C again stops at once\n")
        sys.stderr.flush()
        return
    os._exit(EXIT_INTERRUPTED)


@contextmanager
def handling_interrupts() -> Iterator[None]:
    """Ctrl-C as described in the module docstring while the block runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)

