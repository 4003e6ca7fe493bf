"""GPU suite, part 1: the Stable Diffusion 1.5 architecture pipeline, jaxdiff (bf16, one jit)
against diffusers (fp16, eager with SDPA attention, and with ``torch.compile``), same random
weights and the same initial latents.

    python -m benchmarks.gpu_suite_sd --rows rows.jsonl --workdir /tmp/suite [--smoke]

- **Model**: :func:`write_sd_folder`: SD 1.5's architecture (UNet 320-1280, 2 resnets per level,
  8 heads, cross-attention width 768; VAE 128-512; CLIP text encoder 768 x 12 layers, vocabulary
  49408) with random weights, written by diffusers' ``save_pretrained`` on this machine (no
  download); a tiny CLIP-layout tokenizer (``jaxdiff.pipelines.tiny``), DDIM with SD's schedule.
  ``--smoke``: the tiny folder of ``write_tiny_stable_diffusion`` (32x32, 2 levels).
- **Work**: 512x512, 30 DDIM steps, guidance 7.5, batch 1 then 8 (``--smoke``: 32x32, 2 steps,
  batch 1 and 2). s/image: the median call (of 3 after the first at batch 1, of 2 at batch 8)
  over the batch; steps/s: steps over the median call (text encoder and VAE decode included,
  so a little below the UNet-only it/s of diffusers' progress bar). jaxdiff's and
  torch.compile's "compile s": the first call minus the median call (trace and compile; for
  torch.compile also the CUDA-graph capture). "vs diffusers eager": diffusers eager seconds over
  the row's (> 1: faster).
- **Same image**: from the same latents (rounded to fp16 first), the max and mean absolute
  difference of the images (``[0, 1]``; one 8-bit level is 1/255) against diffusers in float32
  (TF32 off), at batch 1. Half precision over 30 guided steps moves the image by an amount no
  formula bounds, so the yardstick is diffusers' own spread: the larger of its fp16 and its bf16
  run's difference from its float32 run (its bf16 run also decodes in bf16), per statistic.
  jaxdiff bf16 is within tolerance when its difference from float32 is at most 3x that spread
  (the 3x is margin). jaxdiff against diffusers fp16, the pair the issue names, is reported
  beside it, and at batch 8 alone.
- **Compile cache**: the jaxdiff side runs with the persistent compilation cache in
  ``WORKDIR/cache_sd_program``; when that directory started empty, its batch-1 compile time is
  kept as the cold figure of part 3 (``WORKDIR/cold_sd_program.json``).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time

import numpy as np

from benchmarks.gpu_suite_env import Recorder, fmt, median_time, part_parser

EAGER, JAX = "diffusers fp16 eager (SDPA)", "jaxdiff bf16 (one jit)"  # the rows' sides
PROMPT = "a photo of a cat"  # short: the smoke tokenizer reads 14 tokens
GUIDANCE = 7.5


def settings(smoke: bool) -> dict:
    """Image side, steps, batches and timed calls per batch of the part (and of part 3's SD
    program, its first batch)."""
    if smoke:
        return dict(size=32, steps=2, batches=(1, 2), repeats=(1, 1))
    return dict(size=512, steps=30, batches=(1, 8), repeats=(3, 2))


def write_sd_folder(path: str, smoke: bool) -> str:
    """Write the random SD 1.5-architecture folder (module docstring) at ``path`` unless its
    ``model_index.json`` is already there; returns ``path``."""
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return path
    from jaxdiff.pipelines.tiny import write_tiny_stable_diffusion, write_tiny_tokenizer

    if smoke:
        write_tiny_stable_diffusion(path)
        return path
    import diffusers
    import torch
    import transformers

    torch.manual_seed(0)
    device = torch.device("cuda") if torch.cuda.is_available() else contextlib.nullcontext()
    with device:  # random init on the GPU: seconds instead of a minute on the CPU
        unet = diffusers.UNet2DConditionModel(  # the defaults are SD 1.x's, except these
            sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = diffusers.AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = write_tiny_tokenizer(tmp, max_length=77)
        tokenizer = transformers.CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
    vocab = tokenizer.get_vocab()
    eos = vocab["<|endoftext|>"]
    with device:
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
            bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos, pad_token_id=eos))
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                    beta_end=0.012, num_train_timesteps=1000, steps_offset=1,
                                    set_alpha_to_one=False, clip_sample=False)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def sd_folder(workdir: str, smoke: bool) -> tuple:
    """``(folder, seconds spent writing it; 0 when it was there)`` under ``workdir``."""
    path = os.path.join(workdir, "sd_folder")
    t0 = time.perf_counter()
    fresh = not os.path.isfile(os.path.join(path, "model_index.json"))
    write_sd_folder(path, smoke)
    return path, (time.perf_counter() - t0) if fresh else 0.0


def latents_for(batch: int, size: int, factor: int) -> np.ndarray:
    """Standard-normal NHWC latents, float32 values that fp16 represents exactly."""
    lat = np.random.default_rng(batch).standard_normal((batch, size // factor, size // factor, 4))
    return lat.astype(np.float16).astype(np.float32)


def jaxdiff_call(sd, batch: int, cfg: dict, lat: np.ndarray):
    """``fn()`` running jaxdiff's ``generate`` once; returns its float images (numpy)."""
    from jaxdiff.pipelines import generate

    def fn():
        return generate(sd, [PROMPT] * batch, num_steps=cfg["steps"], guidance_scale=GUIDANCE,
                        latents=lat, height=cfg["size"], width=cfg["size"]).float_images
    return fn


def diffusers_call(pipe, batch: int, cfg: dict, lat: np.ndarray):
    import torch

    lat_t = torch.from_numpy(lat.transpose(0, 3, 1, 2).copy()).to(pipe.device, pipe.unet.dtype)

    def fn():
        with torch.inference_mode():
            return pipe([PROMPT] * batch, latents=lat_t, num_inference_steps=cfg["steps"],
                        guidance_scale=GUIDANCE, height=cfg["size"], width=cfg["size"],
                        output_type="np").images
    return fn


def load_diffusers(folder: str, dtype, device: str):
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype,
                                                             safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def diff(a, b) -> tuple:
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(d.max()), float(d.mean())


def main(argv=None):
    args = part_parser(__doc__.splitlines()[0]).parse_args(argv)
    import jax
    import jax.numpy as jnp
    import torch

    import jaxdiff.compile_cache
    from benchmarks.common import machine
    from jaxdiff.pipelines import load_stable_diffusion

    rec = Recorder(args.rows, "sd_pipeline")
    cfg = settings(args.smoke)
    cache = os.path.join(args.workdir, "cache_sd_program")
    cache_was_empty = not (os.path.isdir(cache) and os.listdir(cache))
    jaxdiff.compile_cache.enable(cache)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    half = torch.float16
    print(f"machine: {machine()}; torch device {device}", flush=True)
    folder, write_s = sd_folder(args.workdir, args.smoke)
    sd = load_stable_diffusion(folder, dtype=jnp.bfloat16)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(sd.params))
    print(f"model: SD 1.5 architecture{' (smoke: tiny)' if args.smoke else ''}, random weights, "
          f"{n_params / 1e6:.1f}M params; {cfg['size']}x{cfg['size']}, DDIM {cfg['steps']} "
          f"steps, guidance {GUIDANCE}; folder written in {write_s:.1f} s; "
          f"median of {' / '.join(map(str, cfg['repeats']))} calls after the first (batch "
          f"{' / '.join(map(str, cfg['batches']))})", flush=True)
    header = ("\n| batch | side | s/image | steps/s | compile s | vs diffusers eager |\n"
              "|---|---|---:|---:|---:|---:|")
    print(header, flush=True)
    pipe = load_diffusers(folder, half, device)
    eager_unet = pipe.unet
    images = {}

    def timed_row(batch, side, fn, compiled_first: bool, eager_s=None):
        first, med, out = median_time(fn, cfg["repeats"][cfg["batches"].index(batch)])
        images[(side, batch)] = out
        compile_s = first - med if compiled_first else None
        ratio = (eager_s / med) if eager_s else 1.0
        print(f"| {batch} | {side} | {med / batch:.4f} | {cfg['steps'] / med:.1f} | "
              f"{fmt(compile_s, '.1f')} | {ratio:.2f}x |", flush=True)
        return rec.row(batch=batch, side=side, s_per_image=med / batch, call_s=med,
                       steps_per_s=cfg["steps"] / med, compile_s=compile_s,
                       ratio_vs_eager=ratio)

    for batch in cfg["batches"]:
        lat = latents_for(batch, cfg["size"], sd.vae_scale_factor)
        jfn, tfn = jaxdiff_call(sd, batch, cfg, lat), diffusers_call(pipe, batch, cfg, lat)
        pipe.unet = eager_unet
        eager_s = timed_row(batch, EAGER, tfn, False)["call_s"]
        jrow = timed_row(batch, JAX, jfn, True, eager_s)
        if batch == cfg["batches"][0]:
            if cache_was_empty:  # the cold figure of part 3 (gpu_suite_compile)
                with open(os.path.join(args.workdir, "cold_sd_program.json"), "w") as f:
                    json.dump({"compile_s": jrow["compile_s"], "cache": cache, "batch": batch}, f)
            same_image_check(rec, folder, batch, cfg, lat, images, device)
        else:
            mx, mean = diff(images[(JAX, batch)], images[(EAGER, batch)])
            rec.row(kind="image_diff", batch=batch, pair="jaxdiff bf16 vs diffusers fp16",
                    max_abs=mx, mean_abs=mean)
            print(f"\nBatch {batch}: jaxdiff bf16 vs diffusers fp16: max |diff| {mx:.3g}, "
                  f"mean {mean:.3g}", flush=True)
        print(header, flush=True)
        if not cuda:
            rec.row(batch=batch, side="diffusers fp16 torch.compile", skipped=True,
                    reason="no CUDA device: torch.compile (inductor) is measured on a GPU only")
            print(f"| {batch} | diffusers fp16 torch.compile | skipped: no CUDA device | - | - "
                  "| - |", flush=True)
            continue
        pipe.unet = torch.compile(eager_unet, mode="reduce-overhead", fullgraph=True,
                                  dynamic=False)
        timed_row(batch, "diffusers fp16 torch.compile", diffusers_call(pipe, batch, cfg, lat),
                  True, eager_s)


def same_image_check(rec, folder, batch, cfg, lat, images, device):
    """The tolerance row of the module docstring (diffusers float32 and bf16 loaded here)."""
    import torch

    ref = {}
    tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        pipe = load_diffusers(folder, dtype, device)
        # the float32 reference in float32: no TF32 (cuDNN's convolutions default to it)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            ref[name] = diffusers_call(pipe, batch, cfg, lat)()
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        del pipe
        if device == "cuda":
            torch.cuda.empty_cache()
    spread = [diff(images[(EAGER, batch)], ref["fp32"]), diff(ref["bf16"], ref["fp32"])]
    jax_ref = diff(images[(JAX, batch)], ref["fp32"])
    jax_fp16 = diff(images[(JAX, batch)], images[(EAGER, batch)])
    tol = [3 * max(s[i] for s in spread) for i in (0, 1)]
    ok = jax_ref[0] <= tol[0] and jax_ref[1] <= tol[1]
    rec.row(kind="image_diff", batch=batch, pair="jaxdiff bf16 vs diffusers fp16",
            max_abs=jax_fp16[0], mean_abs=jax_fp16[1], jax_vs_fp32_max=jax_ref[0],
            jax_vs_fp32_mean=jax_ref[1], fp16_vs_fp32_max=spread[0][0],
            fp16_vs_fp32_mean=spread[0][1], bf16_vs_fp32_max=spread[1][0],
            bf16_vs_fp32_mean=spread[1][1], tolerance_max=tol[0], tolerance_mean=tol[1],
            within_tolerance=ok)
    print(f"\nSame image (batch {batch}, images in [0, 1]; max / mean absolute difference):\n"
          f"- jaxdiff bf16 vs diffusers fp16: {jax_fp16[0]:.3g} / {jax_fp16[1]:.3g}\n"
          f"- against diffusers float32: jaxdiff bf16 {jax_ref[0]:.3g} / {jax_ref[1]:.3g}; "
          f"diffusers fp16 {spread[0][0]:.3g} / {spread[0][1]:.3g}; diffusers bf16 "
          f"{spread[1][0]:.3g} / {spread[1][1]:.3g}\n"
          f"- tolerance (3x diffusers' own half-precision spread): {tol[0]:.3g} / {tol[1]:.3g}: "
          f"{'WITHIN' if ok else 'OUTSIDE'}\n", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
