"""Where output goes: results on stdout, logs and errors on stderr; rich only when it is a terminal.

Shell scripts get plain lines (no colour, no progress bars, no wrapping); people at a terminal get rich.
"""

import sys

from rich.console import Console

# Results (validate's recipe, stats, previews) go to stdout so they can be piped; logs go to stderr.
out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)


def stdout_is_tty() -> bool:
    return sys.stdout.isatty()


def table(header: list[str], cells: list[list[str]]) -> list[str]:
    """Plain aligned columns (two spaces apart), header first: what a terminal and a pipe both read."""
    widths = [max(len(h), *(len(line[i]) for line in cells)) for i, h in enumerate(header)]
    return ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in [header, *cells]]


def log(message: str) -> None:
    """A plain log line on stderr (markup off, so brackets in data are printed as they are)."""
    err.print(message, markup=False)
