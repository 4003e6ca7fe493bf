"""XLA:CPU's default compilation against :func:`jaxdiff.cpu_compiler_options` on the UNets:
forward and forward+backward, both compiled in this one process, alternating after warm-up,
medians and the speed-up. Measures, never asserts.

    python -m benchmarks.bench_cpu_options                  # both MNIST UNets, batch 128
    python -m benchmarks.bench_cpu_options --models cpu --batch 32 --reps 10

The outputs of the two compilations are compared once (they differ only by float32 rounding).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_vs_torch import jaxdiff_config
from benchmarks.common import alternate, machine
from jaxdiff.compile_options import CPU_COMPILER_OPTIONS, cpu_compiler_options


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="cpu,preset", help="comma-separated: cpu, preset")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args(argv)

    from jaxdiff.models import UNet, init_unet

    opts = cpu_compiler_options()
    if not opts:
        raise SystemExit("cpu_compiler_options() is empty here (not a CPU backend, an XLA without "
                         "the option, or switched off): nothing to compare")
    rows = []
    for which in [m.strip() for m in args.models.split(",") if m.strip()]:
        cfg = jaxdiff_config(which)
        unet, params = UNet(cfg), init_unet(cfg, jax.random.key(0))
        n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
        rng = np.random.default_rng(0)
        b = args.batch
        x = jnp.asarray(rng.standard_normal((b, 28, 28, cfg.in_channels)), jnp.float32)
        t = jnp.asarray(rng.integers(0, 1000, b), jnp.int32)
        labels = jnp.asarray(rng.integers(0, (cfg.num_classes or 0) + 1, b), jnp.int32)

        def forward(p):
            return unet.apply({"params": p}, x, t, labels=labels)

        def grad(p):
            return jax.grad(lambda q: jnp.mean(forward(q) ** 2))(p)

        for name, fn in (("forward", forward), ("forward+backward", grad)):
            default = jax.jit(fn)
            tuned = jax.jit(fn, compiler_options=opts)
            a, c = jax.tree.leaves(default(params)), jax.tree.leaves(tuned(params))
            err = max(float(jnp.abs(u - v).max() / (jnp.abs(u).max() + 1e-30))
                      for u, v in zip(a, c))
            med = alternate({"default": lambda: default(params), "tuned": lambda: tuned(params)},
                            args.reps, args.warmup)
            rows.append((f"{which} ({n_params / 1e6:.2f}M)", name, med["default"], med["tuned"],
                         err))

    print(f"Machine: {machine()}; jax {jax.__version__}")
    print(f"Options: {', '.join(f'{k}={v}' for k, v in CPU_COMPILER_OPTIONS.items())}; batch "
          f"{args.batch}, median of {args.reps} after {args.warmup} warm-up, alternating")
    print()
    print("| model | pass | XLA default (ms) | cpu_compiler_options (ms) | speed-up | "
          "max rel. diff |")
    print("|---|---|---:|---:|---:|---:|")
    for model, name, d, tt, err in rows:
        print(f"| {model} | {name} | {d * 1e3:.0f} | {tt * 1e3:.0f} | {d / tt:.2f}x | "
              f"{err:.1e} |")


if __name__ == "__main__":
    main()
