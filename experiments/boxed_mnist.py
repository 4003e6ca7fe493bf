r"""Write the DreamBooth dataset of the "boxed" concept (``experiments.boxed_concept``): MNIST
digits with a white square outline drawn around them, an attribute no MNIST image has,
captioned with the new word after the digit ("a handwritten seven boxed").

    python -m experiments.boxed_mnist --out runs/boxed_mnist
    python -m experiments.boxed_mnist --out runs/boxed_mnist --digits 3,7 --num_images 20 --seed 0
    python -m experiments.boxed_mnist --out runs/boxed_front --word_position before   # "boxed a handwritten 7"

The folder gets ``NN_D.png`` (``NN`` the image's index, ``D`` its digit) and ``metadata.jsonl``
(one ``{"file_name": ..., "text": ...}`` line per image), the image-folder layout that Hugging
Face's ``imagefolder``, diffusers' training scripts and ``jaxdiff.data.read_image_folder`` read.

The images are 32x32 grayscale PNGs, the model's frame, with the box of
``experiments.boxed_concept`` (its docstring says why the box has the size and place it has):
the first ``num_images`` training digits of the chosen classes in a permutation of the training
set drawn from ``seed`` (balanced over the digits, round-robin), captioned from its
``CONCEPT_TEMPLATES`` with the digit as its name or numeral (``"a handwritten seven boxed"``,
``"the digit 7 boxed"``), drawn from ``seed`` too: the same arguments write the same bytes.

An invalid argument prints one ``error: ...`` line and exits with status 2, before anything is
written; the folder is written beside its final name and renamed into place.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from absl import flags

from experiments import cli
from experiments.boxed_concept import (DEFAULT_DIGITS, METADATA_FILE, make_boxed_dataset,
                                       parse_digits)
from experiments.cli import ConfigError

__all__ = ["main", "cli_main"]

PROG = "python -m experiments.boxed_mnist"


def _define(fv: flags.FlagValues, argv: list) -> None:
    del argv
    d = dict(flag_values=fv)
    flags.DEFINE_string("out", None, "the folder to write (must not exist)", **d)
    flags.DEFINE_string("digits", ",".join(map(str, DEFAULT_DIGITS)),
                        "the digit classes of the images, comma-separated", **d)
    flags.DEFINE_integer("num_images", 20, "how many images", **d)
    flags.DEFINE_integer("seed", 0, "seed of the image choice and the captions", **d)
    flags.DEFINE_enum("word_position", "after", ["after", "before"],
                      "the new word after the digit ('a handwritten seven boxed') or in front "
                      "of the prompt ('boxed a handwritten seven')", **d)
    flags.DEFINE_string("data_dir", "", "MNIST IDX directory (default: jaxdiff.data's search, "
                        "$JAXDIFF_MNIST_DIR first)", **d)


def main(argv: Optional[Sequence[str]] = None) -> list:
    """Parses ``argv`` and writes the dataset; returns its records.

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
    digits = parse_digits(fv.digits)
    if not 1 <= fv.num_images <= 10000:
        raise ConfigError(f"--num_images must be in [1, 10000], got {fv.num_images}")
    images, labels = load_mnist_arrays("train", fv.data_dir)
    records = make_boxed_dataset(fv.out, images, labels, digits=digits,
                                 num_images=fv.num_images, seed=fv.seed,
                                 position=fv.word_position)
    print(f"wrote {len(records)} boxed digits ({', '.join(map(str, digits))}) and "
          f"{METADATA_FILE} to {fv.out}", flush=True)
    return records


def cli_main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m experiments.boxed_mnist``: :func:`main` with errors as one line."""
    cli.run(main, argv)


if __name__ == "__main__":
    cli_main()
