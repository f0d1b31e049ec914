"""JSON lines split the way JSON lines are written: at "\\n" only.

str.splitlines() also breaks at U+2028, U+2029, U+0085 and other characters that json.dumps(ensure_ascii=False)
writes raw inside a string, so a record holding one would be read as two broken lines.
"""

from __future__ import annotations

from collections.abc import Iterator


def json_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) for each non-blank line of `text`, "\\r\\n" endings included."""
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.strip():
            yield number, line
