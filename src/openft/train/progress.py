"""A one-line terminal progress bar: step, epoch, loss, validation loss, ETA."""

from __future__ import annotations

import sys
import time


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds:
        return "--"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class ProgressBar:
    def __init__(self, total: int, stream=sys.stderr, width: int = 24):
        self.total = max(1, total)
        self.stream = stream
        self.width = width
        self.valid_loss: float | None = None
        self.tty = stream.isatty()
        self._last_print = 0.0

    def update(self, row: dict) -> None:
        if row.get("valid_loss") is not None:
            self.valid_loss = row["valid_loss"]
        step = row["step"]
        done = int(self.width * step / self.total)
        bar = "#" * done + "-" * (self.width - done)
        val = f" val {self.valid_loss:.3f}" if self.valid_loss is not None else ""
        line = (
            f"[{bar}] step {step}/{self.total} epoch {row['epoch']:.2f} loss {row['train_loss']:.3f}{val}"
            f" | {row['tokens_per_s']:.0f} tok/s | ETA {fmt_duration(row.get('eta_s'))}"
        )
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r" + line.ljust(100))
        elif step == self.total or row.get("valid_loss") is not None or now - self._last_print > 10:
            # Not a terminal (CI logs, pipes): print a line now and then, not a flood.
            self.stream.write(line + "\n")
            self._last_print = now
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
