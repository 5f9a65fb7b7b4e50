"""jax's persistent compilation cache, set up the same way by train, evaluate and the tools."""

from __future__ import annotations

import os

import jax


def use(directory: str) -> None:
    """Keeps compiled programs in `directory` (or $JAX_COMPILATION_CACHE_DIR, which jax reads itself), so a
    restart or another run of the same shapes and mesh loads them instead of compiling again.

    jax keys each program on its HLO, devices, compile options and versions, so a
    changed model or mesh compiles afresh. Call before the first compilation: jax
    keeps the first directory it used.
    """
    if directory:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
    if jax.config.jax_compilation_cache_dir and "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        # jax's default skips programs that compile in under a second: most of a small model's on CPU.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
