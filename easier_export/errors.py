"""Errors the CLI turns into one clear line and a distinct exit code (never a traceback)."""

from __future__ import annotations

EXIT_USAGE = 2
EXIT_VERIFY = 3
EXIT_INTERRUPTED = 130


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (tracers and exporters write hundreds), or its type name."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]


class UserError(Exception):
    """Bad input from the user (missing file, unknown model, mismatched data): exit code 2."""

    exit_code = EXIT_USAGE


class VerificationError(Exception):
    """The exported ONNX model does not reproduce the PyTorch model: exit code 3."""

    exit_code = EXIT_VERIFY


class Interrupted(Exception):
    """Ctrl-C: exit code 130. ``rounds``: EASIER rounds the output folder keeps (None: not a resumable run)."""

    exit_code = EXIT_INTERRUPTED

    def __init__(self, rounds: int | None) -> None:
        if rounds is None:
            text = "interrupted: no output is half-written (files are replaced whole); rerun the command"
        else:
            text = f"interrupted: {rounds} round(s) kept; rerun the same command to resume"
        super().__init__(text)
