"""One line and exit status 1 for a bad input to a command-line tool, never a traceback.

Every command's `__main__` is `bad_input.run_command(main, define_flags)`: its flags are parsed here (an
unknown flag or config key, a value that does not parse, a config file that does not load: one line, the
key named and a close match suggested), then `main` runs under `run_or_exit`. The readers (weight_files,
weight_sources, checkpoint, the data sources, config_lib.validate) raise ValueError or OSError naming the
file or key and the problem; anything else escaping is a bug here and keeps its traceback. --traceback
shows the stack of a bad input too.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
import sys

# train's divergence (a FloatingPointError naming the step and the last good checkpoint) is a bad input too.
BAD_INPUT = (ValueError, OSError, FloatingPointError)


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


def run_command(main, define_flags) -> None:
    """A command's `__main__`: `define_flags(flags.FLAGS)` (and --traceback), absl's app.run with
    parse_flags, then main(argv) under run_or_exit."""
    from absl import app, flags

    command(main, define_flags, flags.FLAGS, app_run=app.run)


def command(main, define_flags, flag_values, argv=None, app_run=None):
    """The whole command on `flag_values`: its flags defined, `argv` parsed, main run, every bad input one
    line (SystemExit). app_run: absl's app.run (the real command line: logging set-up, --help); without
    it (tests) the flags are parsed and main called directly, so a fresh FlagValues runs a command
    in-process."""
    define_flags(flag_values)
    if "traceback" not in flag_values:
        from absl import flags

        flags.DEFINE_bool("traceback", False, "Show the full stack trace of a bad input.", flag_values=flag_values)

    def guarded_main(rest):
        return run_or_exit(main, rest, traceback=flag_values.traceback)

    if app_run is not None:
        return app_run(guarded_main, flags_parser=lambda args: parse_flags(args, flag_values))
    return guarded_main(parse_flags(argv or [sys.argv[0]], flag_values))


def parse_flags(argv: list[str], flag_values) -> list[str]:
    """flag_values(argv); a bad flag, config override or config file exits with one line naming it."""
    try:
        rest = flag_values(argv)
    except Exception as e:  # noqa: BLE001 (whatever a config file or an override raises while parsing)
        if _asks_for_traceback(argv):
            raise
        sys.exit(f"error: {flag_error(e, argv, flag_values)}")
    for name in _config_flags(flag_values):
        load_error = _load_error(flag_values[name].value)
        if load_error is not None:  # config_flags raises it at the config's first use, not while parsing
            sys.exit(f"error: --{name}={_flag_argument(argv, name)}: cannot load the config file: {load_error}")
    return rest


def flag_error(e: BaseException, argv: list[str], flag_values) -> str:
    """The one line for an exception raised while `flag_values` parsed `argv`."""
    from absl import flags

    message = str(e)
    if isinstance(e, flags.UnrecognizedFlagError):
        return f"{one_line(e)} (--helpshort lists the flags)"
    if "Error whilst parsing config file" in message:  # get_config raised: config_flags embeds its traceback
        head = message.split(": Error whilst parsing config file", 1)[0].removeprefix("flag ")
        last = message.strip().splitlines()[-1].removeprefix("ValueError: ")
        return f"{head}: {last}"
    if isinstance(e, flags.Error):
        return one_line(e).removeprefix("flag ")
    for name in _config_flags(flag_values):
        found = config_override_error(flag_values[name], argv)
        if found:
            return found
    return f"{type(e).__name__} while reading the flags: {one_line(e)}"


def config_override_error(flag, argv: list[str]) -> str | None:
    """For a config flag whose parsing failed: the config file that does not load, or the first
    --config.KEY override that names no key of the config (with a close match, when there is one)."""
    name = flag.name
    argument = _flag_argument(argv, name)
    if argument is None:
        return None
    try:
        config = flag.parser.parse(argument)
    except Exception as e:  # noqa: BLE001 (a config file can raise anything)
        return f"--{name}={argument}: cannot load the config file: {type(e).__name__}: {one_line(e)}"
    load_error = _load_error(config)
    if load_error is not None:
        return f"--{name}={argument}: cannot load the config file: {load_error}"
    pattern = re.compile(rf"^--?(?:no)?{re.escape(name)}\.([^=]+)")
    for arg in argv:
        match = pattern.match(arg)
        if match:
            problem = unknown_key(config, match.group(1))
            if problem:
                return f"--{name}.{match.group(1)}: {problem}"
    return None


def unknown_key(config, path: str) -> str | None:
    """Why dotted `path` names no key of `config` (with a suggestion), or None when it does."""
    node, parents = config, []
    for part in path.split("."):
        if not hasattr(node, "keys"):
            return (f"{'.'.join(parents)} is a value, not a section: give the whole value "
                    f"(--config.{'.'.join(parents)}=...)")
        if part in node:
            node = node[part]
            parents.append(part)
            continue
        where = ".".join(parents) or "the config"
        suggestion = _suggest(config, parents, part, path)
        if suggestion:
            return f"no such config key ({where} has no {part!r}); did you mean --config.{suggestion}?"
        return f"no such config key ({where} has no {part!r}; its keys: {', '.join(sorted(node.keys()))})"
    return None


# The reference's YAML names (its configs/*.yaml) for keys this config names otherwise.
REFERENCE_NAMES = {
    "enc_mask_scale": "mask.context_scale", "pred_mask_scale": "mask.target_scale",
    "aspect_ratio": "mask.target_aspect", "num_pred_masks": "mask.num_targets", "warmup": "optim.warmup_epochs",
    "root_path": "data.root", "model_name": "model.name", "pred_emb_dim": "model.pred_width",
}


def _suggest(config, parents: list[str], part: str, path: str) -> str | None:
    """The reference's name for a key, a close key at the same level, else the same name (then a close
    path) elsewhere in the config."""
    every = _paths(config)
    if REFERENCE_NAMES.get(part) in every:
        return REFERENCE_NAMES[part]
    node = config
    for p in parents:
        node = node[p]
    close = difflib.get_close_matches(part, list(node.keys()), n=1, cutoff=0.7)
    if close:
        near = "".join(p + "." for p in parents) + close[0]
        rest = path.split(".")[len(parents) + 1:]
        return ".".join([near, *rest]) if rest and ".".join([near, *rest]) in every else near
    same_name = [p for p in every if p.rsplit(".", 1)[-1] == part]
    if same_name:
        return same_name[0]
    close = difflib.get_close_matches(path, every, n=1, cutoff=0.8)
    return close[0] if close else None


def _paths(node, prefix: str = "") -> list[str]:
    out = []
    for key in node.keys():
        value = node[key]
        out.append(prefix + key)
        if hasattr(value, "keys"):
            out.extend(_paths(value, prefix + key + "."))
    return out


def _config_flags(flag_values) -> list[str]:
    from ml_collections.config_flags.config_flags import is_config_flag

    return [name for name, flag in flag_values._flags().items() if is_config_flag(flag)]  # noqa: SLF001


def _load_error(value) -> str | None:
    """config_flags keeps a config file that failed to load as an object that raises on use: its cause."""
    if type(value).__name__ != "_ErrorConfig":
        return None
    cause = object.__getattribute__(value, "_error")
    return str(cause).strip().splitlines()[-1].strip()


def _flag_argument(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        for dash in ("--", "-"):
            if arg.startswith(f"{dash}{name}="):
                return arg.split("=", 1)[1]
            if arg == f"{dash}{name}" and i + 1 < len(argv):
                return argv[i + 1]
    return None


def _asks_for_traceback(argv: list[str]) -> bool:
    return any(a in ("--traceback", "-traceback") or a.lower() in ("--traceback=true", "--traceback=1") for a in argv)


def verbosity_given() -> bool:
    """--verbosity was given (the tools then keep the libraries' INFO lines on the console)."""
    from absl import flags

    return bool(flags.FLAGS["verbosity"].present)


def path_to_write(path: str, flag: str, folder: bool = True) -> None:
    """A local folder (or file) a command will create or write: one line, before any work, when a part of
    the path above it is a file, or it is a file where a folder is wanted (or the other way round)."""
    from ijepa_jax import files

    if not path or files.is_remote(path):
        return
    full = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(full):
        if folder and not os.path.isdir(full):
            raise NotADirectoryError(f"{flag} {path} is a file, not a folder: give a folder path.")
        if not folder and os.path.isdir(full):
            raise IsADirectoryError(f"{flag} {path} is a folder: give a file path.")
        return
    above = os.path.dirname(full)
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise NotADirectoryError(f"{flag} {path} is under {above}, a file, not a folder: give another path.")


def quiet_library_logs() -> None:
    """The console keeps warnings and errors, ours and the libraries', but not orbax's INFO lines nor
    its warnings (a read-only manager warns that it is read-only): a bad input's line stands alone.
    The tools skip this when --verbosity is given."""
    from absl import logging as absl_logging

    handler = absl_logging.get_absl_handler()
    handler.setLevel(logging.WARNING)
    handler.addFilter(lambda r: r.levelno >= logging.ERROR or f"{os.sep}orbax{os.sep}" not in r.pathname)


@contextlib.contextmanager
def reading_checkpoint(workdir: str):
    """Around a restore from `workdir`: a missing or empty checkpoints/ folder is named first, and a damaged
    checkpoint (orbax and tensorstore raise KeyError or bare Exceptions for missing items and cut files)
    becomes a ValueError naming the workdir."""
    from ijepa_jax import checkpoint

    checkpoint.read_only_manager(workdir)[0].close()  # names a missing or empty checkpoints/ folder
    try:
        yield
    except Exception as e:  # noqa: BLE001 (whatever a damaged checkpoint raises)
        raise ValueError(f"cannot restore the target encoder of {workdir}: {type(e).__name__}: {one_line(e)}") from e


def restore_target_encoder(workdir: str, step: int | None = None) -> tuple:
    """encoder_export.restore_target_encoder, a damaged checkpoint named (reading_checkpoint)."""
    from ijepa_jax import encoder_export

    with reading_checkpoint(workdir):
        return encoder_export.restore_target_encoder(workdir, step)
