"""Where output goes: results on stdout, logs and errors on stderr; rich only when it is a terminal.

Shell scripts get plain lines (no colour, no progress bars, no wrapping); people at a terminal get rich.
"""

import os
import sys

from rich.console import Console

# Results (validate's recipe, stats, previews) go to stdout so they can be piped; logs go to stderr.
out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)


def stdout_is_tty() -> bool:
    return sys.stdout.isatty()


def table(header: list[str], cells: list[list[str]]) -> list[str]:
    """Plain aligned columns (two spaces apart), header first: what a terminal and a pipe both read."""
    widths = [max([len(h), *(len(line[i]) for line in cells)]) for i, h in enumerate(header)]
    return ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in [header, *cells]]


def log(message: str) -> None:
    """A plain log line on stderr (markup off, so brackets in data are printed as they are)."""
    err.print(message, markup=False)


# What libraries print that concerns no user of ours, by logger and message start: bitsandbytes' note on an optional
# faster CPU kernel, logged at import in every command that imports peft, QLoRA or not, and the kernel hub client's
# note on that same lookup when the hub is offline (kernels >= 0.19); lm-evaluation-harness's notes on being handed
# a loaded model, which is how `eval --tasks` always calls it.
_LIBRARY_NOISE = {
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
    "kernels._internals.hf_hub": ("Skipping publisher trust check",),
    "lm_eval.models.huggingface": ("`pretrained` model kwarg is not of type `str`",
                                   "Passed an already-initialized model through `pretrained`"),
}


def debug_requested(argv: list[str]) -> bool:
    """--debug anywhere on the command line, or NEFTUNE_DEBUG=1: tracebacks and every library's output."""
    return "--debug" in argv or os.environ.get("NEFTUNE_DEBUG") == "1"


def quiet_libraries(debug: bool) -> None:
    """A log of a scripted run holds our lines and the warnings that concern the user: off a terminal, no `\\r`
    progress bars from transformers ("Loading weights"), the hub client or datasets; and never the notes in
    _LIBRARY_NOISE or the libraries' deprecation notices (FutureWarning, DeprecationWarning). `--debug` keeps
    everything. Before those libraries are imported: they read the switches then."""
    if debug:
        return
    import logging
    import warnings

    for category in (FutureWarning, DeprecationWarning):  # notes to the developers who call a library, not to users
        warnings.filterwarnings("ignore", category=category)
    for name, prefixes in _LIBRARY_NOISE.items():
        logging.getLogger(name).addFilter(lambda record, prefixes=prefixes: not str(record.msg).startswith(prefixes))
    if not sys.stderr.isatty():
        for switch in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
            os.environ.setdefault(switch, "1")
