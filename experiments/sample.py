"""Sample a trained class-conditional MNIST model from its workdir (EMA params of the latest
checkpoint), with DDIM or DDPM and classifier-free guidance; the batch is sharded over all devices.

    python -m experiments.sample --workdir runs/mnist --num_samples 64 --sampler ddim --steps 50 \
        --guidance_scale 2.0 --labels 0,1,2 --out samples.png

Writes ``out`` (a PNG grid, one row per run of ``--labels``' cycle) and ``out`` with ``.npz`` holding
``images [N, 28, 28, 1]`` in ``[-1, 1]`` and ``labels [N]``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.images import save_grid

__all__ = ["make_sample_fn", "sample_images", "load_run", "main"]


def make_sample_fn(model, schedule, mesh, *, sampler: str, num_steps: int, guidance_scale: float,
                   null_label: int, prediction_type: str = "eps", eta: float = 0.0,
                   clip_x0: Optional[float] = 1.0) -> Callable:
    """Jitted ``(variables, labels [N] int32, key) -> images [N, H, W, C]``, batch sharded over mesh.

    ``N`` must be a multiple of the mesh size (see :func:`sample_images`, which pads).
    """
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxdiff.samplers import classifier_free_guidance, ddim_sample, ddpm_sample

    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
    shape = (model.config.sample_size, model.config.sample_size, model.config.in_channels) \
        if hasattr(model.config, "sample_size") else (28, 28, 1)

    def fn(variables, labels, key):
        def model_fn(x, t, c):
            return model.apply(variables, x, t, labels=c, train=False)

        guided = classifier_free_guidance(model_fn, labels, jnp.full_like(labels, null_label),
                                          guidance_scale)
        k_init, k_sample = jax.random.split(key)
        x_T = jax.random.normal(k_init, (labels.shape[0],) + shape, jnp.float32)
        x_T = jax.lax.with_sharding_constraint(x_T, NamedSharding(mesh, P("data")))
        if sampler == "ddim":
            return ddim_sample(guided, schedule, x_T, k_sample, num_steps=num_steps, eta=eta,
                               prediction_type=prediction_type, clip_x0=clip_x0)
        return ddpm_sample(guided, schedule, x_T, k_sample, num_steps=num_steps,
                           prediction_type=prediction_type, clip_x0=clip_x0)

    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(fn, in_shardings=(repl, data, repl), out_shardings=data)


def sample_images(sample_fn, variables, labels: Sequence[int], key, mesh) -> np.ndarray:
    """Runs ``sample_fn`` on ``labels`` padded to a multiple of the device count; numpy [N,H,W,C]."""
    labels = np.asarray(labels, np.int32)
    n, d = len(labels), mesh.devices.size
    padded = np.concatenate([labels, np.zeros((-n) % d, np.int32)])
    out = sample_fn(variables, jax.device_put(padded, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec("data"))), key)
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
    mesh = make_mesh()
    model, schedule = build_model(config), build_schedule(config)
    state, _, _ = init_state(config, model, mesh)
    from experiments.train_mnist import compat_config
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), compat_config(config))
    restored = ckpt.restore_latest(state)
    ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
    return config, model, schedule, restored[0].ema_params, mesh


flags.DEFINE_string("workdir", None, "train_mnist workdir (holds config.json and checkpoints/).")
flags.DEFINE_integer("num_samples", 64, "Number of images.")
flags.DEFINE_enum("sampler", "ddim", ["ddim", "ddpm"], "Sampler.")
flags.DEFINE_integer("steps", 50, "Sampling steps.")
flags.DEFINE_float("guidance_scale", 2.0, "Classifier-free guidance scale (1 = no guidance).")
flags.DEFINE_string("labels", "", "Comma-separated digits, cycled (default 0-9).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("out", "samples.png", "Output PNG (a .npz is written next to it).")


def main(argv):
    del argv
    F = flags.FLAGS
    if not F.workdir:
        raise app.UsageError("--workdir is required")
    if F.num_samples <= 0 or F.steps <= 0:
        raise app.UsageError("--num_samples and --steps must be positive")
    digits = [int(s) for s in F.labels.split(",") if s.strip()] if F.labels else list(range(10))
    config, model, schedule, ema, mesh = load_run(F.workdir)
    if any(not 0 <= d < config.num_classes for d in digits):
        raise app.UsageError(f"--labels must be in 0..{config.num_classes - 1}")
    labels = [digits[i % len(digits)] for i in range(F.num_samples)]
    fn = make_sample_fn(model, schedule, mesh, sampler=F.sampler, num_steps=F.steps,
                        guidance_scale=F.guidance_scale, null_label=config.num_classes,
                        prediction_type=config.diffusion.prediction_type,
                        clip_x0=config.sampling.clip_x0 or None)
    images = sample_images(fn, ema, labels, jax.random.PRNGKey(F.seed), mesh)
    if jax.process_index() == 0:
        save_grid(images, F.out, ncols=len(digits) if len(digits) > 1 else 8)
        np.savez(os.path.splitext(F.out)[0] + ".npz", images=images, labels=np.asarray(labels))
        print(f"wrote {F.out} and {os.path.splitext(F.out)[0]}.npz ({len(labels)} samples)")


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    app.run(main)
