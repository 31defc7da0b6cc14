"""What a benchmark prints is also what --write puts into bench/RESULTS.md."""

from __future__ import annotations


class Report:
    """`say(line)` prints a line and keeps it; `lines` is everything said."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)
