"""Error types and the exit codes they map to.

Every failure a user can cause or meet is one of these; the CLI prints ``str(error)`` as a single line
on stderr and exits with ``error.exit_code`` (the traceback only with ``--debug``).
"""

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_SIGINT = 130
EXIT_SIGPIPE = 141  # stdout's reader went away (`| head`): what a shell reports for cat then
EXIT_SIGTERM = 143


OOM_HINT = ("lower train.micro_batch_size (raise grad_accum to keep the batch), set train.gradient_checkpointing: "
            "true, or lower data.max_seq_len")


class NeftuneError(Exception):
    """Base class: a message meant for the user, and an exit code."""

    exit_code = EXIT_RUNTIME


class UsageError(NeftuneError):
    """Bad command-line usage, bad recipe, bad data: the user must change something (exit 2)."""

    exit_code = EXIT_USAGE


class RecipeError(UsageError):
    """The recipe file or a --set override is invalid. One message line per problem."""

    def __init__(self, problems: list[str] | str, source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__("\n".join(prefix + p for p in self.problems))


class DataError(UsageError):
    """A data file or record is unusable; the message names the file, record and field."""


class RuntimeFailure(NeftuneError):
    """Something failed while running (OOM, NaN loss, failed verification): exit 1."""


class Interrupted(NeftuneError):
    """The run was stopped by a signal after saving what it could (exit 130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def first_line(error: BaseException, limit: int = 300) -> str:
    """A library's exception as one bounded line, for messages that wrap it (jinja, datasets, safetensors)."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= limit else line[:limit] + "..."
