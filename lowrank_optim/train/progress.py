"""Training progress: a one-line bar redrawn in place on a terminal, plain lines elsewhere (logs, CI, pipes).

On a terminal every update redraws ``[galore] 45/200 ██████▊          23%  loss 3.2104  lr 1.00e-02
12,345 tok/s  ETA 0:00:31``; other messages (evaluations, the final loss) are printed on their own line
above it. Elsewhere the same fields are printed as one line every ``every`` updates and at the last one,
so a log file holds no carriage returns.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

__all__ = ["Progress"]

_BAR_WIDTH = 20
_EIGHTHS = " ▏▎▍▌▋▊▉█"


def _clock(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _bar(fraction: float) -> str:
    filled = max(0.0, min(1.0, fraction)) * _BAR_WIDTH
    whole = int(filled)
    part = _EIGHTHS[int((filled - whole) * 8)] if whole < _BAR_WIDTH else ""
    return ("█" * whole + part).ljust(_BAR_WIDTH)


class Progress:
    """Progress of ``total`` updates of the run ``name``.

    Output: ``log`` (a callable taking a line, e.g. a logger's method: plain lines only), or ``stream``
    (standard output when neither is given, or when ``log`` is ``print``). ``tty``: draw the bar on
    ``stream`` (``None``: when it is a terminal). ``every``: on plain output, a line every this many
    updates (and at the last). ``start``: the update the run starts from (a resumed run), so that the rate
    and the ETA count only this session's updates.
    """

    def __init__(
        self,
        total: int,
        name: str,
        *,
        log: Callable[[str], None] | None = None,
        stream: TextIO | None = None,
        tty: bool | None = None,
        every: int = 1,
        start: int = 0,
    ) -> None:
        if total < 1:
            raise ValueError(f"total ({total}) must be >= 1")
        if every < 1:
            raise ValueError(f"every ({every}) must be >= 1")
        self.total, self.name, self.every, self.start = total, name, every, start
        self._log = None if log is None or log is print else log
        self.stream = sys.stdout if stream is None else stream
        if self._log is not None:
            self.tty = False
        else:
            self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self._begun = time.perf_counter()
        self._drawn = False  # a bar is on the current line

    def update(self, step: int, loss: float, lr: float, tokens_per_second: float, note: str = "") -> None:
        """After update ``step`` (1-based): redraw the bar, or write a line when one is due."""
        done = step - self.start
        elapsed = time.perf_counter() - self._begun
        eta = elapsed / done * (self.total - step) if done > 0 else 0.0
        fields = f"loss {loss:.4f}  lr {lr:.2e}  {tokens_per_second:,.0f} tok/s"
        if self.tty:
            percent = 100 * step / self.total
            line = (
                f"[{self.name}] {step}/{self.total} {_bar(step / self.total)} {percent:3.0f}%  "
                f"{fields}  ETA {_clock(eta)}{note}"
            )
            self.stream.write("\r" + line + "\x1b[K")  # erase what a longer previous line left
            self._drawn = True
            if step == self.total:
                self.stream.write("\n")
                self._drawn = False
            self.stream.flush()
        elif step % self.every == 0 or step == self.total:
            self._line(f"[{self.name}] update {step}/{self.total}  {fields}  ETA {_clock(eta)}{note}")

    def message(self, text: str) -> None:
        """A line of its own (an evaluation, the final loss), above the bar on a terminal."""
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self._drawn = False
        self._line(text)

    def _line(self, text: str) -> None:
        if self._log is not None:
            self._log(text)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()
