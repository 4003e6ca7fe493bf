"""Time the MNIST UNet: jaxdiff (jitted) against diffusers (PyTorch eager), same weights.

    python -m benchmarks.bench_unet --batch 128 --reps 10
    python -m benchmarks.bench_unet --batch 512 --dtype bfloat16      # on a GPU: bf16 on both sides

The model is :func:`jaxdiff.models.mnist_unet_config` (class tokens fed to cross-attention). The
PyTorch side is the equivalent diffusers ``UNet2DConditionModel`` plus an ``nn.Embedding`` for the
class tokens (``benchmarks.common.diffusers_twin``); its random weights are converted to jaxdiff,
and the two outputs are compared once as a sanity check. Forward: inference (``torch.no_grad``);
forward + backward: the gradient of an MSE loss against noise with respect to all parameters.
Timings alternate between the frameworks after warm-up and report medians; on a GPU both sides
are synchronised before the clock stops. ``--dtype bfloat16`` runs jaxdiff with bf16 compute
(float32 params) and torch under ``torch.autocast(bfloat16)``. Measures, never asserts; prints a
markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import alternate, diffusers_twin, machine, timed, torch_forward
from jaxdiff.compile_options import cpu_compiler_options


def jax_fns(cfg):
    from jaxdiff.models import UNet

    unet = UNet(cfg)

    def forward(params, x, t, labels):
        return unet.apply({"params": params}, x, t, labels=labels).astype(jnp.float32)

    def loss(params, x, noise, t, labels):
        return jnp.mean((forward(params, x, t, labels) - noise) ** 2)

    opts = cpu_compiler_options()
    return (jax.jit(forward, compiler_options=opts),
            jax.jit(jax.grad(loss), compiler_options=opts))


def torch_fns(model, emb, cfg, autocast_dtype):
    import torch

    forward = torch_forward(model, emb, cfg, autocast_dtype)

    def fwd(x, noise, t, labels):
        with torch.no_grad():
            return forward(x, t, labels)

    def fwd_bwd(x, noise, t, labels):
        model.zero_grad(set_to_none=True)
        if emb is not None:
            emb.zero_grad(set_to_none=True)
        loss = ((forward(x, t, labels) - noise) ** 2).mean()
        loss.backward()
        return loss

    return fwd, fwd_bwd


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute dtype of both sides (params stay float32)")
    parser.add_argument("--torch_device", default=None,
                        help="cpu or cuda (default: cuda when torch sees a GPU)")
    args = parser.parse_args(argv)

    import diffusers
    import flax
    import torch

    from jaxdiff.models import mnist_unet_config

    device = args.torch_device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = mnist_unet_config()
    model, emb, params = diffusers_twin(cfg)
    model = model.to(device).train(False)
    emb = emb.to(device)
    bf16 = args.dtype == "bfloat16"
    if bf16:
        cfg = dataclasses.replace(cfg, dtype=jnp.bfloat16)
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    jfwd, jgrad = jax_fns(cfg)
    tfwd, tfwd_bwd = torch_fns(model, emb, cfg, torch.bfloat16 if bf16 else None)

    rng = np.random.default_rng(0)
    b = args.batch
    x = rng.standard_normal((b, cfg.in_channels, 28, 28)).astype(np.float32)  # NCHW
    noise = rng.standard_normal(x.shape).astype(np.float32)
    t = rng.integers(0, 1000, b)
    labels = rng.integers(0, cfg.num_classes + 1, b)
    tin = tuple(torch.from_numpy(a).to(device) for a in (x, noise, t, labels))
    nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))  # noqa: E731
    x, noise, t, labels = nhwc(x), nhwc(noise), jnp.asarray(t, jnp.int32), jnp.asarray(labels,
                                                                                        jnp.int32)

    compile_s = {
        "forward": timed(lambda: jfwd(params, x, t, labels)),
        "forward+backward": timed(lambda: jgrad(params, x, noise, t, labels)),
    }
    ref = tfwd(*tin).cpu().numpy().transpose(0, 2, 3, 1)
    err = float(np.abs(np.asarray(jfwd(params, x, t, labels)) - ref).max() / np.abs(ref).max())

    cases = {
        "forward": {"jaxdiff": lambda: jfwd(params, x, t, labels), "torch": lambda: tfwd(*tin)},
        "forward+backward": {"jaxdiff": lambda: jgrad(params, x, noise, t, labels),
                             "torch": lambda: tfwd_bwd(*tin)},
    }
    rows = [(name, alternate(fns, args.reps, args.warmup)) for name, fns in cases.items()]

    print(f"Machine: {machine()}; torch device {device}, threads {torch.get_num_threads()}")
    print(f"Versions: jax {jax.__version__}, flax {flax.__version__}, torch {torch.__version__}, "
          f"diffusers {diffusers.__version__}")
    print(f"Model: mnist_unet_config() ({n_params / 1e6:.2f}M params), 28x28x1, batch {b}, "
          f"{args.dtype} compute, median of {args.reps} after {args.warmup} warm-up; jax compile "
          f"{compile_s['forward']:.1f} s (forward), {compile_s['forward+backward']:.1f} s "
          f"(forward+backward); outputs agree to {err:.1e} (relative)")
    print()
    print(f"| pass | jaxdiff, jit (ms) | diffusers, torch eager on {device} (ms) | "
          f"torch / jaxdiff |")
    print("|---|---:|---:|---:|")
    for name, med in rows:
        j, tt = med["jaxdiff"], med["torch"]
        print(f"| {name} | {j * 1e3:.1f} | {tt * 1e3:.1f} | {tt / j:.2f}x |")


if __name__ == "__main__":
    main()
