"""The exported text-to-MNIST model in PyTorch: diffusers' ``StableDiffusionPipeline`` loads
``WORKDIR/diffusers`` (written by ``python -m experiments.train_latent_mnist``) and samples the same
images as jaxdiff's pipeline from the same initial latents (measures, never asserts).

    python -m benchmarks.latent_mnist_diffusers --model runs/latent_mnist/diffusers

Both run the folder's scheduler (DDIM) for ``--steps`` steps at ``--guidance``, on ``--batch``
prompts (one per digit, from the held-out templates) and the same standard-normal latents; the
script prints the largest absolute difference of the float images in ``[0, 1]`` and the
classifier's reading of both image sets when ``--classifier_path`` is given.
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--classifier_path", default="")
    args = ap.parse_args()

    import jax
    import torch
    from diffusers import StableDiffusionPipeline

    from benchmarks.common import machine
    from experiments import mnist_prompts
    from experiments.latent_data import crop_images
    from jaxdiff.pipelines import generate, load_stable_diffusion

    torch.set_num_threads(2)
    labels = np.arange(args.batch) % 10
    prompts = mnist_prompts.sample_prompts(labels, jax.random.key(0), "heldout")
    latents = np.random.default_rng(0).standard_normal((args.batch, 8, 8, 4)).astype(np.float32)
    sd = load_stable_diffusion(args.model)
    ours = generate(sd, prompts, num_steps=args.steps, guidance_scale=args.guidance,
                    latents=latents).float_images
    pipe = StableDiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance,
                      latents=torch.from_numpy(latents.transpose(0, 3, 1, 2)),
                      output_type="np").images
    print(f"{type(pipe).__name__} ({type(pipe.scheduler).__name__}, {args.steps} steps, "
          f"guidance {args.guidance:g}) vs jaxdiff generate, {args.batch} prompts, images "
          f"{theirs.shape}: max |diffusers - jaxdiff| = {np.abs(theirs - ours).max():.2e}")
    if args.classifier_path:
        from jaxdiff.metrics import classify, load_classifier

        clf = load_classifier(args.classifier_path)
        for name, imgs in (("jaxdiff", ours), ("diffusers", theirs)):
            crop = crop_images(np.asarray(imgs)) * 2 - 1
            pred = np.asarray(classify(clf, crop)[1]).argmax(-1)
            print(f"{name}: classifier reads {pred.tolist()} for prompts of digits "
                  f"{labels.tolist()}")
    print("prompts:", prompts)
    print(f"Machine: {machine()}")


if __name__ == "__main__":
    main()
