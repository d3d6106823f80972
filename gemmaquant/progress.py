"""What a long run tells its user on stderr: a progress bar on a terminal, plain lines elsewhere.

tqdm alone (with `disable=None`) goes silent when stderr is not a terminal (`make demo | tee log`, a CI log, nohup),
so a half-hour QAT run printed nothing at all. Here a terminal gets tqdm's bar and anything else gets one plain
line when the run starts, at most every `LINE_INTERVAL` seconds after that, and when it ends:

    quantize: 0/4 layers
    quantize: 3/4 layers, 12 s elapsed, about 4 s left
    quantize: 4/4 layers, 16 s elapsed

`stage("exporting GGUF")` announces the steps between and after the bars. `enabled=False` silences both (the
CLI's `--json`); `None` (the default) and `True` show them.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TextIO

LINE_INTERVAL = 30.0  # seconds between plain progress lines when stderr is not a terminal


def stage(message: str, enabled: bool | None = None, file: TextIO | None = None) -> None:
    """One line on stderr naming the step a run is starting."""
    if enabled is False:
        return
    f = file or sys.stderr
    print(message, file=f, flush=True)


def progress(iterable: Iterable, *, desc: str, unit: str, total: int, initial: int = 0, enabled: bool | None = None,
             interval: float = LINE_INTERVAL, file: TextIO | None = None):
    """`iterable` wrapped so that its progress shows on stderr (see the module docstring); the result has tqdm's
    `set_postfix(**values)`, whose values the next line or bar update shows."""
    if enabled is False:
        return _Silent(iterable)
    f = file or sys.stderr
    if _isatty(f):
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, unit=unit, total=total, initial=initial, file=f)
    return _Lines(iterable, desc, unit, total, initial, interval, f)


def _isatty(f) -> bool:
    try:
        return bool(f.isatty())
    except (AttributeError, ValueError):  # a closed or file-like object without a terminal
        return False


class _Silent:
    def __init__(self, iterable: Iterable):
        self._it = iterable

    def __iter__(self) -> Iterator:
        return iter(self._it)

    def set_postfix(self, **values) -> None:
        pass


class _Lines:
    """Plain progress lines: at the start, after an item when `interval` seconds passed since the last line, and
    after the last item."""

    def __init__(self, iterable: Iterable, desc: str, unit: str, total: int, initial: int, interval: float,
                 f: TextIO):
        self._it, self.desc, self.unit, self.total, self.n = iterable, desc, unit, total, initial
        self.interval, self.f = interval, f
        self.postfix: dict = {}

    def set_postfix(self, **values) -> None:
        self.postfix = values

    def _line(self, elapsed: float | None, done_here: int) -> str:
        text = f"{self.desc}: {self.n}/{self.total} {self.unit}s"
        if elapsed is not None:
            text += f", {elapsed:.0f} s elapsed"
            left = self.total - self.n
            if left > 0 and done_here > 0:
                text += f", about {elapsed / done_here * left:.0f} s left"
        if self.postfix:
            text += ", " + ", ".join(f"{k}={v}" for k, v in self.postfix.items())
        return text

    def __iter__(self) -> Iterator:
        t0 = last = time.monotonic()
        print(self._line(None, 0), file=self.f, flush=True)
        done_here = 0
        for item in self._it:
            yield item
            self.n += 1
            done_here += 1
            now = time.monotonic()
            if now - last >= self.interval or self.n >= self.total:
                print(self._line(now - t0, done_here), file=self.f, flush=True)
                last = now
