"""Command-line plumbing shared by the experiments' command lines: one flag style (absl flags, and
ml_collections ``config_flags`` for ``--config`` with ``--config.<field>=...`` overrides), parsed
into a private ``FlagValues`` per call, and errors in what the user asked for printed as one line.

Every command line is ``main(argv) -> result`` (``argv`` without the program name; raises
:class:`ConfigError`) plus ``cli_main(argv)``, which :func:`run`s ``main`` for ``python -m``: a
:class:`ConfigError` (or a refused checkpoint resume) becomes ``error: <message>`` on stderr and
exit status 2, without a traceback.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional, Sequence

from absl import flags

__all__ = ["ConfigError", "parse_flags", "run", "train_command"]


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
      ConfigError: an unknown flag, a value that does not parse, an unknown config field, or a
        positional argument.
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
        overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
        name = str(e).strip("\"' ")
        raise ConfigError(f"unknown config field {name!r} (overrides given: "
                          f"{', '.join(overrides)})") from None
    if len(rest) > 1:
        raise ConfigError(f"{prog}: unexpected positional arguments {rest[1:]}")
    return fv


def run(main: Callable[[list], Any], argv: Optional[Sequence[str]] = None) -> None:
    """Calls ``main(argv)`` (default ``sys.argv[1:]``) for a command line: a :class:`ConfigError`,
    ``jaxdiff.training.IncompatibleCheckpointError`` or ``CheckpointError`` is printed to stderr
    as one ``error: ...`` line and exits with status 2; any other exception propagates (with its
    traceback). The result of ``main`` is not printed and the exit status is 0.

    First it switches on JAX's persistent compilation cache (:func:`jaxdiff.compile_cache.enable`:
    ``$JAX_COMPILATION_CACHE_DIR`` if set, else ``$JAXDIFF_COMPILATION_CACHE``, else
    ``~/.cache/jaxdiff/xla``; ``JAXDIFF_COMPILATION_CACHE=off`` leaves it off), so a command run a
    second time loads its compiled programs instead of compiling them again."""
    from jaxdiff import compile_cache
    from jaxdiff.training import CheckpointError, IncompatibleCheckpointError

    compile_cache.enable()  # before anything compiles; JAXDIFF_COMPILATION_CACHE=off: no cache
    try:
        main(list(sys.argv[1:] if argv is None else argv))
    except (ConfigError, IncompatibleCheckpointError, CheckpointError) as e:
        msg = " ".join(str(e).split("\n"))
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)


def train_command(argv: Optional[Sequence[str]], *, prog: str, doc: Optional[str],
                  default_config: str, train: Callable[[Any, str], Any],
                  workdir_help: str = "Directory for checkpoints, metrics and samples.") -> Any:
    """The training command lines' ``main``: ``--workdir`` (required), ``--distributed`` (calls
    ``jax.distributed.initialize()``) and ``--config`` (``default_config``, with
    ``--config.<field>=...`` overrides); then ``train(config, workdir)``, with Orbax's per-save
    INFO logs silenced. Returns what ``train`` returns.

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
    return train(fv.config, fv.workdir)
