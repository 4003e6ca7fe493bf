"""The SDXL base UNet at full size: one forward pass of jaxdiff against diffusers'
``UNet2DConditionModel`` on the same random weights (bfloat16 on both sides), their difference,
and the time of each on this machine. Measures, never asserts.

    python -m benchmarks.bench_sdxl_unet --small        # SDXL's shape at 1/5 width: a smoke run
    python -m benchmarks.bench_sdxl_unet                 # the real config, 64x64 latent (512 px)
    python -m benchmarks.bench_sdxl_unet --size 128      # 1024 px (slow on a CPU)

- **Model**: stabilityai/stable-diffusion-xl-base-1.0's ``unet/config.json`` (2.57B parameters:
  ``[320, 640, 1280]`` channels, transformer depth ``[1, 2, 10]``, 2048-wide context, the
  ``"text_time"`` embedding of the pooled 1280-wide text embedding and 6 time ids). ``--small``
  keeps the shape (levels, blocks, depth ``[1, 2, 2]``, heads of 64 channels) at
  ``[64, 128, 256]`` channels.
- **Weights**: diffusers builds the model directly in ``--dtype`` (torch's default dtype set
  while it is constructed: the float32 copy of 10 GB is never made) with its own random init;
  the weights are converted to jaxdiff one tensor at a time (:func:`jaxdiff.convert.torch_key`
  names, :func:`jaxdiff.convert.torch_io.torch_to_flax` layouts), so memory holds the two bf16
  copies (2 x 5.1 GB) and never a third. float32 doubles that: use ``--small`` or a larger
  machine.
- **Inputs**: batch ``--batch`` latents ``[B, 4, size, size]``, t = 500, a ``[B, 77, 2048]``
  context, ``text_embeds`` ``[B, 1280]``, ``time_ids`` ``[8 size, 8 size, 0, 0, 8 size, 8 size]``;
  the same arrays on both sides (cast to ``--dtype``).
- **Timing**: jaxdiff's first call (compile + run) separately, then ``--reps`` calls of each side,
  alternating, after one warm-up each; medians. torch runs eagerly under ``torch.no_grad`` with
  its default threads. The output difference: max |jaxdiff - diffusers| and that over
  max |diffusers| (bfloat16 rounds at 2^-8 relative, so ~1e-2 is expected after ~100 layers).
"""

from __future__ import annotations

import argparse
import gc
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import alternate, machine, rss_bytes

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (all keys that differ from
# UNet2DConditionModel's defaults).
SDXL_BASE = dict(
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    layers_per_block=2, attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10],
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)  # fmt: skip
SMALL = dict(
    SDXL_BASE, block_out_channels=[64, 128, 256], attention_head_dim=[1, 2, 4],
    transformer_layers_per_block=[1, 2, 2], cross_attention_dim=512, addition_time_embed_dim=64,
    projection_class_embeddings_input_dim=256 + 6 * 64,
)  # fmt: skip


def build_torch(config: dict, dtype):
    """The diffusers UNet built directly in ``dtype`` (random init), in eval mode."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = UNet2DConditionModel(**config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def convert_streaming(model, cfg) -> dict:
    """The jaxdiff params of ``model``, converted one tensor at a time (no full numpy copy)."""
    import ml_dtypes
    import torch
    from flax.traverse_util import flatten_dict, unflatten_dict

    from jaxdiff.convert.torch_io import torch_key, torch_to_flax
    from jaxdiff.models import unet_param_shapes

    state = model.state_dict()
    shapes = flatten_dict(unet_param_shapes(cfg))
    if set(map(torch_key, shapes)) != set(state):
        raise ValueError("the converted config's parameters differ from diffusers' state dict")
    flat = {}
    for path, spec in shapes.items():
        tensor = state[torch_key(path)].detach()
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
            raw = tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            raw = tensor.numpy()
        value = torch_to_flax(path, raw, tuple(spec.shape)).astype(spec.dtype)
        flat[path] = jnp.asarray(np.ascontiguousarray(value))
        del raw, value
    return unflatten_dict(flat)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="SDXL's shape at 1/5 width (smoke run)")
    p.add_argument("--size", type=int, default=None, help="latent side (default 64; small 32)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    args = p.parse_args(argv)
    size = args.size or (32 if args.small else 64)

    import torch

    from jaxdiff.compile_options import cpu_compiler_options
    from jaxdiff.convert import unet_config_from_diffusers
    from jaxdiff.models import UNet

    config = SMALL if args.small else SDXL_BASE
    torch_dtype = getattr(torch, args.dtype)
    jax_dtype = jnp.dtype(args.dtype)
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    model = build_torch(config, torch_dtype)
    build_s = time.perf_counter() - t0
    cfg = unet_config_from_diffusers(config, model_class="UNet2DConditionModel",
                                     dtype=jax_dtype, param_dtype=jax_dtype)
    t0 = time.perf_counter()
    params = convert_streaming(model, cfg)
    convert_s = time.perf_counter() - t0
    gc.collect()
    n_params = sum(p.numel() for p in model.parameters())

    rng = np.random.default_rng(0)
    b = args.batch
    x = rng.standard_normal((b, 4, size, size)).astype(np.float32)
    t = np.full((b,), 500)
    ctx = rng.standard_normal((b, 77, config["cross_attention_dim"])).astype(np.float32)
    pooled_dim = (config["projection_class_embeddings_input_dim"]
                  - 6 * config["addition_time_embed_dim"])
    pooled = rng.standard_normal((b, pooled_dim)).astype(np.float32)
    px = 8 * size
    ids = np.tile(np.array([[px, px, 0, 0, px, px]], np.float32), (b, 1))

    tt = {k: torch.from_numpy(v) for k, v in dict(x=x, ctx=ctx, pooled=pooled, ids=ids).items()}
    tt = {k: v.to(torch_dtype) for k, v in tt.items()}

    def run_torch():
        with torch.no_grad():
            return model(tt["x"], torch.from_numpy(t), encoder_hidden_states=tt["ctx"],
                         added_cond_kwargs={"text_embeds": tt["pooled"],
                                            "time_ids": tt["ids"]}).sample

    unet = UNet(cfg)
    apply = jax.jit(lambda p, x, t, ctx, add: unet.apply({"params": p}, x, t, context=ctx,
                                                          added_cond=add),
                    compiler_options=cpu_compiler_options())
    jx = jnp.asarray(x.transpose(0, 2, 3, 1), jax_dtype)
    jargs = (jx, jnp.asarray(t), jnp.asarray(ctx, jax_dtype),
             {"text_embeds": jnp.asarray(pooled, jax_dtype), "time_ids": jnp.asarray(ids)})

    def run_jax():
        return apply(params, *jargs)

    t0 = time.perf_counter()
    out = jax.block_until_ready(run_jax())
    compile_s = time.perf_counter() - t0
    ref = run_torch().float().numpy().transpose(0, 2, 3, 1)
    out = np.asarray(out.astype(jnp.float32))
    diff = float(np.abs(out - ref).max())
    rel = diff / float(np.abs(ref).max())
    peak_gb = (rss_bytes() - rss0) / 2**30

    times = alternate({"diffusers": run_torch, "jaxdiff": run_jax}, reps=args.reps, warmup=1)
    what = "SDXL base UNet" if not args.small else "SDXL-shaped UNet at 1/5 width (--small)"
    print(f"machine: {machine()}; torch threads {torch.get_num_threads()}")
    print(f"model: {what}, {n_params / 1e9:.3f}B params, {args.dtype} weights and compute; "
          f"latent {size}x{size} ({px} px), batch {b}; median of {args.reps} after 1 warm-up")
    print("| side | median s | vs diffusers |")
    print("|---|---:|---:|")
    for name in ("diffusers", "jaxdiff"):
        print(f"| {name} | {times[name]:.3f} | {times['diffusers'] / times[name]:.2f}x |")
    print(f"diffusers build {build_s:.1f} s; conversion {convert_s:.1f} s; jaxdiff first call "
          f"(compile + run) {compile_s:.1f} s; resident memory growth {peak_gb:.1f} GiB")
    print(f"max |jaxdiff - diffusers| {diff:.3g}; relative to max |diffusers| {rel:.3g}")


if __name__ == "__main__":
    main()
