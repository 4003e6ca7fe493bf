r"""Train a class-conditional diffusion UNet on MNIST (data parallel over all devices).

    python -m experiments.train_mnist --workdir runs/mnist
    python -m experiments.train_mnist --workdir runs/mnist --config.training.batch_size=128
    python -m experiments.train_mnist --workdir runs/accel \
        --config=experiments/configs/mnist_accel.py

The workdir gets ``config.json``, ``checkpoints/`` (Orbax; resumed automatically),
``metrics.jsonl``, ``samples/step_XXXXXX.png`` (EMA params, ``config.sampling``'s sampler with
classifier-free guidance, one row per class) and, with ``--config.training.tensorboard=True``,
TensorBoard events in ``tb/``. The config and paths are checked before anything is written: an
invalid value prints one ``error: ...`` line and exits with status 2. SIGTERM / Ctrl-C save a
checkpoint and exit cleanly (a second Ctrl-C interrupts at once); rerunning the same command resumes
(with the same model, diffusion, batch size, seed and optimizer structure; a changed ``num_steps``
or learning rate is allowed and logged). Multi-host: call with ``--distributed`` on every host (runs
``jax.distributed.initialize()``); a signal to any host stops all of them together at the next
``log_every`` or checkpoint step.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence


from experiments import cli, mnist_lib

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "mnist.py")
PROG = "python -m experiments.train_mnist"

__all__ = ["main", "cli_main", "DEFAULT_CONFIG"]


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Parses ``argv`` (without the program name) and trains; returns the summary of
    :func:`experiments.mnist_lib.train`.

    Raises:
      ConfigError: an invalid flag, config field or path (nothing is written).
    """
    return cli.train_command(argv, prog=PROG, doc=__doc__, default_config=DEFAULT_CONFIG,
                             train=mnist_lib.train,
                             workdir_help="Directory for checkpoints, metrics and samples.")


def cli_main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m experiments.train_mnist``: :func:`main` with errors as one line, exit 0."""
    cli.run(main, argv)


if __name__ == "__main__":
    cli_main()
