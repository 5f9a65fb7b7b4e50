"""One line and exit status 1 for a bad input to a command-line tool, never a traceback.

The readers (weight_files, weight_sources, checkpoint) raise ValueError or
OSError naming the file and the problem; anything else escaping is a bug here
and keeps its traceback. --traceback shows the stack of a bad input too.
"""

from __future__ import annotations

import logging
import os
import sys

from ijepa_jax import checkpoint

BAD_INPUT = (ValueError, OSError)


def one_line(e: BaseException, limit: int = 400) -> str:
    text = " ".join(str(e).split("\n")).strip() or type(e).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def run_or_exit(fn, *args, traceback: bool = False, **kwargs):
    """fn(*args, **kwargs); a bad input exits with 'error: <message>' on one line (status 1)."""
    try:
        return fn(*args, **kwargs)
    except BAD_INPUT as e:
        if traceback:
            raise
        sys.exit(f"error: {one_line(e, limit=2000)}")


def quiet_library_logs() -> None:
    """The console keeps warnings and errors, ours and the libraries', but not orbax's INFO lines nor
    its warnings (a read-only manager warns that it is read-only): a bad input's line stands alone.
    The tools skip this when --verbosity is given."""
    from absl import logging as absl_logging

    handler = absl_logging.get_absl_handler()
    handler.setLevel(logging.WARNING)
    handler.addFilter(lambda r: r.levelno >= logging.ERROR or f"{os.sep}orbax{os.sep}" not in r.pathname)


def restore_target_encoder(workdir: str, step: int | None = None) -> tuple:
    """checkpoint.restore_target_encoder, where a damaged checkpoint (orbax and tensorstore raise
    KeyError or bare Exceptions for missing items and cut files) is a ValueError naming the workdir."""
    checkpoint.read_only_manager(workdir)[0].close()  # names a missing or empty checkpoints/ folder
    try:
        return checkpoint.restore_target_encoder(workdir, step)
    except Exception as e:  # noqa: BLE001 (whatever a damaged checkpoint raises)
        raise ValueError(f"cannot restore the target encoder of {workdir}: {type(e).__name__}: {one_line(e)}") from e
