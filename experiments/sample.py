r"""Sample a trained class-conditional MNIST model from its workdir (EMA params of the latest
checkpoint) with any of jaxdiff's samplers and classifier-free guidance; the batch is sharded over
all devices.

    python -m experiments.sample --workdir runs/mnist --num_samples 64 --sampler ddim --steps 50 \
        --guidance_scale 2.0 --labels 0,1,2 --out samples.png
    python -m experiments.sample --workdir runs/mnist --sampler dpm_solver --steps 20

Writes ``out`` (a PNG grid, one row per run of ``--labels``' cycle) and ``out`` with ``.npz``
holding ``images [N, 28, 28, 1]`` in ``[-1, 1]`` and ``labels [N]``. ``x0`` is clipped as the run
was configured (``sampling.clip_x0`` in its ``config.json``). ``--eta`` and ``--ddim_clip`` are DDIM
options: giving one with another sampler is an error.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import jax
import numpy as np
from absl import flags, logging

from experiments import cli, mnist_lib, mnist_sampling
from experiments.cli import ConfigError
from experiments.images import save_grid
from jaxdiff.samplers import sampler_names

PROG = "python -m experiments.sample"

__all__ = ["main", "cli_main", "parse_labels"]


def _define(fv: flags.FlagValues, argv: list) -> None:
    del argv
    flags.DEFINE_string("workdir", None, "train_mnist workdir (holds config.json and "
                        "checkpoints/)", flag_values=fv)
    flags.DEFINE_integer("num_samples", 64, "number of samples", flag_values=fv)
    flags.DEFINE_enum("sampler", None, list(sampler_names()),
                      "sampler (default: the run's config.sampling.sampler)", flag_values=fv)
    flags.DEFINE_integer("steps", None, "sampling steps (default: the run's)", flag_values=fv)
    flags.DEFINE_float("guidance_scale", None, "classifier-free guidance; 1 = none (default: "
                       "the run's)",
                       flag_values=fv)
    flags.DEFINE_string("guidance_interval", None, "guide only at timesteps t_lo,t_hi (e.g. "
                        "200,800); all = at every step (default: the run's)", flag_values=fv)
    flags.DEFINE_float("eta", None, "DDIM's eta (default 0: deterministic)", flag_values=fv)
    flags.DEFINE_enum("ddim_clip", None, list(mnist_sampling.DDIM_CLIP_FORMS),
                      "DDIM with clipping: re-derive eps from the clipped x0 (consistent, the "
                      "default) or keep the model's eps as diffusers does", flag_values=fv)
    flags.DEFINE_multi_string("option", [], "a further sampler option as key=value (e.g. "
                              "--option spacing=leading --option sigma_schedule=karras)",
                              flag_values=fv)
    flags.DEFINE_string("labels", "", "comma-separated class labels, cycled (default: all)",
                        flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed of the sampling noise", flag_values=fv)
    flags.DEFINE_string("out", "samples.png", "PNG grid; a .npz is written next to it",
                        flag_values=fv)


def parse_labels(text: str, num_classes: int) -> list[int]:
    """``"0,7"`` -> ``[0, 7]``; ``""`` -> every class.

    Raises:
      ConfigError: not comma-separated integers, or a label outside ``[0, num_classes)``.
    """
    try:
        labels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--labels must be comma-separated integers, got {text!r}") from None
    if any(not 0 <= d < num_classes for d in labels):
        raise ConfigError(f"--labels must be in 0..{num_classes - 1} (the run's "
                          f"model.num_classes is {num_classes}), got {labels}")
    return labels or list(range(num_classes))


def main(argv: Optional[Sequence[str]] = None) -> np.ndarray:
    """Parses ``argv`` (without the program name), samples, writes the PNG and the ``.npz``;
    returns the images ``[N, 28, 28, C]``.

    Raises:
      ConfigError: an invalid flag, an ``--out`` that cannot be written (checked before the
        sampling), or a workdir without a run.
    """
    fv = cli.parse_flags(_define, [] if argv is None else argv, PROG, __doc__)
    if not fv.workdir:
        raise ConfigError("--workdir is required")
    if fv.num_samples < 1:
        raise ConfigError(f"--num_samples must be >= 1, got {fv.num_samples}")
    interval = mnist_sampling.parse_guidance_interval(fv.guidance_interval)
    npz = os.path.splitext(fv.out)[0] + ".npz"
    if not fv.out or os.path.abspath(npz) == os.path.abspath(fv.out):
        raise ConfigError(f"--out must name the PNG grid (the .npz is written next to it), got "
                          f"{fv.out!r}")
    cli.check_writable("--out", fv.out)   # before the sampling, not after it
    cli.check_writable("--out", npz)
    logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
    run = mnist_lib.load_run(fv.workdir)
    num_classes = run.model.config.num_classes
    digits = parse_labels(fv.labels, num_classes)
    sampling = mnist_sampling.sampling_from_flags(
        run.config.sampling, fv.sampler, fv.steps, fv.guidance_scale, eta=fv.eta,
        ddim_clip=fv.ddim_clip, guidance_interval=interval,
        options=cli.parse_sampler_options(fv.option))
    fn = mnist_sampling.make_sample_fn(run.model, run.schedule, run.mesh, sampling,
                                       run.config.diffusion.prediction_type)
    labels = [digits[i % len(digits)] for i in range(fv.num_samples)]
    images = mnist_sampling.sample_images(fn, run.ema_params, labels, jax.random.key(fv.seed),
                                          run.mesh)
    if jax.process_index() == 0:
        save_grid(images, fv.out, ncols=len(digits) if len(digits) > 1 else 8)
        np.savez(npz, images=images, labels=np.asarray(labels, np.int32))
        print(f"wrote {fv.out} and {npz} ({len(labels)} samples, {sampling.sampler}, "
              f"{sampling.num_steps} steps, guidance {sampling.guidance_scale})")
    return images


def cli_main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m experiments.sample``: :func:`main` with errors as one line, exit 0."""
    cli.run(main, argv)


if __name__ == "__main__":
    cli_main()
