"""Sample a trained class-conditional MNIST model from its workdir (EMA params of the latest
checkpoint), with DDIM or DDPM and classifier-free guidance; the batch is sharded over all devices.

    python -m experiments.sample --workdir runs/mnist --num_samples 64 --sampler ddim --steps 50 \
        --guidance_scale 2.0 --labels 0,1,2 --out samples.png

Writes ``out`` (a PNG grid, one row per run of ``--labels``' cycle) and ``out`` with ``.npz``
holding ``images [N, 28, 28, 1]`` in ``[-1, 1]`` and ``labels [N]``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments.images import save_grid
from jaxdiff.compile_options import cpu_compiler_options

__all__ = ["make_sample_fn", "sample_images", "load_run", "main"]


def make_sample_fn(model, schedule, mesh, *, sampler: str, num_steps: int, guidance_scale: float,
                   null_label: int, prediction_type: str = "eps", eta: float = 0.0,
                   clip_x0: Optional[float] = 1.0, ddim_clip: str = "consistent") -> Callable:
    """Jitted ``(variables, labels [N] int32, key) -> images [N, H, W, C]``.

    The work is sharded over the mesh's ``data`` axis; the (small) output is replicated, so every
    process can read all of it, also when the mesh spans several hosts. ``N`` must be a multiple of
    the mesh size (see :func:`sample_images`, which pads). ``ddim_clip``: with ``clip_x0``, DDIM
    re-derives eps from the clipped x0 (``"consistent"``) or keeps the model's eps as diffusers'
    ``DDIMScheduler`` does by default (``"diffusers"``).
    """
    from jaxdiff.samplers import classifier_free_guidance, ddim_sample, ddpm_sample
    from jaxdiff.training import batch_sharding, replicated_sharding

    if ddim_clip not in ("consistent", "diffusers"):
        raise ValueError(f"ddim_clip must be 'consistent' or 'diffusers', got {ddim_clip!r}")
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
    shape = (28, 28, model.config.in_channels)

    def fn(variables, labels, key):
        def model_fn(x, t, c):
            return model.apply(variables, x, t, labels=c, train=False)

        guided = classifier_free_guidance(model_fn, labels, jnp.full_like(labels, null_label),
                                          guidance_scale)
        k_init, k_sample = jax.random.split(key)
        x_T = jax.random.normal(k_init, (labels.shape[0],) + shape, jnp.float32)
        x_T = jax.lax.with_sharding_constraint(x_T, batch_sharding(mesh))
        if sampler == "ddim":
            # With clipping, eps is re-derived from the clipped x0 (use_clipped_model_output).
            # diffusers' default (clip x0, keep the raw eps; ddim_clip="diffusers") mixes two
            # inconsistent predictions: on this cosine schedule, whose early x0 predictions lie
            # far outside [-1, 1], samples get worse as steps grow (compare with
            # `python -m experiments.eval_sweep --ddim_clip diffusers`; README, Results).
            return ddim_sample(guided, schedule, x_T, k_sample, num_steps=num_steps, eta=eta,
                               prediction_type=prediction_type, clip_x0=clip_x0,
                               use_clipped_model_output=(clip_x0 is not None
                                                         and ddim_clip == "consistent"))
        return ddpm_sample(guided, schedule, x_T, k_sample, num_steps=num_steps,
                           prediction_type=prediction_type, clip_x0=clip_x0)

    repl, data = replicated_sharding(mesh), batch_sharding(mesh)
    return jax.jit(fn, in_shardings=(repl, data, repl), out_shardings=repl,
                   compiler_options=cpu_compiler_options())


def sample_images(sample_fn, variables, labels: Sequence[int], key, mesh) -> np.ndarray:
    """Runs ``sample_fn`` on ``labels`` padded to a multiple of the device count; numpy [N,H,W,C].

    Every process passes the same ``labels`` and gets all the images; each process puts its own
    contiguous share of the labels on its devices (:func:`jaxdiff.training.shard_batch`).
    """
    from jaxdiff.training import shard_batch

    labels = np.asarray(labels, np.int32)
    n, d = len(labels), mesh.devices.size
    padded = np.concatenate([labels, np.zeros((-n) % d, np.int32)])
    share = len(padded) // jax.process_count()
    local = padded[jax.process_index() * share:(jax.process_index() + 1) * share]
    out = sample_fn(variables, shard_batch({"label": local}, mesh)["label"], key)
    return np.asarray(jax.device_get(out))[:n]


def load_run(workdir: str):
    """(config ConfigDict, model, schedule, ema variables, mesh) from a train_mnist workdir."""
    import ml_collections

    from experiments.train_mnist import build_model, build_schedule, init_state
    from jaxdiff.training import Checkpointer, make_mesh

    cfg_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: is {workdir!r} a train_mnist workdir?")
    with open(cfg_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
    mesh = make_mesh()
    model, schedule = build_model(config), build_schedule(config)
    target, _, _ = init_state(config, model, mesh, abstract=True)  # shapes only, no compute
    # The config comes from the same workdir: only shapes and optimizer structure are compared.
    ckpt = Checkpointer(ckpt_dir, None, read_only=True)
    try:
        restored = ckpt.restore_latest(target)
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
    return config, model, schedule, restored[0].ema_params, mesh


def parse_args(argv: Sequence[str]):
    import argparse

    p = argparse.ArgumentParser(prog="python -m experiments.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True,
                   help="train_mnist workdir (holds config.json and checkpoints/)")
    p.add_argument("--num_samples", type=int, default=64)
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--guidance_scale", type=float, default=2.0, help="1 = no guidance")
    p.add_argument("--labels", default="", help="comma-separated digits, cycled (default 0-9)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.png", help="PNG grid; a .npz is written next to it")
    args = p.parse_args(argv)
    if args.num_samples <= 0 or args.steps <= 0:
        p.error("--num_samples and --steps must be positive")
    try:
        args.digits = [int(x) for x in args.labels.split(",") if x.strip()] or list(range(10))
    except ValueError:
        p.error(f"--labels must be comma-separated integers, got {args.labels!r}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> np.ndarray:
    """CLI entry point; returns the images ``[N, 28, 28, C]``."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
    digits = args.digits
    config, model, schedule, ema, mesh = load_run(args.workdir)
    if any(not 0 <= d < config.num_classes for d in digits):
        raise SystemExit(f"--labels must be in 0..{config.num_classes - 1}, got {digits}")
    labels = [digits[i % len(digits)] for i in range(args.num_samples)]
    fn = make_sample_fn(model, schedule, mesh, sampler=args.sampler, num_steps=args.steps,
                        guidance_scale=args.guidance_scale, null_label=config.num_classes,
                        prediction_type=config.diffusion.prediction_type,
                        clip_x0=config.sampling.clip_x0 or None)
    images = sample_images(fn, ema, labels, jax.random.PRNGKey(args.seed), mesh)
    if jax.process_index() == 0:
        npz = os.path.splitext(args.out)[0] + ".npz"
        save_grid(images, args.out, ncols=len(digits) if len(digits) > 1 else 8)
        np.savez(npz, images=images, labels=np.asarray(labels, np.int32))
        print(f"wrote {args.out} and {npz} ({len(labels)} samples, {args.sampler}, "
              f"{args.steps} steps, guidance {args.guidance_scale})")
    return images


if __name__ == "__main__":
    main()
