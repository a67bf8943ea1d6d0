"""JSON Lines as the format defines them: a line ends at "\n" (and a "\r" before it) only.

`str.splitlines()` also splits at U+2028, U+2029, U+0085 and others, which JSON allows raw inside
strings: a valid file would be read as broken lines.
"""

from __future__ import annotations

from collections.abc import Iterator


def lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number from 1, line) for each non-blank line."""
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.strip():
            yield number, line
