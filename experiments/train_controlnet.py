r"""Train a ControlNet on a frozen diffusers Stable Diffusion folder from pairs of control and
target images (``experiments/configs/train_controlnet.py``), as diffusers' ``train_controlnet``.

    python -m experiments.train_controlnet --model path/to/sd --data pairs --workdir runs/cn
    python -m experiments.train_controlnet --model path/to/sd --data pairs --workdir runs/cn \
        --controlnet path/to/controlnet --config.training.num_steps=5000
    python -m experiments.train_controlnet --workdir runs/cn --export_only [--out FOLDER]

The pairs folder has ``metadata.jsonl`` with ``file_name`` (the target image), ``text`` (its
caption) and ``conditioning_image`` (its control image, of the same size) on each line
(:mod:`jaxdiff.data.controlnet_folder`). Without ``--controlnet`` a new ControlNet is copied from
the model's UNet (diffusers' ``ControlNetModel.from_unet``). The UNet, VAE and text encoder stay
frozen; only the ControlNet trains. The workdir gets ``checkpoints/`` (rerun the same command to
resume), ``metrics.jsonl``, ``samples/`` (rows of validation pairs: control | without | with the
ControlNet), ``config.json``, ``controlnet_config.json`` and at the end ``controlnet/``, a
diffusers ``ControlNetModel`` folder (``--export_only`` writes it from the latest checkpoint of a
stopped run). A workdir of another model, mode or ControlNet is refused before anything is
written. An invalid value prints one ``error: ...`` line and exits with status 2.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence

from absl import flags

from experiments import cli, controlnet_lib

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                              "train_controlnet.py")
PROG = "python -m experiments.train_controlnet"

__all__ = ["main", "cli_main", "DEFAULT_CONFIG"]


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Parses ``argv`` (without the program name) and trains (or, with ``--export_only``,
    exports); returns the summary of :func:`experiments.controlnet_lib.train` (or
    :func:`~experiments.controlnet_lib.export_from_workdir`'s result).

    Raises:
      ConfigError: an invalid flag, config field or path (nothing is written).
    """
    import jax
    from absl import logging
    from ml_collections import config_flags

    def define(fv: flags.FlagValues, args: list) -> None:
        d = dict(flag_values=fv)
        flags.DEFINE_string("model", None, "The diffusers Stable Diffusion folder (frozen).", **d)
        flags.DEFINE_string("data", None, "The pairs folder (metadata.jsonl: file_name, text, "
                            "conditioning_image).", **d)
        flags.DEFINE_string("workdir", None, "Directory for checkpoints, samples and the "
                            "export.", **d)
        flags.DEFINE_string("controlnet", "", "A diffusers ControlNetModel folder to start from "
                            "(default: a new one copied from the UNet).", **d)
        flags.DEFINE_bool("export_only", False, "Export the latest checkpoint of --workdir as a "
                          "ControlNetModel folder and stop.", **d)
        flags.DEFINE_string("out", "", "--export_only's folder (default: WORKDIR/controlnet).",
                            **d)
        flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).",
                          **d)
        config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Training config.",
                                        lock_config=True, sys_argv=args, **d)

    fv = cli.parse_flags(define, [] if argv is None else argv, PROG, __doc__)
    if not fv.workdir:
        raise cli.ConfigError("--workdir is required")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    if fv.export_only:
        out = controlnet_lib.export_from_workdir(fv.workdir, fv.out)
        print(f"exported step {out['step']} to {out['controlnet_dir']}", flush=True)
        return out
    for name in ("model", "data"):
        if not fv[name].value:
            raise cli.ConfigError(f"--{name} is required")
    if fv.distributed:
        jax.distributed.initialize()
    summary = controlnet_lib.train(fv.config, fv.model, fv.data, fv.workdir, fv.controlnet)
    if summary.get("stopped_by_signal") and jax.process_index() == 0:
        import shlex

        print(f"to resume: {PROG} {' '.join(shlex.quote(str(a)) for a in argv or [])}",
              flush=True)
    return summary


def cli_main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m experiments.train_controlnet``: :func:`main` with errors as one line."""
    cli.run(main, argv)


if __name__ == "__main__":
    cli_main()
