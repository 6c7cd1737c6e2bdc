"""Import/export progress: a tqdm bar on a terminal, a plain line per 1,000 files otherwise."""

from __future__ import annotations

import fcntl
import io
import os
import struct
import termios

from serve_image.progress import PLAIN_EVERY, Progress


def test_without_a_terminal_one_line_per_thousand_files() -> None:
    stream = io.StringIO()
    progress = Progress("import", stream=stream)
    progress.start(2500, 2500 * 1024)
    for _ in range(2500):
        progress.advance(1, 1024)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert PLAIN_EVERY == 1000
    assert [line.split(" in ")[0] for line in lines] == [
        "import: 1000/2500 files, 1000.0 KiB", "import: 2000/2500 files, 2.0 MiB"]


def test_on_a_terminal_a_bar_with_files_bytes_and_rate() -> None:
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    with os.fdopen(slave, "w") as terminal:
        progress = Progress("import", stream=terminal)
        progress.start(10, 10 * 4096)
        for _ in range(10):
            progress.advance(1, 4096)
        progress.close()
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the terminal's other side is closed and drained
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    shown = b"".join(chunks).decode()
    assert "import: 100%" in shown
    assert "40.0k/40.0k" in shown
    assert "10/10 files" in shown
    assert "B/s" in shown  # the rate
