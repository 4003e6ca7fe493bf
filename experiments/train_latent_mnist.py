r"""Train a text-to-MNIST latent diffusion model from nothing: the MNIST autoencoder (unless the
workdir or ``--config.vae_workdir`` already has one), then a CLIP text encoder and a UNet with
cross-attention, jointly, on its latents (``experiments/configs/latent_mnist.py``).

    python -m experiments.train_latent_mnist --workdir runs/latent_mnist
    python -m experiments.train_latent_mnist --workdir runs/latent_mnist \
        --config.vae_workdir=runs/vae --config.training.num_steps=2000

The workdir gets ``vae/`` (the autoencoder's run, stage 1), ``tokenizer/`` (the CLIP BPE learnt on
the training prompts), ``latents.npz`` and ``latent_stats.json`` (the encoded training set and its
measured ``scaling_factor``), ``config.json``, ``checkpoints/`` (Orbax; both stages resume by
rerunning the same command), ``metrics.jsonl`` and ``samples/step_XXXXXX.png`` (one row per
prompt, the prompt written beside it; the prompts also in ``step_XXXXXX.txt``). An invalid config
value or path prints one ``error: ...`` line and exits with status 2, before anything is written.
SIGTERM / Ctrl-C save a checkpoint and exit cleanly.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence


from experiments import cli, latent_lib

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                              "latent_mnist.py")
PROG = "python -m experiments.train_latent_mnist"

__all__ = ["main", "cli_main", "DEFAULT_CONFIG"]


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Parses ``argv`` (without the program name) and trains both stages; returns the summary of
    :func:`experiments.latent_lib.train`.

    Raises:
      ConfigError: an invalid flag, config field or path (nothing is written).
    """
    return cli.train_command(argv, prog=PROG, doc=__doc__, default_config=DEFAULT_CONFIG,
                             train=latent_lib.train,
                             workdir_help="Directory for both stages' runs.")


def cli_main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m experiments.train_latent_mnist``: :func:`main` with errors as one line."""
    cli.run(main, argv)


if __name__ == "__main__":
    cli_main()
