r"""Train an unconditional score model (a ``ScoreUNet``, denoising score matching) on MNIST with a
continuous-time SDE (VE by default; data parallel over all devices).

    python -m experiments.train_score_mnist --workdir runs/ve_sde
    python -m experiments.train_score_mnist --workdir runs/vp_sde --config.sde.type=vp
    python -m experiments.train_score_mnist --workdir runs/ve_sde \
        --config=experiments/configs/mnist_ve_sde.py --config.training.num_steps=4000

The default config is ``experiments/configs/mnist_ve_sde.py``. It trains on the one training loop
(``jaxdiff.training.fit``), as the discrete trainer does: the workdir gets ``config.json``,
``checkpoints/`` (Orbax; resumed automatically and exactly), ``metrics.jsonl`` and
``samples/step_XXXXXX.png`` (EMA params, ``config.sampling``'s PC or ODE sampler). The config and
paths are checked before anything is written: an invalid value prints one ``error: ...`` line and
exits with status 2. SIGTERM / Ctrl-C save a checkpoint and exit cleanly; rerunning the same
command resumes (a changed ``num_steps`` or learning rate is allowed and logged; another model,
SDE, loss, batch size or seed is refused). ``python -m experiments.eval_score_mnist`` evaluates
the run.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence


from experiments import cli, score_mnist

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                              "mnist_ve_sde.py")
PROG = "python -m experiments.train_score_mnist"

__all__ = ["main", "cli_main", "DEFAULT_CONFIG"]


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Parses ``argv`` (without the program name) and trains; returns the summary of
    :func:`experiments.score_mnist.train`.

    Raises:
      ConfigError: an invalid flag, config field or path (nothing is written).
    """
    return cli.train_command(argv, prog=PROG, doc=__doc__, default_config=DEFAULT_CONFIG,
                             train=score_mnist.train,
                             workdir_help="Directory for checkpoints, metrics and samples.")


def cli_main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m experiments.train_score_mnist``: :func:`main`, errors as one line (exit 2)."""
    cli.run(main, argv)


if __name__ == "__main__":
    cli_main()
