r"""Write the ControlNet demo's pairs folder (:mod:`experiments.controlnet_mnist_lib`): MNIST
training digits, their silhouette control images and captions, for ``experiments.train_controlnet``.

    python -m experiments.controlnet_mnist --out runs/cn_data --num_images 10000 --seed 0

The same arguments write the same bytes. An invalid argument prints one ``error: ...`` line and
exits with status 2.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
from absl import flags

from experiments import cli
from experiments.cli import ConfigError
from experiments.controlnet_mnist_lib import write_pairs

__all__ = ["main", "cli_main"]

PROG = "python -m experiments.controlnet_mnist"


def _define(fv: flags.FlagValues, argv: list) -> None:
    del argv
    d = dict(flag_values=fv)
    flags.DEFINE_string("out", None, "the folder to write (must not exist)", **d)
    flags.DEFINE_integer("num_images", 10000, "how many pairs (from MNIST's training set)", **d)
    flags.DEFINE_integer("seed", 0, "seed of the image choice and the captions", **d)
    flags.DEFINE_string("data_dir", "", "MNIST IDX directory (default: jaxdiff.data's search, "
                        "$JAXDIFF_MNIST_DIR first)", **d)


def main(argv: Optional[Sequence[str]] = None) -> list:
    """Parses ``argv`` and writes the pairs folder; returns its records.

    Raises:
      ConfigError: a bad flag, an existing ``--out``, missing MNIST data.
    """
    from experiments.evaluation import load_mnist_arrays

    fv = cli.parse_flags(_define, [] if argv is None else argv, PROG, __doc__)
    if not fv.out:
        raise ConfigError("--out is required")
    if os.path.exists(fv.out):
        raise ConfigError(f"--out {fv.out!r} already exists (choose a new folder)")
    cli.check_writable("--out", fv.out, directory=True)
    if not 1 <= fv.num_images <= 60000:
        raise ConfigError(f"--num_images must be in [1, 60000], got {fv.num_images}")
    if fv.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {fv.seed}")
    images, labels = load_mnist_arrays("train", fv.data_dir)
    records = write_pairs(fv.out, images, np.asarray(labels), num_images=fv.num_images,
                          seed=fv.seed)
    print(f"wrote {len(records)} (control, digit, caption) pairs to {fv.out}", flush=True)
    return records


def cli_main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m experiments.controlnet_mnist``: :func:`main` with errors as one line."""
    cli.run(main, argv)


if __name__ == "__main__":
    cli_main()
