"""The cost of a ControlNet step over a plain UNet step: jaxdiff against diffusers (PyTorch) on
the same tiny SD-shaped models and weights.

    python -m benchmarks.bench_controlnet_step                   # batch 2, 16x16 latents
    python -m benchmarks.bench_controlnet_step --batch 4 --latent 32 --reps 10

One denoising step's model evaluation, two ways per side: the UNet alone, and one ControlNet
(its residuals at ``conditioning_scale`` 0.8) followed by the UNet that adds them. jaxdiff: each
a single ``jax.jit`` program; diffusers: ``ControlNetModel`` then ``UNet2DConditionModel`` in
eager mode under ``torch.no_grad``. The models: a diffusers ``UNet2DConditionModel`` and a
``ControlNetModel`` of SD 1.x's layout at a small width (``--width``: block channels ``w, 2w,
2w``, cross-attention at the first two levels, 77 context tokens), every weight drawn at random
(none zero), converted to jaxdiff with :func:`jaxdiff.convert.from_diffusers` and
:func:`jaxdiff.convert.controlnet_from_diffusers`; the two sides' outputs are compared once.
The control image is 8x the latent side (the default 4-width conditioning network). Medians of
``--reps`` calls after ``--warmup``, the sides alternating. Both on the CPU (torch on its CPU
device even where JAX has a GPU). Measures, never asserts.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import alternate, machine, timed


def randomize(model, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            scale = p.ndim == 1 and "norm" in name and name.endswith("weight")
            p.copy_(1.0 + 0.1 * noise if scale else 0.1 * noise)
    return model.eval()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--latent", type=int, default=16, help="latent side (control image: 8x)")
    p.add_argument("--width", type=int, default=32, help="first level's channels")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--torch_threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's own choice); 1 is robust on a "
                        "shared machine")
    args = p.parse_args(argv)

    import diffusers
    import flax
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    from jaxdiff.convert import controlnet_from_diffusers, from_diffusers
    from jaxdiff.models import ControlNet, UNet

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    w = args.width
    shape = dict(
        in_channels=4, block_out_channels=(w, 2 * w, 2 * w), layers_per_block=2,
        norm_num_groups=8, cross_attention_dim=64, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    )  # fmt: skip
    unet_t = randomize(UNet2DConditionModel(
        **shape, out_channels=4, sample_size=args.latent,
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")), 0)
    cn_t = randomize(ControlNetModel(**shape), 1)
    unet_cfg, unet_params = from_diffusers(unet_t)
    cn_cfg, cn_params = controlnet_from_diffusers(cn_t)

    rng = np.random.default_rng(0)
    b, s = args.batch, args.latent
    x = rng.standard_normal((b, 4, s, s)).astype(np.float32)
    image = rng.uniform(0, 1, (b, 3, 8 * s, 8 * s)).astype(np.float32)
    ctx = rng.standard_normal((b, 77, 64)).astype(np.float32)
    t = np.array([500] * b)
    xt, imt, ctxt, tt = map(torch.from_numpy, (x, image, ctx, t))
    xj, imj = (jnp.asarray(a.transpose(0, 2, 3, 1)) for a in (x, image))
    ctxj, tj = jnp.asarray(ctx), jnp.asarray(t)

    unet, cn = UNet(unet_cfg), ControlNet(cn_cfg)
    plain_j = jax.jit(lambda up, x, t, c: unet.apply({"params": up}, x, t, context=c))

    @jax.jit
    def controlled_j(up, cp, x, t, c, im):
        down, mid = cn.apply({"params": cp}, x, t, im, context=c, conditioning_scale=0.8)
        return unet.apply({"params": up}, x, t, context=c, down_residuals=down,
                          mid_residual=mid)

    def plain_t():
        with torch.no_grad():
            return unet_t(xt, tt, encoder_hidden_states=ctxt).sample

    def controlled_t():
        with torch.no_grad():
            down, mid = cn_t(xt, tt, encoder_hidden_states=ctxt, controlnet_cond=imt,
                             conditioning_scale=0.8, return_dict=False)
            return unet_t(xt, tt, encoder_hidden_states=ctxt,
                          down_block_additional_residuals=down,
                          mid_block_additional_residual=mid).sample

    compile_plain = timed(lambda: plain_j(unet_params, xj, tj, ctxj))
    compile_cn = timed(lambda: controlled_j(unet_params, cn_params, xj, tj, ctxj, imj))
    ref = controlled_t().numpy()
    out = np.asarray(controlled_j(unet_params, cn_params, xj, tj, ctxj, imj)).transpose(0, 3, 1, 2)
    err = float(np.abs(out - ref).max() / np.abs(ref).max())
    med = alternate({
        "jax plain": lambda: plain_j(unet_params, xj, tj, ctxj),
        "jax controlnet": lambda: controlled_j(unet_params, cn_params, xj, tj, ctxj, imj),
        "torch plain": plain_t,
        "torch controlnet": controlled_t,
    }, args.reps, args.warmup)  # fmt: skip

    n = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))  # noqa: E731
    print(f"Machine: {machine()}; torch threads {torch.get_num_threads()}")
    print(f"Versions: jax {jax.__version__}, flax {flax.__version__}, torch {torch.__version__}, "
          f"diffusers {diffusers.__version__}")
    print(f"Models: UNet {n(unet_params) / 1e6:.2f}M params, ControlNet {n(cn_params) / 1e6:.2f}M; "
          f"batch {b}, {s}x{s} latents, {8 * s}x{8 * s} control images, 77 context tokens; "
          f"float32; median of {args.reps} after {args.warmup} warm-up; jax compile "
          f"{compile_plain:.1f} s (plain), {compile_cn:.1f} s (with ControlNet); outputs agree "
          f"to {err:.1e} (relative)\n")
    print("| step | jaxdiff, jit (ms) | diffusers, torch eager (ms) | torch / jaxdiff |")
    print("|---|---:|---:|---:|")
    for name in ("plain", "controlnet"):
        j, tq = med[f"jax {name}"], med[f"torch {name}"]
        label = "UNet" if name == "plain" else "ControlNet + UNet"
        print(f"| {label} | {1e3 * j:.1f} | {1e3 * tq:.1f} | {tq / j:.2f}x |")
    print(f"| ControlNet step / UNet step | {med['jax controlnet'] / med['jax plain']:.2f}x | "
          f"{med['torch controlnet'] / med['torch plain']:.2f}x | |")


if __name__ == "__main__":
    main()
