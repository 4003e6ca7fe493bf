"""GPU suite, part 4: cuDNN attention (``jax.nn.dot_product_attention(implementation="cudnn")``)
against the XLA path in the SD 1.5-architecture UNet at 512x512 (64x64 latents), bf16.

    python -m benchmarks.gpu_suite_attention --rows rows.jsonl --workdir /tmp/suite [--smoke]

The UNet of part 1's folder (``WORKDIR/sd_folder``, written if missing), loaded in bf16; one
forward pass of a guided step's batch (2: unconditional and conditional) with a 77-token context,
jitted once per implementation (``UNetConfig.attention_implementation``: ``"xla"`` /
``"cudnn"``, same parameters). Reported: the median forward time over ``--reps`` calls after the
first (whose time minus the median is the compile), the speed-up over the XLA path, and the
largest absolute difference of the outputs (also relative to the XLA output's largest magnitude).
The cuDNN row is skipped, with the reason, where JAX runs on no CUDA GPU (``--smoke`` on a CPU
times the XLA path alone); a cuDNN failure (an unsupported shape, an old cuDNN) is recorded as
the row's error, not raised.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from benchmarks.gpu_suite_env import Recorder, median_time, part_parser


def main(argv=None):
    p = part_parser(__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=None, help="timed calls (default 10; smoke 2)")
    args = p.parse_args(argv)
    reps = args.reps or (2 if args.smoke else 10)

    import jax
    import jax.numpy as jnp

    from benchmarks.common import machine
    from benchmarks.gpu_suite_sd import sd_folder, settings
    from jaxdiff.models import UNet
    from jaxdiff.pipelines import load_stable_diffusion

    rec = Recorder(args.rows, "cudnn_attention")
    print(f"machine: {machine()}", flush=True)
    folder, _ = sd_folder(args.workdir, args.smoke)
    sd = load_stable_diffusion(folder, dtype=jnp.bfloat16)
    cfg, params = sd.unet_config, sd.params["unet"]
    side = settings(args.smoke)["size"] // sd.vae_scale_factor
    length, width = sd.text_config.max_position_embeddings, cfg.context_dim
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, side, side, cfg.in_channels)), jnp.bfloat16)
    t = jnp.asarray([500, 500], jnp.int32)
    ctx = jnp.asarray(rng.standard_normal((2, length, width)), jnp.bfloat16)
    print(f"UNet: {sum(a.size for a in jax.tree.leaves(params)) / 1e6:.1f}M params, bf16; input "
          f"[2, {side}, {side}, {cfg.in_channels}], context [2, {length}, {width}]; median of "
          f"{reps} forward calls after the first\n", flush=True)
    print("| attention | forward ms | compile s | speed-up over XLA | max abs diff | max rel diff |"
          "\n|---|---:|---:|---:|---:|---:|", flush=True)

    def forward_fn(impl):
        unet = UNet(dataclasses.replace(cfg, attention_implementation=impl))
        fwd = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, context=c))
        return lambda: fwd(params, x, t, ctx)

    xla = forward_fn("xla")
    first, med, ref = median_time(xla, reps)
    ref = np.asarray(ref, np.float32)
    rec.row(implementation="xla", forward_ms=med * 1e3, compile_s=first - med, speedup=1.0)
    print(f"| xla | {med * 1e3:.2f} | {first - med:.1f} | 1.00x | - | - |", flush=True)
    if jax.default_backend() != "gpu":
        reason = f"cuDNN attention needs a CUDA GPU; JAX's backend is {jax.default_backend()}"
        rec.row(implementation="cudnn", skipped=True, reason=reason)
        print(f"| cudnn | skipped: {reason} | | | | |", flush=True)
        return
    try:
        cudnn = forward_fn("cudnn")
        first_c, med_c, out = median_time(cudnn, reps)
        out = np.asarray(out, np.float32)
    except Exception as e:  # noqa: BLE001 - recorded: an unsupported configuration is a result
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        rec.row(implementation="cudnn", error=msg)
        print(f"| cudnn | failed: {msg} | | | | |", flush=True)
        return
    err = float(np.abs(out - ref).max())
    rel = err / float(np.abs(ref).max())
    rec.row(implementation="cudnn", forward_ms=med_c * 1e3, compile_s=first_c - med_c,
            speedup=med / med_c, max_abs_diff=err, max_rel_diff=rel)
    print(f"| cudnn | {med_c * 1e3:.2f} | {first_c - med_c:.1f} | {med / med_c:.2f}x | "
          f"{err:.3g} | {rel:.3g} |", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
