"""Progress bars that stay readable in log files: tqdm on a terminal, one plain line every few seconds elsewhere.

Why: a tqdm bar redraws itself with ``\\r`` several times a second. On a terminal that is what one wants; redirected
to a file (a cluster job's log, ``cmd > log.txt``, CI) every redraw stays in the file - a demo log became 276 KB of
``\\r`` frames. :func:`bar` returns a real ``tqdm`` when its stream is a terminal, and otherwise a tqdm subclass
(:class:`PlainLines`) that prints the same statistics (count, rate, ETA, postfix) as one ordinary line at most every
``PLAIN_INTERVAL_S`` seconds, plus one line at the start and a final one at the end. Every project command that
shows progress (predict, the dataset converters, the trainer) goes through this one function, so they all behave
the same way.

It lives in ``data_pipelines`` because that package must not import ``facemae_jax`` (it is JAX-free for its worker
processes), while ``facemae_jax`` may import ``data_pipelines``.

``TQDM_DISABLE=1`` in the environment turns every bar off (tqdm's own convention, honoured for both kinds).
"""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

from tqdm import tqdm

PLAIN_INTERVAL_S = 5.0  # seconds between two plain lines when the output is not a terminal
PLAIN_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
PLAIN_FORMAT_NO_TOTAL = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or file-like objects without isatty
        return False


def disabled_by_environment() -> bool:
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes")


class PlainLines(tqdm):
    """tqdm that writes whole lines (no ``\\r``, no bar redraws): start, every ``mininterval`` s, and the end.

    The line is tqdm's own meter text without the bar (``desc:  40% 400/1000 [00:10<00:15, 40.0frame/s]``), so the
    statistics are identical to the terminal bar. ``leave=False`` bars print their last line too: in a log the
    final count and rate of every stage are worth keeping.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs["mininterval"] = max(kwargs.get("mininterval", 0.0), PLAIN_INTERVAL_S)
        kwargs["maxinterval"] = max(kwargs.get("maxinterval", 10.0), kwargs["mininterval"])
        kwargs["dynamic_ncols"] = False
        if kwargs.get("total") is None and args and hasattr(args[0], "__len__"):
            kwargs["total"] = len(args[0])
        kwargs.setdefault("bar_format", PLAIN_FORMAT if kwargs.get("total") else PLAIN_FORMAT_NO_TOTAL)
        kwargs["miniters"] = 0  # a line is due when mininterval has passed, whatever the count
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg is not None and not msg.strip():  # tqdm clearing its line: nothing to clear in a log
            return False
        line = self.__str__() if msg is None else msg
        self._printed_n = self.n
        self.fp.write(line.rstrip() + "\n")
        self.fp.flush()
        return True

    def close(self) -> None:
        if self.disable:
            return
        if getattr(self, "_printed_n", None) != self.n:
            self._ema_dt = lambda: None  # the final line shows the overall rate, as tqdm does
            self.display()
        self.leave = False  # tqdm's close would print the line again and a newline; the line is already out
        super().close()


def bar(iterable: Any = None, *, total: float | None = None, desc: str | None = None, unit: str = "it",
        file: TextIO | None = None, disable: bool = False, **kwargs: Any) -> tqdm:
    """A progress bar on ``file`` (default stderr): tqdm on a terminal, :class:`PlainLines` otherwise.

    Arguments are tqdm's. ``disable=True`` (or ``TQDM_DISABLE=1``) gives a silent bar that still counts.
    """
    stream = sys.stderr if file is None else file
    disable = bool(disable) or disabled_by_environment()
    cls = tqdm if _is_terminal(stream) else PlainLines
    if cls is tqdm:
        kwargs.setdefault("dynamic_ncols", True)
    return cls(iterable, total=total, desc=desc, unit=unit, file=stream, disable=disable, **kwargs)


def write(message: str, *, file: TextIO | None = None) -> None:
    """Print a line without breaking an active terminal bar (tqdm.write), to stderr by default."""
    tqdm.write(message, file=sys.stderr if file is None else file)
