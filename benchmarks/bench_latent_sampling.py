"""Sampling cost per image: the text-to-MNIST latent diffusion model against the pixel-space
class-conditional MNIST model, at equal sampler steps and guidance (measures, never asserts).

    python -m benchmarks.bench_latent_sampling --latent runs/latent_mnist --pixel runs/mnist
    python -m benchmarks.bench_latent_sampling --latent runs/latent_mnist --pixel runs/mnist \
        --steps 10,25,50 --batch 100 --repeats 3

Both sample a batch of ``--batch`` images with DDIM and classifier-free guidance (so two model
evaluations per step, batched as one call), each as one jitted program: the pixel model through
``experiments.mnist_sampling.make_sample_fn`` (28x28x1), the latent model through
``jaxdiff.pipelines.generate`` (text encoding, 8x8x4 latents, VAE decode to 32x32). The time is the
median of ``--repeats`` runs after a warm-up (the compile time is reported apart), divided by the
batch. Also reports the parameters and one forward pass of each denoiser and the VAE decode.
Prints a markdown table and the machine line.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from benchmarks.common import machine


def _median_time(fn, repeats: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def _count(tree) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--latent", required=True, help="a train_latent_mnist workdir")
    ap.add_argument("--pixel", required=True, help="a train_mnist workdir")
    ap.add_argument("--steps", default="25", help="comma-separated DDIM step counts")
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from absl import logging

    from experiments import latent_lib, mnist_lib, mnist_sampling
    from jaxdiff.pipelines import generate

    logging.set_verbosity(logging.WARNING)
    pixel = mnist_lib.load_run(args.pixel)
    latent = latent_lib.load_latent_run(args.latent)
    sd = latent.sd
    labels = (np.arange(args.batch) % 10).astype(np.int32)
    prompts = [f"a handwritten {d}" for d in labels]
    key = jax.random.key(0)
    rows = []
    for steps in [int(s) for s in args.steps.split(",")]:
        sampling = mnist_sampling.sampling_config("ddim", steps, args.guidance,
                                                  clip_x0=pixel.config.sampling.clip_x0)
        fn = mnist_sampling.make_sample_fn(pixel.model, pixel.schedule, pixel.mesh, sampling,
                                           pixel.config.diffusion.prediction_type)
        pc, pt = _median_time(lambda: mnist_sampling.sample_images(
            fn, pixel.ema_params, labels, key, pixel.mesh), args.repeats)
        lc, lt = _median_time(lambda: generate(sd, prompts, num_steps=steps,
                                               guidance_scale=args.guidance, key=key).images,
                              args.repeats)
        rows.append((steps, pc, pt, lc, lt))
        print(f"steps {steps}: pixel {pt / args.batch * 1e3:.1f} ms/image, latent "
              f"{lt / args.batch * 1e3:.1f} ms/image", flush=True)

    print(f"\nDDIM, guidance {args.guidance:g} (2 model evaluations per step, one batched "
          f"call), batch {args.batch}, median of {args.repeats} runs after a warm-up.\n")
    print("| steps | pixel-space (28x28x1) ms / image | latent (8x8x4 + decode) ms / image | "
          "speed-up | compile + first run, pixel / latent (s) |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for steps, pc, pt, lc, lt in rows:
        print(f"| {steps} | {pt / args.batch * 1e3:.1f} | {lt / args.batch * 1e3:.1f} | "
              f"{pt / lt:.2f}x | {pc:.1f} / {lc:.1f} |")
    print(f"\nParameters: pixel UNet {_count(pixel.ema_params):,}; latent UNet "
          f"{_count(sd.params['unet']):,}, text encoder {_count(sd.params['text_encoder']):,}, "
          f"VAE decoder+encoder {_count(sd.params['vae']):,}.")
    print(f"Machine: {machine()}")


if __name__ == "__main__":
    main()
