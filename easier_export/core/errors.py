"""Errors the CLI turns into one clear line and a distinct exit code (never a traceback)."""

from __future__ import annotations

EXIT_USAGE = 2
EXIT_VERIFY = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM: what a shell reports for a process that SIGTERM ended


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (tracers and exporters write hundreds), or its type name."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]


class UserError(Exception):
    """Bad input from the user (missing file, unknown model, mismatched data): exit code 2."""

    exit_code = EXIT_USAGE


class VerificationError(Exception):
    """The exported ONNX model does not reproduce the PyTorch model: exit code 3."""

    exit_code = EXIT_VERIFY


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's notice before SIGKILL), raised where Ctrl-C would be so that the same cleanup runs:
    temp files of atomic writes removed, finished rounds kept."""


class Interrupted(Exception):
    """Ctrl-C (exit code 130) or SIGTERM (143). ``rounds``: EASIER rounds the output folder keeps, as (done, kept
    within budget); None: not a resumable run."""

    def __init__(self, rounds: tuple[int, int] | None, terminated: bool = False) -> None:
        self.exit_code = EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
        what = "terminated (SIGTERM)" if terminated else "interrupted"
        if rounds is None:
            text = f"{what}: no output is half-written (files are replaced whole); rerun the command"
        else:
            done, kept = rounds
            saved = f"{done} round(s) kept" if done == kept else \
                f"{done} round(s) saved ({kept} kept, {done - kept} reverted)"
            text = f"{what}: {saved}; rerun the same command to resume"
        super().__init__(text)
