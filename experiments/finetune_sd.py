r"""Fine-tune a diffusers Stable Diffusion folder on a folder of your images: LoRA (the default),
full fine-tuning, or DreamBooth with prior preservation (``experiments/configs/finetune_sd.py``).

    python -m experiments.finetune_sd --model path/to/sd --data my_images --workdir runs/ft
    python -m experiments.finetune_sd --model path/to/sd --data my_images --workdir runs/ft \
        --config=experiments/configs/finetune_sd.py:full --config.memory.remat=True
    python -m experiments.finetune_sd --model path/to/sd --data dog_photos --workdir runs/db \
        --config=experiments/configs/finetune_sd.py:dreambooth_lora \
        --config.dreambooth.instance_prompt="a photo of sks dog" \
        --config.dreambooth.class_prompt="a photo of a dog"

The image folder has captions in ``metadata.jsonl`` (``file_name`` / ``text``) or in a ``.txt``
beside each image (DreamBooth: the instance prompt is every image's caption). The workdir gets
``checkpoints/`` (rerun the same command to resume), ``metrics.jsonl``, ``samples/`` (grids of the
validation prompts), ``config.json``, DreamBooth's ``class_images/``, and at the end
``pytorch_lora_weights.safetensors`` (LoRA) or ``diffusers/`` (full). A workdir of another model,
mode, rank or target set is refused before anything is written. An invalid value prints one
``error: ...`` line and exits with status 2.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence

from absl import flags

from experiments import cli, finetune_lib

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                              "finetune_sd.py")
PROG = "python -m experiments.finetune_sd"

__all__ = ["main", "cli_main", "DEFAULT_CONFIG"]


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Parses ``argv`` (without the program name) and fine-tunes; returns the summary of
    :func:`experiments.finetune_lib.train`.

    Raises:
      ConfigError: an invalid flag, config field or path (nothing is written).
    """
    import jax
    from absl import logging
    from ml_collections import config_flags

    def define(fv: flags.FlagValues, args: list) -> None:
        flags.DEFINE_string("model", None, "The diffusers Stable Diffusion folder.",
                            flag_values=fv)
        flags.DEFINE_string("data", None, "The image folder (captions: metadata.jsonl or .txt).",
                            flag_values=fv)
        flags.DEFINE_string("workdir", None, "Directory for checkpoints, samples and exports.",
                            flag_values=fv)
        flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).",
                          flag_values=fv)
        config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Fine-tuning config.",
                                        flag_values=fv, lock_config=True, sys_argv=args)

    fv = cli.parse_flags(define, [] if argv is None else argv, PROG, __doc__)
    for name in ("model", "data", "workdir"):
        if not fv[name].value:
            raise cli.ConfigError(f"--{name} is required")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    if fv.distributed:
        jax.distributed.initialize()
    summary = finetune_lib.train(fv.config, fv.model, fv.data, fv.workdir)
    if summary.get("stopped_by_signal") and jax.process_index() == 0:
        import shlex

        print(f"to resume: {PROG} {' '.join(shlex.quote(str(a)) for a in argv or [])}",
              flush=True)
    return summary


def cli_main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m experiments.finetune_sd``: :func:`main` with errors as one line."""
    cli.run(main, argv)


if __name__ == "__main__":
    cli_main()
