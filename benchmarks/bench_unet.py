"""Time the MNIST UNet: jaxdiff (jitted) against diffusers (PyTorch eager), same weights.

    python benchmarks/bench_unet.py --batch 128 --reps 10

The model is :func:`jaxdiff.models.mnist_unet_config` (class tokens fed to cross-attention). The
PyTorch side is the equivalent diffusers ``UNet2DConditionModel`` plus an ``nn.Embedding`` for the
class tokens; its random weights are converted to jaxdiff with
:func:`jaxdiff.convert.convert_unet_state_dict`, and the two outputs are compared once as a sanity
check. Forward: inference (``torch.no_grad``); forward + backward: the gradient of an MSE loss
against noise with respect to all parameters. Timings alternate between the frameworks after
warm-up and report medians. Measures, never asserts; prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def build(batch: int, seed: int = 0):
    import torch
    from diffusers import UNet2DConditionModel

    from jaxdiff.convert import convert_unet_state_dict
    from jaxdiff.models import mnist_unet_config

    cfg = mnist_unet_config()
    torch.manual_seed(seed)
    kinds = {
        None: ("DownBlock2D", "UpBlock2D"),
        "cross": ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D"),
    }
    model = UNet2DConditionModel(
        sample_size=28, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=cfg.block_channels, layers_per_block=cfg.layers_per_block,
        down_block_types=tuple(kinds[k][0] for k in cfg.attention),
        up_block_types=tuple(kinds[k][1] for k in cfg.up_kinds[::-1]),
        mid_block_type="UNetMidBlock2DCrossAttn", attention_head_dim=cfg.num_heads,
        cross_attention_dim=cfg.context_dim, norm_num_groups=cfg.norm_groups,
    )  # fmt: skip
    tokens = torch.nn.Embedding(cfg.num_classes + 1, cfg.num_class_tokens * cfg.context_dim)
    state = {**model.state_dict(), "class_tokens.embedding.weight": tokens.weight.detach()}
    params = convert_unet_state_dict(state, cfg)

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, cfg.in_channels, 28, 28)).astype(np.float32)  # NCHW
    noise = rng.standard_normal(x.shape).astype(np.float32)
    t = rng.integers(0, 1000, batch)
    labels = rng.integers(0, cfg.num_classes + 1, batch)
    torch_inputs = tuple(torch.from_numpy(a) for a in (x, noise, t, labels))
    to_nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))  # noqa: E731
    jax_inputs = (
        to_nhwc(x), to_nhwc(noise), jnp.asarray(t, jnp.int32), jnp.asarray(labels, jnp.int32)
    )  # fmt: skip
    return cfg, params, (model, tokens), jax_inputs, torch_inputs


def jax_fns(cfg):
    from jaxdiff.models import UNet

    unet = UNet(cfg)

    def forward(params, x, t, labels):
        return unet.apply({"params": params}, x, t, labels=labels)

    def loss(params, x, noise, t, labels):
        return jnp.mean((forward(params, x, t, labels) - noise) ** 2)

    return jax.jit(forward), jax.jit(jax.grad(loss))


def torch_fns(model, tokens, cfg):
    import torch

    def forward(x, t, labels):
        ctx = tokens(labels).view(labels.shape[0], cfg.num_class_tokens, cfg.context_dim)
        return model(x, t, encoder_hidden_states=ctx).sample

    def fwd(x, noise, t, labels):
        with torch.no_grad():
            return forward(x, t, labels)

    def fwd_bwd(x, noise, t, labels):
        model.zero_grad(set_to_none=True)
        tokens.zero_grad(set_to_none=True)
        loss = ((forward(x, t, labels) - noise) ** 2).mean()
        loss.backward()
        return loss

    return fwd, fwd_bwd


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)

    import diffusers
    import flax
    import torch

    cfg, params, (model, tokens), (x, noise, t, labels), tin = build(args.batch)
    model.train(False)
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    jfwd, jgrad = jax_fns(cfg)
    tfwd, tfwd_bwd = torch_fns(model, tokens, cfg)

    compile_s = {
        "forward": timed(lambda: jfwd(params, x, t, labels)),
        "forward+backward": timed(lambda: jgrad(params, x, noise, t, labels)),
    }
    ref = tfwd(*tin).numpy().transpose(0, 2, 3, 1)
    err = float(np.abs(np.asarray(jfwd(params, x, t, labels)) - ref).max() / np.abs(ref).max())

    cases = {
        "forward": (lambda: jfwd(params, x, t, labels), lambda: tfwd(*tin)),
        "forward+backward": (lambda: jgrad(params, x, noise, t, labels), lambda: tfwd_bwd(*tin)),
    }
    rows = []
    for name, (jf, tf) in cases.items():
        for _ in range(args.warmup):
            timed(jf), timed(tf)
        jt, tt = [], []
        for _ in range(args.reps):  # alternate, so that load drifts hit both alike
            jt.append(timed(jf))
            tt.append(timed(tf))
        rows.append((name, statistics.median(jt), statistics.median(tt)))

    cpu = cpu_name()
    print(
        f"Machine: {cpu}, {os.cpu_count()} CPUs, {platform.system()}; backend "
        f"{jax.default_backend()} ({jax.devices()[0].device_kind}); torch threads "
        f"{torch.get_num_threads()}"
    )
    print(
        f"Versions: jax {jax.__version__}, flax {flax.__version__}, torch {torch.__version__}, "
        f"diffusers {diffusers.__version__}"
    )
    print(
        f"Model: mnist_unet_config() ({n_params / 1e6:.2f}M params), 28x28x1, batch {args.batch}, "
        f"median of {args.reps} after {args.warmup} warm-up; jax compile "
        f"{compile_s['forward']:.1f} s (forward), {compile_s['forward+backward']:.1f} s "
        f"(forward+backward); outputs agree to {err:.1e} (relative)"
    )
    print()
    print("| pass | jaxdiff, jit (ms) | diffusers, torch eager (ms) | torch / jaxdiff |")
    print("|---|---:|---:|---:|")
    for name, j, tt in rows:
        print(f"| {name} | {j * 1e3:.1f} | {tt * 1e3:.1f} | {tt / j:.2f}x |")


if __name__ == "__main__":
    main()
