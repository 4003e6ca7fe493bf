"""Command-line plumbing shared by the experiments' command lines: one flag style (absl flags, and
ml_collections ``config_flags`` for ``--config`` with ``--config.<field>=...`` overrides), parsed
into a private ``FlagValues`` per call, and errors in what the user asked for printed as one line.

Every command line is ``main(argv) -> result`` (``argv`` without the program name; raises
:class:`ConfigError`) plus ``cli_main(argv)``, which :func:`run`s ``main`` for ``python -m``: a
:class:`ConfigError` (or a refused checkpoint resume, or a corrupt input file:
``jaxdiff.validation.InvalidFileError``) becomes ``error: <message>`` on stderr and exit status 2,
without a traceback. An unknown ``--config.<field>`` reads ``unknown config field 'num_stepz' (did
you mean 'num_steps'?) in --config.sampling.num_stepz``; a ``--config`` file that cannot be loaded
is a :class:`ConfigError` at parse time.
"""

from __future__ import annotations

import re
import sys
import warnings
from typing import Any, Callable, Optional, Sequence

from absl import flags

__all__ = ["ConfigError", "check_writable", "parse_flags", "run", "train_command",
           "unknown_field_message", "config_check", "parse_sampler_options"]


class ConfigError(ValueError):
    """A command-line argument or config field with an invalid value; the message names it (e.g.
    ``training.batch_size must be >= 1, got 0``)."""


def parse_flags(define: Callable[[flags.FlagValues, list], None], argv: Sequence[str], prog: str,
                doc: str = "") -> flags.FlagValues:
    """Parses ``argv`` (arguments, without the program name) into a fresh ``FlagValues``.

    Args:
      define: ``define(flag_values, full_argv)`` defines the command's flags on ``flag_values``
        (``full_argv`` = ``[prog, *argv]`` is what ``config_flags.DEFINE_config_file`` must get as
        ``sys_argv`` to find ``--config.*`` overrides).
      argv: the arguments.
      prog: the program name, for messages (``python -m experiments.sample``).
      doc: printed above the flags' help for ``--help``.

    Returns:
      The parsed flags.

    Raises:
      ConfigError: an unknown flag, a value that does not parse, an unknown config field (with
        the closest field's name when there is one), a ``--config`` file that is missing or
        does not parse, or a positional argument.
      SystemExit: ``--help`` / ``-h`` (status 0, after printing the help).
    """
    argv = [str(a) for a in argv]
    full = [prog] + argv
    fv = flags.FlagValues()
    try:
        define(fv, full)  # config_flags parses the default config (and its overrides) here
        if any(a in ("--help", "-h", "--helpfull", "-help") for a in argv):
            print(f"{doc.strip()}\n\nflags:\n{fv.get_help()}")
            raise SystemExit(0)
        rest = fv(full)
    except flags.Error as e:
        raise ConfigError(" ".join(str(e).split())) from None
    except (KeyError, AttributeError) as e:  # config_flags: an override of a field that is absent
        raise ConfigError(unknown_field_message(e, argv)) from None
    except SyntaxError as e:  # a --config file that is not Python
        raise ConfigError(f"--config: {e.filename} line {e.lineno}: {e.msg}") from None
    except OSError as e:  # a --config file that cannot be loaded, met by a --config.x override
        raise ConfigError(_config_file_message("config", e)) from None
    _check_config_files(fv)
    if len(rest) > 1:
        raise ConfigError(f"{prog}: unexpected positional arguments {rest[1:]}")
    return fv


def unknown_field_message(error: BaseException, argv: Sequence[str]) -> str:
    """The one-line message of config_flags' ``KeyError`` / ``AttributeError`` for an override of
    a config field that does not exist: ``unknown config field 'num_stepz' (did you mean
    'num_steps'?) in --config.sampling.num_stepz`` (ml_collections wraps a ``KeyError`` whose text
    is the quoted name and, on a second line, its suggestion)."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    text = str(error.args[0]) if error.args else str(error)
    first, _, rest = text.partition("\n")
    name = first.strip("\"' \\")
    suggestion = re.search(r'Did you mean "([^"]+)"', rest)
    message = f"unknown config field {name!r}"
    if suggestion:
        message += f" (did you mean {suggestion.group(1)!r}?)"
    overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    named = [o for o in overrides if name in o[len("--config."):].split(".")]
    if named:
        return f"{message} in {named[0]}"
    return f"{message} (overrides given: {', '.join(overrides)})"


def _config_file_message(name: str, error: OSError) -> str:
    """``--config: the config file could not be loaded: [Errno 2] No such file ...: 'x.py'``
    from config_flags' multi-line ``OSError``."""
    text = str(error)
    reason = re.findall(r"\[Errno \d+\][^\n]*", text)
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    return (f"--{name}: the config file could not be loaded: "
            f"{reason[-1] if reason else (lines[-1] if lines else type(error).__name__)}")


def _check_config_files(fv: flags.FlagValues) -> None:
    """config_flags defers a ``--config`` file that cannot be loaded (a missing file) to the
    first access of the config, which then raises ``OSError``: access every flag's value here
    (a plain value or a loaded config only answers ``False``), so that it is a
    :class:`ConfigError` now."""
    for name in list(fv):
        try:
            hasattr(fv[name].value, "_jaxdiff_probe")
        except OSError as e:
            raise ConfigError(_config_file_message(name, e)) from None


def check_writable(flag: str, path: str, *, directory: bool = False) -> None:
    """Checks, before any work, that a command line can write its output ``path`` (a file, or
    with ``directory`` a directory that may not exist yet):
    :func:`jaxdiff.validation.check_writable` (nothing is created).

    Raises:
      ConfigError: naming ``flag`` and the path.
    """
    from jaxdiff.validation import check_writable as check

    try:
        check(flag, path, directory=directory)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """A Python warning as one ``warning: ...`` line (``warnings.formatwarning``)."""
    kind = "" if category is UserWarning else f"{category.__name__}: "
    return f"warning: {kind}{' '.join(str(message).split())}\n"


def run(main: Callable[[list], Any], argv: Optional[Sequence[str]] = None) -> None:
    """Calls ``main(argv)`` (default ``sys.argv[1:]``) for a command line: a :class:`ConfigError`,
    ``jaxdiff.training.IncompatibleCheckpointError`` or ``CheckpointError``, or a
    ``jaxdiff.validation.InvalidFileError`` (a file the user gave is corrupt, truncated or of
    another kind: the message names it) is printed to stderr as one ``error: ...`` line and exits
    with status 2; a ``jaxdiff.training.NonFiniteLossError`` (a training run that diverged: the
    message names the last good checkpoint) likewise, with status 1; any other exception
    propagates (with its traceback). The result of ``main`` is not printed and the exit status is
    0. Python warnings print as one ``warning: ...`` line each (no source line).

    First it switches on JAX's persistent compilation cache (:func:`jaxdiff.compile_cache.enable`:
    ``$JAX_COMPILATION_CACHE_DIR`` if set, else ``$JAXDIFF_COMPILATION_CACHE``, else
    ``~/.cache/jaxdiff/xla``; ``JAXDIFF_COMPILATION_CACHE=off`` leaves it off), so a command run a
    second time loads its compiled programs instead of compiling them again."""
    from jaxdiff import compile_cache
    from jaxdiff.training import CheckpointError, IncompatibleCheckpointError, NonFiniteLossError
    from jaxdiff.validation import InvalidFileError

    compile_cache.enable()  # before anything compiles; JAXDIFF_COMPILATION_CACHE=off: no cache
    formatwarning = warnings.formatwarning
    warnings.formatwarning = _format_warning  # what the default warnings.showwarning prints
    try:
        main(list(sys.argv[1:] if argv is None else argv))
    except (ConfigError, IncompatibleCheckpointError, CheckpointError, InvalidFileError) as e:
        msg = " ".join(str(e).split("\n"))
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as e:   # a training run that diverged: one line, exit 1
        msg = " ".join(str(e).split("\n"))
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(1)
    finally:
        warnings.formatwarning = formatwarning


def train_command(argv: Optional[Sequence[str]], *, prog: str, doc: Optional[str],
                  default_config: str, train: Callable[[Any, str], Any],
                  workdir_help: str = "Directory for checkpoints, metrics and samples.") -> Any:
    """The training command lines' ``main``: ``--workdir`` (required), ``--distributed`` (calls
    ``jax.distributed.initialize()``) and ``--config`` (``default_config``, with
    ``--config.<field>=...`` overrides); then ``train(config, workdir)``, with Orbax's per-save
    INFO logs silenced. Returns what ``train`` returns; when that summary says the run was
    stopped by a signal, prints the command that resumes it (``to resume: <prog> <argv>``).

    Raises:
      ConfigError: an invalid flag, a missing ``--workdir``, or what ``train`` raises.
    """
    import jax
    from absl import logging
    from ml_collections import config_flags

    def define(fv: flags.FlagValues, args: list) -> None:
        flags.DEFINE_string("workdir", None, workdir_help, flag_values=fv)
        flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).",
                          flag_values=fv)
        config_flags.DEFINE_config_file("config", default_config,
                                        "Training config (get_config()).", flag_values=fv,
                                        lock_config=True, sys_argv=args)

    fv = parse_flags(define, [] if argv is None else argv, prog, doc)
    if not fv.workdir:
        raise ConfigError("--workdir is required")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    if fv.distributed:
        jax.distributed.initialize()
    summary = train(fv.config, fv.workdir)
    if (isinstance(summary, dict) and summary.get("stopped_by_signal")
            and jax.process_index() == 0):
        import shlex

        print(f"to resume: {prog} {' '.join(shlex.quote(str(a)) for a in argv or [])}",
              flush=True)
    return summary


def config_check(prefix: str, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)``, with a ``ValueError`` (a library's "bad argument") re-raised as
    one :class:`ConfigError` whose message is ``prefix`` + the library's message, so that it names
    the config field or flag (``config_check("training.", make_mesh, fsdp=3)`` ->
    ``training.fsdp must be ...``). A ``ConfigError`` passes through unchanged.

    Raises:
      ConfigError: ``fn`` raised a ``ValueError``.
    """
    try:
        return fn(*args, **kwargs)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{prefix}{e}") from None


def parse_sampler_options(items: Sequence[str]) -> dict:
    """``["spacing=leading", "solver_order=3"]`` -> ``{"spacing": "leading", "solver_order": 3}``
    (the ``--option key=value`` flags of the sampling command lines): ints, floats, ``True`` /
    ``False`` / ``None`` and ``inf`` / ``-inf`` are parsed, anything else stays a string.

    Raises:
      ConfigError: an item without ``=`` or with an empty key.
    """
    out: dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"sampler option must be key=value, got {item!r}")
        text = text.strip()
        value: Any = {"True": True, "False": False, "None": None}.get(text, text)
        if isinstance(value, str):
            for parse in (int, float):
                try:
                    value = parse(text)
                    break
                except ValueError:
                    pass
        out[key.strip()] = value
    return out
