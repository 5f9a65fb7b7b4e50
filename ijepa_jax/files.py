"""Paths that are local or on object storage (`gs://bucket/run`), through `etils.epath`, as orbax's.

Object stores have no append and no folder rename: a file there is written
whole, in one upload (which is atomic), and orbax commits checkpoints its
own way. Local files are written to a temporary name and renamed.
"""

from __future__ import annotations

import os

from etils import epath


def is_remote(p) -> bool:
    return "://" in str(p)


def path(p) -> epath.Path:
    """`p` as an epath.Path: local paths absolute (and `~` expanded), URLs as they are."""
    p = str(p)
    return epath.Path(p if is_remote(p) else os.path.abspath(os.path.expanduser(p)))


def write_bytes(p, data: bytes) -> epath.Path:
    """Writes `data` so that a reader never sees a partial file."""
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(target):
        target.write_bytes(data)
        return target
    tmp = target.parent / f".{target.name}.{os.getpid()}.tmp"
    tmp.write_bytes(data)
    tmp.replace(target)
    return target


def write_text(p, text: str) -> epath.Path:
    return write_bytes(p, text.encode())
