"""One line and exit status 1 for a bad input to a command-line tool, never a traceback.

The readers (weight_files, weight_sources, checkpoint) raise ValueError or
OSError naming the file and the problem; anything else escaping is a bug here
and keeps its traceback. --traceback shows the stack of a bad input too.
"""

from __future__ import annotations

import sys

BAD_INPUT = (ValueError, OSError)


def run_or_exit(fn, *args, traceback: bool = False, **kwargs):
    """fn(*args, **kwargs); a bad input exits with 'error: <message>' on one line (status 1)."""
    try:
        return fn(*args, **kwargs)
    except BAD_INPUT as e:
        if traceback:
            raise
        message = " ".join(str(e).split("\n")).strip() or type(e).__name__
        sys.exit(f"error: {message}")
