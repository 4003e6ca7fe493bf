"""Stable Diffusion text-to-image: jaxdiff's one-jit pipeline against diffusers'
``StableDiffusionPipeline`` on the same random weights (one folder written by diffusers, loaded by
both). Measures, never asserts.

    python -m benchmarks.bench_sd_pipeline --tiny            # seconds: a smoke run
    python -m benchmarks.bench_sd_pipeline                   # the reduced-width CPU config
    python -m benchmarks.bench_sd_pipeline --full_width --size 512 --steps 30   # GPU / TPU

- **Model**: SD 1.x's architecture (CrossAttnDown/Up blocks, a CLIP text encoder, AutoencoderKL
  with 4 latent channels) at REDUCED WIDTHS by default: the real SD widths (UNet 320-1280, VAE
  128-512, CLIP 768 x 12 layers) are far too slow on a CPU. ``--tiny`` shrinks further (2 levels,
  32x32 images, 2 steps); ``--full_width`` builds the real SD 1.5 widths (for an accelerator).
- **Work**: ``--batch`` prompts, ``--steps`` DDIM steps, guidance 7.5 (both branches in one
  batched UNet call), VAE decode, from the same initial latents; the images are compared once.
- **Timing**: the median of ``--repeats`` calls after one warm-up call (jaxdiff's first call, the
  compile, is reported separately); diffusers runs eagerly in float32 on the CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

from benchmarks.common import machine


def _build(path: str, args) -> object:
    from jaxdiff.pipelines.tiny import write_tiny_stable_diffusion

    if args.tiny:
        widths = dict(unet_channels=(16, 32), vae_channels=(8, 16), text_width=32, text_layers=2)
    elif args.full_width:
        widths = dict(unet_channels=(320, 640, 1280, 1280), vae_channels=(128, 256, 512, 512),
                      text_width=768, text_layers=12)
    else:
        widths = dict(unet_channels=(64, 128, 256), vae_channels=(32, 64, 64, 64),
                      text_width=256, text_layers=4)
    return write_tiny_stable_diffusion(path, image_size=args.size, max_length=77, **widths)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
    p.add_argument("--full_width", action="store_true", help="SD 1.5's real widths")
    p.add_argument("--size", type=int, default=None, help="image side (default 64; tiny 32)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default 10; tiny 2)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    args.size = args.size or (32 if args.tiny else 64)
    args.steps = args.steps or (2 if args.tiny else 10)
    if args.tiny:
        args.repeats = min(args.repeats, 2)

    import torch

    from jaxdiff.pipelines import generate, load_stable_diffusion

    with tempfile.TemporaryDirectory() as tmp:
        pipe = _build(tmp, args)
        sd = load_stable_diffusion(tmp)
    f = sd.vae_scale_factor
    shape = (args.batch, args.size // f, args.size // f, 4)
    lat = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    prompts = ["a photo of a cat"] * args.batch
    kw = dict(num_steps=args.steps, guidance_scale=7.5, latents=lat, height=args.size,
              width=args.size)

    t0 = time.perf_counter()
    out = generate(sd, prompts, **kw)
    compile_s = time.perf_counter() - t0
    jax_times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = generate(sd, prompts, **kw)
        jax_times.append(time.perf_counter() - t0)

    lat_t = torch.from_numpy(lat.transpose(0, 3, 1, 2).copy())
    tkw = dict(num_inference_steps=args.steps, guidance_scale=7.5, height=args.size,
               width=args.size, output_type="np")
    with torch.inference_mode():
        ref = pipe(prompts, latents=lat_t, **tkw).images  # warm-up
        torch_times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            pipe(prompts, latents=lat_t, **tkw)
            torch_times.append(time.perf_counter() - t0)
    err = float(np.abs(out.float_images - ref).max())
    params = sum(int(np.prod(x.shape)) for x in __import__("jax").tree.leaves(sd.params))
    jm, tm = statistics.median(jax_times), statistics.median(torch_times)
    width = "tiny" if args.tiny else ("full SD 1.5 widths" if args.full_width
                                      else "reduced widths")
    print(f"machine: {machine()}")
    print(f"model: SD 1.x architecture, {width}, {params / 1e6:.2f}M params; {args.size}x"
          f"{args.size}, batch {args.batch}, DDIM {args.steps} steps, guidance 7.5")
    print(f"| {'':28s} | {'median s':>9s} | {'vs diffusers':>12s} |")
    print(f"| {'-' * 28} | {'-' * 9} | {'-' * 12} |")
    print(f"| {'diffusers (torch, eager)':28s} | {tm:9.3f} | {1.0:11.2f}x |")
    print(f"| {'jaxdiff (one jit)':28s} | {jm:9.3f} | {tm / jm:11.2f}x |")
    print(f"jaxdiff first call (compile + run): {compile_s:.1f} s; max |image diff| {err:.1e}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
