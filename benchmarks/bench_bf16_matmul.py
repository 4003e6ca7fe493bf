"""Why bfloat16 is slower than float32 in jaxdiff on a CPU: the throughput of one matrix multiply
and one 3x3 convolution in each dtype, in JAX (XLA:CPU, as jaxdiff compiles) and in torch (eager,
its oneDNN kernels), on this machine. Measures, never asserts.

    python -m benchmarks.bench_bf16_matmul               # SDXL-sized shapes
    python -m benchmarks.bench_bf16_matmul --reps 10

- **Shapes**: the SDXL UNet's commonest: a ``[4096, 640] x [640, 640]`` matmul (an attention
  projection at a 64x64 latent's second level, tokens x width) and a 3x3 convolution of a
  ``[1, 32, 32, 1280]`` feature map to 1280 channels (the third level's ResNet convolution); each
  also at 4x the rows / batch.
- **Timing**: one warm-up, then the median of ``--reps`` calls, the sides alternating; GFLOP/s
  counts a multiply-add as 2 FLOPs. JAX runs each op under ``jax.jit`` with jaxdiff's CPU
  compiler options; torch under ``torch.no_grad`` with its default threads, NCHW for the
  convolution.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import alternate, machine

MATMULS = ((4096, 640, 640), (16384, 640, 640))
CONVS = ((1, 32, 1280, 1280), (4, 32, 1280, 1280))   # batch, side, in, out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    import torch

    from jaxdiff.compile_options import cpu_compiler_options

    opts = cpu_compiler_options()
    rng = np.random.default_rng(0)
    print(f"machine: {machine()}; torch threads {torch.get_num_threads()}")
    print("| op | shape | dtype | JAX GFLOP/s | torch GFLOP/s | JAX vs torch |")
    print("|---|---|---|---:|---:|---:|")
    cases = [("matmul", s) for s in MATMULS] + [("conv3x3", s) for s in CONVS]
    for op, shape in cases:
        for dtype in ("float32", "bfloat16"):
            jd, td = jnp.dtype(dtype), getattr(torch, dtype)
            if op == "matmul":
                m, k, n = shape
                a = rng.standard_normal((m, k)).astype(np.float32)
                b = rng.standard_normal((k, n)).astype(np.float32)
                flops = 2.0 * m * k * n
                ja, jb = jnp.asarray(a, jd), jnp.asarray(b, jd)
                f = jax.jit(jnp.matmul, compiler_options=opts)
                ta, tb = torch.from_numpy(a).to(td), torch.from_numpy(b).to(td)

                def run_torch(ta=ta, tb=tb):
                    with torch.no_grad():
                        return ta @ tb

                def run_jax(f=f, ja=ja, jb=jb):
                    return jax.block_until_ready(f(ja, jb))
                label = f"[{m}, {k}] x [{k}, {n}]"
            else:
                bsz, side, cin, cout = shape
                x = rng.standard_normal((bsz, side, side, cin)).astype(np.float32)
                w = (rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
                flops = 2.0 * bsz * side * side * cin * cout * 9
                jx, jw = jnp.asarray(x, jd), jnp.asarray(w, jd)
                f = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
                    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")),
                    compiler_options=opts)
                tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(td)
                tw = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).to(td)

                def run_torch(tx=tx, tw=tw):
                    with torch.no_grad():
                        return torch.nn.functional.conv2d(tx, tw, padding=1)

                def run_jax(f=f, jx=jx, jw=jw):
                    return jax.block_until_ready(f(jx, jw))
                label = f"{bsz}x{side}x{side}x{cin} -> {cout}"
            times = alternate({"jax": run_jax, "torch": run_torch}, reps=args.reps, warmup=1)
            gj, gt = flops / times["jax"] / 1e9, flops / times["torch"] / 1e9
            print(f"| {op} | {label} | {dtype} | {gj:.1f} | {gt:.1f} | {gj / gt:.2f}x |")


if __name__ == "__main__":
    main()
