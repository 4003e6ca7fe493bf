r"""Train a KL autoencoder on MNIST: 28x28x1 images -> 7x7x4 latents (data parallel over all
devices).

    python -m experiments.train_vae_mnist --workdir runs/vae_mnist
    python -m experiments.train_vae_mnist --workdir runs/vae_mnist --config.training.num_steps=500

The workdir gets ``config.json``, ``checkpoints/`` (Orbax; resumed automatically by rerunning the
same command), ``metrics.jsonl`` (training loss), ``eval.jsonl`` (test-set reconstruction MSE,
PSNR and the latents' standard deviation with the ``scaling_factor`` it suggests, EMA params) and
``recon/step_XXXXXX.png`` (originals over reconstructions). An invalid config value or path prints
one ``error: ...`` line and exits with status 2, before anything is written. SIGTERM / Ctrl-C save
a checkpoint and exit cleanly.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence


from experiments import cli, vae_lib

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                              "vae_mnist.py")
PROG = "python -m experiments.train_vae_mnist"

__all__ = ["main", "cli_main", "DEFAULT_CONFIG"]


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Parses ``argv`` (without the program name) and trains; returns the summary of
    :func:`experiments.vae_lib.train`.

    Raises:
      ConfigError: an invalid flag, config field or path (nothing is written).
    """
    return cli.train_command(argv, prog=PROG, doc=__doc__, default_config=DEFAULT_CONFIG,
                             train=vae_lib.train,
                             workdir_help="Directory for checkpoints, metrics and evaluations.")


def cli_main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m experiments.train_vae_mnist``: :func:`main` with errors as one line."""
    cli.run(main, argv)


if __name__ == "__main__":
    cli_main()
