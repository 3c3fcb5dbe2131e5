"""Errors the CLI turns into one clear line and a distinct exit code (never a traceback)."""

from __future__ import annotations

EXIT_USAGE = 2
EXIT_VERIFY = 3


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (tracers and exporters write hundreds), or its type name."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]


class UserError(Exception):
    """Bad input from the user (missing file, unknown model, mismatched data): exit code 2."""

    exit_code = EXIT_USAGE


class VerificationError(Exception):
    """The exported ONNX model does not reproduce the PyTorch model: exit code 3."""

    exit_code = EXIT_VERIFY
