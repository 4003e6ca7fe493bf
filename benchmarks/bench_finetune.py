"""Fine-tuning a Stable Diffusion: jaxdiff against diffusers + peft (PyTorch) on the same tiny
model, per step: full fine-tuning, LoRA, cached encodings, gradient checkpointing (remat).

    python -m benchmarks.bench_finetune                        # the default tiny SD, batch 4
    python -m benchmarks.bench_finetune --resolution 128 --unet_channels 64,128 --batch 8
    python -m benchmarks.bench_finetune --rows lora,lora_cache --reps 10
    python -m benchmarks.bench_finetune --cpus 1               # one core, one torch thread

Both sides run in this one process, alternating after warm-up (``benchmarks.common.alternate``);
the table reports median step times, their ratio and memory. Measures, never asserts.

- **Model**: a random tiny SD 1.x folder (``jaxdiff.pipelines.tiny.write_tiny_stable_diffusion``
  with ``--unet_channels`` / ``--vae_channels`` / ``--text_width`` / ``--text_layers``), loaded by
  jaxdiff (``load_stable_diffusion``) and by diffusers / transformers
  (``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextModel`` ``.from_pretrained``): the same
  weights. Inputs: ``--batch`` random images ``--resolution`` square in ``[-1, 1]`` and random
  token ids, the same on both sides. float32 throughout.
- **Step** (both sides): the frozen VAE encodes the images (a posterior sample, times the scaling
  factor) and the frozen text encoder embeds the captions inside the step, unless cached; uniform
  timesteps and Gaussian noise; eps-MSE of the UNet; gradient; global-norm clipping to 1; AdamW
  (lr 1e-4, weight decay 1e-2); an EMA of the trainable weights (decay warm-up
  ``(1 + step) / (10 + step)``, up to 0.9999). jaxdiff's step is the one
  ``jaxdiff.training.fit`` runs (``build_finetune_task`` + ``make_train_step`` with
  ``frozen=``), whose EMA is built in; the PyTorch side therefore updates diffusers'
  ``EMAModel`` (``foreach=True``) over its trainable parameters too, as ``train_text_to_image``
  does with ``--use_ema`` (``--no_torch_ema`` leaves it out, as diffusers' LoRA script does: then
  jaxdiff carries one extra pass over the trainable weights). jaxdiff also computes the gradient
  norm and keeps the old state on a non-finite loss (a few elementwise passes).
- **Rows** (``--rows``): ``full`` (the whole UNet trains), ``lora`` (rank ``--rank``, alpha =
  rank, on the UNet attention projections ``to_q, to_k, to_v, to_out.0``; PyTorch:
  ``unet.add_adapter(peft.LoraConfig(...))``, the base weights ``requires_grad=False``, AdamW
  over the LoRA parameters only, as diffusers' ``train_text_to_image_lora``), each also with
  ``_cache`` (the VAE posterior's mean / std and the text embeddings computed once beforehand:
  jaxdiff ``FinetuneConfig(cache=True)`` through ``cache_examples``, PyTorch the same with its own
  encoders; each step still samples ``mean + std * eps``) and ``_remat`` (jaxdiff
  ``FinetuneConfig(remat=True)``, i.e. ``UNetConfig.remat``; PyTorch
  ``unet.enable_gradient_checkpointing()``).
- **Memory**: for jaxdiff XLA's ``memory_analysis()`` of the compiled step: temporaries, and
  temporaries + outputs (the new train state, aliased to the donated input); for both sides the
  peak resident-set growth over one step after warm-up and glibc's ``malloc_trim(0)`` (sampled
  every 2 ms; weights, optimizer state and EMA allocated beforehand are not counted).
- **Threads**: by default both sides use every CPU (torch its default thread count). On a
  machine that other processes keep busy, torch's OpenMP threads wait for each other at every
  operator (a tiny model runs thousands of small ones), which can slow its step by an order of
  magnitude; ``--cpus 1`` pins the process to one CPU and runs torch on one thread, so that both
  sides compute on one core and the comparison survives a loaded machine.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import tempfile
import time

import jax
import numpy as np

from benchmarks.common import alternate, machine, peak_rss_growth

ROWS = ("full", "full_remat", "full_cache", "lora", "lora_cache", "lora_remat")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LR, WEIGHT_DECAY, CLIP, EMA_DECAY = 1e-4, 1e-2, 1.0, 0.9999


def _ints(text: str) -> tuple:
    return tuple(int(v) for v in text.split(","))


def peak_growth_trimmed(fn) -> int:
    """:func:`benchmarks.common.peak_rss_growth` of ``fn`` after glibc's ``malloc_trim(0)``:
    memory that an earlier step freed but malloc kept (torch's CPU tensors come from malloc)
    would otherwise be reused without growing the resident set, hiding the step's peak."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: measure as it is
        pass
    return peak_rss_growth(fn)


def _count(tree) -> int:
    return sum(int(np.prod(np.shape(a))) for a in jax.tree.leaves(tree))


# --------------------------------------------------------------------------- jaxdiff


def jaxdiff_side(sd, examples, row: str, batch: int, rank: int,
                 compute_dtype: str = "float32"):
    """``(run, info)``: ``run()`` one train step (the state kept across calls); ``info``:
    compile seconds, XLA temp / output bytes, trainable parameter count. ``compute_dtype``:
    ``FinetuneConfig.compute_dtype`` (this script's table: float32)."""
    from jaxdiff.finetune import FinetuneConfig, build_finetune_task
    from jaxdiff.sharding import make_mesh, shard_batch
    from jaxdiff.training import (OptimizerConfig, make_optimizer, make_train_step,
                                  new_train_state, place_frozen)

    mode = row.split("_")[0]
    cfg = FinetuneConfig(mode=mode, rank=rank, alpha=float(rank), remat=row.endswith("_remat"),
                         cache=row.endswith("_cache"), compute_dtype=compute_dtype)
    task = build_finetune_task(sd, cfg, examples, batch_size=batch, seed=0)
    mesh = make_mesh()
    tx, _ = make_optimizer(OptimizerConfig(learning_rate=LR, warmup_steps=0, schedule="constant",
                                           weight_decay=WEIGHT_DECAY, grad_clip_norm=CLIP))
    params = task.init_params(False)
    state = [new_train_state(params, tx, task.key, mesh)]
    frozen = place_frozen(task.frozen, mesh)
    step = make_train_step(task.loss_fn, tx, mesh, ema_decay=EMA_DECAY, frozen=frozen)
    data = shard_batch(next(task.data(None)), mesh)
    t0 = time.perf_counter()
    compiled = step.jitted.lower(state[0], data, frozen).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp = float(getattr(mem, "temp_size_in_bytes", np.nan)) if mem is not None else np.nan
    out = float(getattr(mem, "output_size_in_bytes", np.nan)) if mem is not None else np.nan

    def run():
        state[0], metrics = compiled(state[0], data, frozen)
        return metrics["loss"]

    return run, {"compile_s": compile_s, "temp": temp, "output": out,
                 "trainable": _count(params)}


# --------------------------------------------------------------------------- PyTorch


def torch_side(folder, examples, row: str, batch: int, rank: int, ema: bool):
    """``(run, info)`` of the diffusers + peft step (module docstring)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet"))
    vae = AutoencoderKL.from_pretrained(os.path.join(folder, "vae"))
    text = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder"))
    sched = DDPMScheduler.from_pretrained(os.path.join(folder, "scheduler"))
    vae.requires_grad_(False)
    text.requires_grad_(False)
    vae.eval()
    text.eval()
    if row.startswith("lora"):
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                    target_modules=LORA_TARGETS))
    if row.endswith("_remat"):
        unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    averager = EMAModel(params, decay=EMA_DECAY, foreach=True) if ema else None
    pixels = torch.from_numpy(
        np.ascontiguousarray(examples["pixel_values"][:batch].transpose(0, 3, 1, 2)))
    ids = torch.from_numpy(examples["input_ids"][:batch].astype(np.int64))
    scale = vae.config.scaling_factor
    cached = None
    if row.endswith("_cache"):
        with torch.no_grad():
            dist = vae.encode(pixels).latent_dist
            cached = (dist.mean, dist.std, text(ids)[0])
    T = sched.config.num_train_timesteps

    def run():
        with torch.no_grad():
            if cached is None:
                latents = vae.encode(pixels).latent_dist.sample() * scale
                context = text(ids)[0]
            else:
                mean, std, context = cached
                latents = (mean + std * torch.randn_like(mean)) * scale
        noise = torch.randn_like(latents)
        t = torch.randint(0, T, (latents.shape[0],))
        noisy = sched.add_noise(latents, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=context).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if averager is not None:
            averager.step(params)
        return loss.detach()

    return run, {"trainable": sum(p.numel() for p in params)}


# --------------------------------------------------------------------------- main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {ROWS}")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--resolution", type=int, default=64, help="image side (pixels)")
    p.add_argument("--unet_channels", type=_ints, default=(32, 64))
    p.add_argument("--vae_channels", type=_ints, default=(16, 32))
    p.add_argument("--text_width", type=int, default=64)
    p.add_argument("--text_layers", type=int, default=2)
    p.add_argument("--max_length", type=int, default=16, help="caption tokens")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank (alpha = rank)")
    p.add_argument("--reps", type=int, default=5, help="timed steps per side and row")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--cpus", type=int, default=None,
                   help="pin the process to this many of its CPUs and give torch as many "
                        "threads (default: all CPUs, torch's default thread count)")
    p.add_argument("--no_torch_ema", action="store_true",
                   help="no EMA on the PyTorch side (jaxdiff's step always has one)")
    args = p.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        p.error(f"--rows: unknown {bad}; choose from {ROWS}")

    if args.cpus is not None:  # before JAX starts its thread pool: its threads inherit this
        allowed = sorted(os.sched_getaffinity(0))
        if not 1 <= args.cpus <= len(allowed):
            p.error(f"--cpus must be in 1..{len(allowed)}, got {args.cpus}")
        os.sched_setaffinity(0, allowed[:args.cpus])

    import diffusers
    import flax
    import peft
    import torch

    if args.cpus is not None:
        torch.set_num_threads(args.cpus)

    from jaxdiff.pipelines import load_stable_diffusion
    from jaxdiff.pipelines.tiny import write_tiny_stable_diffusion

    load_start = os.getloadavg()
    cpus = sorted(os.sched_getaffinity(0))
    pinned = "" if args.cpus is None else f"; process pinned to CPUs {cpus}"
    print(f"Machine: {machine()}; torch threads {torch.get_num_threads()}{pinned}")
    print(f"Versions: jax {jax.__version__}, flax {flax.__version__}, torch {torch.__version__}, "
          f"diffusers {diffusers.__version__}, peft {peft.__version__}")
    with tempfile.TemporaryDirectory() as folder:
        write_tiny_stable_diffusion(folder, unet_channels=args.unet_channels,
                                    vae_channels=args.vae_channels, text_width=args.text_width,
                                    text_layers=args.text_layers, max_length=args.max_length,
                                    image_size=args.resolution)
        sd = load_stable_diffusion(folder)
        rng = np.random.default_rng(0)
        B, R = args.batch, args.resolution
        examples = {
            "pixel_values": rng.uniform(-1, 1, (B, R, R, 3)).astype(np.float32),
            "input_ids": rng.integers(0, sd.text_config.vocab_size,
                                      (B, args.max_length)).astype(np.int32),
        }
        f = sd.vae_scale_factor
        n = {k: _count(v) / 1e6 for k, v in sd.params.items()}
        print(f"Model: tiny SD 1.x, UNet {args.unet_channels} ({n['unet']:.2f}M params), VAE "
              f"{args.vae_channels} ({n['vae']:.2f}M), CLIP text width {args.text_width} x "
              f"{args.text_layers} layers "
              f"({n['text_encoder']:.2f}M), float32; batch {B}, "
              f"{R}x{R} images (latents {R // f}x{R // f}), {args.max_length} tokens; LoRA rank "
              f"{args.rank}; torch EMA {'off' if args.no_torch_ema else 'on'}")
        print()
        results = []
        for row in rows:
            jrun, jinfo = jaxdiff_side(sd, examples, row, B, args.rank)
            trun, tinfo = torch_side(folder, examples, row, B, args.rank, not args.no_torch_ema)
            times = alternate({"jax": jrun, "torch": trun}, args.reps, args.warmup)
            jrss, trss = peak_growth_trimmed(jrun), peak_growth_trimmed(trun)
            results.append((row, times, jinfo, tinfo, jrss, trss))
            del jrun, trun
            gc.collect()
    load_end = os.getloadavg()

    mib = lambda b: "n/a" if b != b else f"{b / 2**20:.1f}"  # noqa: E731
    print(f"Median of {args.reps} steps per side after {args.warmup} warm-up, sides alternating. "
          "Memory in MiB: XLA = the compiled jaxdiff step's memory_analysis(); RSS = peak "
          "resident-set growth over one step.")
    print()
    print("| row | trainable params (jaxdiff / torch) | jaxdiff ms | torch ms | jaxdiff / torch "
          "time | jaxdiff XLA temp | jaxdiff XLA temp+output | jaxdiff RSS growth | torch RSS "
          "growth | jaxdiff compile s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row, times, jinfo, tinfo, jrss, trss in results:
        print(f"| {row} | {jinfo['trainable']:,} / {tinfo['trainable']:,} | "
              f"{times['jax'] * 1e3:.1f} | {times['torch'] * 1e3:.1f} | "
              f"{times['jax'] / times['torch']:.2f} | {mib(jinfo['temp'])} | "
              f"{mib(jinfo['temp'] + jinfo['output'])} | {mib(jrss)} | {mib(trss)} | "
              f"{jinfo['compile_s']:.1f} |")
    print()
    print(f"Load average (1, 5, 15 min): at start {', '.join(f'{v:.1f}' for v in load_start)}; "
          f"at end {', '.join(f'{v:.1f}' for v in load_end)} ({os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
