"""Progress of a long command: a bar on a terminal, a plain line now and then otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

# Without a terminal (cron, CI, a pipe), one line per this many files.
PLAIN_EVERY = 1000


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Progress:
    """Files and bytes done, with rate and ETA; problems printed above the bar."""

    def __init__(self, what: str, *, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.what = what
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.files = 0
        self.bytes = 0
        self.total_files: int | None = None
        self.started = time.monotonic()
        self._bar: tqdm[None] | None = None

    def start(self, total_files: int | None = None, total_bytes: int | None = None) -> None:
        self.total_files = total_files
        self.started = time.monotonic()
        if self.enabled and self.stream.isatty():
            self._bar = tqdm(
                total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                desc=self.what, file=self.stream, dynamic_ncols=True, smoothing=0.1,
            )

    def advance(self, files: int = 1, nbytes: int = 0) -> None:
        self.files += files
        self.bytes += nbytes
        if self._bar is not None:
            self._bar.update(nbytes)
            total = f"/{self.total_files}" if self.total_files is not None else ""
            self._bar.set_postfix_str(f"{self.files}{total} files", refresh=False)
        elif self.enabled and self.files % PLAIN_EVERY == 0:
            print(f"{self.what}: {self.line()}", file=self.stream, flush=True)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        total = f"/{self.total_files}" if self.total_files is not None else ""
        return (
            f"{self.files}{total} files, {human_bytes(self.bytes)} in {elapsed:.1f} s "
            f"({self.files / elapsed:.0f} files/s, {human_bytes(self.bytes / elapsed)}/s)"
        )

    def problem(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
