"""A picture of what the adjectives do in a text-to-MNIST latent run: for each digit asked, one row
per adjective ("a thin digit seven", "a thick digit seven", ...), every row from the same initial
noise (the same seeds, column by column), so that the words are the only difference.

    python -m benchmarks.latent_mnist_adjective_grid --workdir runs/latent_mnist \
        --digits 2 7 --out_png docs/assets/latent_mnist_adjectives.png

The run's sampler, steps and guidance (``config.sampling``); the images are cropped to 28x28.
"""

from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--digits", type=int, nargs="+", default=[2, 7])
    ap.add_argument("--words", nargs="+", default=["thin", "thick", "small", "large",
                                                   "upright", "slanted"])
    ap.add_argument("--columns", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out_png", required=True)
    args = ap.parse_args()

    import jax
    import numpy as np

    from experiments import attribute_eval, latent_data, latent_lib, latent_pipeline, mnist_prompts

    run = latent_lib.load_latent_run(args.workdir)
    s = run.config.sampling
    prompts = [mnist_prompts.caption(attribute_eval.TEMPLATE, d, 0, (w,))
               for d in args.digits for w in args.words]
    # One noise draw per column, shared by every row: generate() draws per batch element from
    # the key, so each row is sampled as its own batch with the same key.
    rows = [latent_pipeline.sample(run.sd, [p] * args.columns, jax.random.key(args.seed),
                                   num_steps=int(s.num_steps),
                                   guidance_scale=float(s.guidance_scale),
                                   batch_size=args.columns) for p in prompts]
    images = latent_data.crop_images(np.concatenate(rows))
    print(latent_pipeline.save_prompt_grid(images, prompts, args.out_png))


if __name__ == "__main__":
    main()
