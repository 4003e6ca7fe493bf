"""GPU suite, part 2: training throughput and MFU of the ``mnist_accel`` config
(``experiments/configs/mnist_accel.py``: bf16 compute, batch 256), a fixed number of steps on
synthetic batches of MNIST's shape.

    python -m benchmarks.gpu_suite_train --rows rows.jsonl --workdir /tmp/suite [--smoke]

- **Step**: the experiments' train step (``experiments.mnist_lib`` + ``make_train_step``),
  lowered and compiled once (``lower(...).compile()``, each timed), run once, then ``--steps``
  timed steps (``--smoke``: :data:`SMOKE_MODEL_OVERRIDES`, batch 8, 3 steps).
- **FLOPs**: XLA's cost analysis of the compiled step (``compiled.cost_analysis()["flops"]``:
  forward, backward, optimizer and EMA, a multiply-add counted as 2), per device.
- **MFU** = FLOPs per step x steps/s / peak, the peak being the dense bf16 tensor-core FLOP/s of
  the detected device kind (``benchmarks.gpu_suite_env.PEAK_BF16_FLOPS``, from the vendors'
  datasheets), or ``--peak_tflops``; none on a CPU.
- **Compile cache**: run with the persistent compilation cache in ``WORKDIR/cache_train_step``;
  when that directory started empty, the step's trace + lowering and compile seconds are kept as
  the cold figures of part 3 (``WORKDIR/cold_train_step.json``).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from benchmarks.gpu_suite_env import Recorder, fmt, part_parser, peak_flops


# --smoke: two narrow levels, the class token attended to at 14x14 and in the middle.
SMOKE_MODEL_OVERRIDES = dict(block_channels=(8, 16), attention=(None, "cross"),
                             up_attention=(None, "cross"), mid_attention="cross",
                             class_conditioning="cross_attention", context_dim=16,
                             num_class_tokens=1, norm_groups=4)


def build_step(smoke: bool):
    """``(config, state, step_fn, batches)`` of the config the part measures."""
    from experiments.configs import mnist, mnist_accel
    from experiments.mnist_lib import build_model, build_schedule, init_state, make_loss_fn
    from jaxdiff.sharding import make_mesh, shard_batch
    from jaxdiff.training import make_train_step

    config = mnist_accel.get_config()
    if smoke:
        config.model = mnist.unet_fields(10, **SMOKE_MODEL_OVERRIDES)
        config.training.batch_size = 8
    bs = config.training.batch_size
    mesh = make_mesh()
    model, schedule = build_model(config), build_schedule(config)
    state, tx, lr_fn = init_state(config, model, mesh)
    step_fn = make_train_step(make_loss_fn(config, model, schedule), tx, mesh,
                              ema_decay=config.training.ema_decay, lr_schedule=lr_fn)
    rng = np.random.default_rng(0)
    batches = [shard_batch({"image": rng.uniform(-1, 1, (bs, 28, 28, 1)).astype(np.float32),
                            "label": rng.integers(0, 10, bs).astype(np.int32)}, mesh)
               for _ in range(2)]
    return config, state, step_fn, batches


def lower_and_compile(step_fn, state, batch) -> tuple:
    """``(compiled, trace + lowering seconds, compile seconds)``."""
    t0 = time.perf_counter()
    lowered = step_fn.lower(state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    return compiled, t1 - t0, time.perf_counter() - t1


def step_flops(compiled) -> float:
    """FLOPs of one call of ``compiled``, from XLA's cost analysis (NaN if it has none)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", float("nan")))


def main(argv=None):
    p = part_parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 100; smoke 3)")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="the device's peak, instead of the table's")
    args = p.parse_args(argv)
    steps = args.steps or (3 if args.smoke else 100)

    import jax

    import jaxdiff.compile_cache
    from benchmarks.common import machine

    rec = Recorder(args.rows, "train_mfu")
    cache = os.path.join(args.workdir, "cache_train_step")
    cache_was_empty = not (os.path.isdir(cache) and os.listdir(cache))
    jaxdiff.compile_cache.enable(cache)
    print(f"machine: {machine()}", flush=True)
    config, state, step_fn, batches = build_step(args.smoke)
    bs = config.training.batch_size
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    compiled, lower_s, compile_s = lower_and_compile(step_fn, state, batches[0])
    if cache_was_empty:  # the cold figures of part 3 (gpu_suite_compile)
        with open(os.path.join(args.workdir, "cold_train_step.json"), "w") as f:
            json.dump({"trace_lower_s": lower_s, "compile_s": compile_s, "cache": cache}, f)
    t0 = time.perf_counter()
    state, m = compiled(state, batches[0])
    jax.block_until_ready(m)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        state, m = compiled(state, batches[i % 2])
    jax.block_until_ready(m)
    sps = steps / (time.perf_counter() - t0)
    flops = step_flops(compiled)
    kind = jax.devices()[0].device_kind
    if args.peak_tflops:
        peak, source = args.peak_tflops * 1e12, "--peak_tflops"
    else:
        peak, key = peak_flops(kind)
        source = f"table entry {key!r} (dense bf16)" if key else f"no table entry for {kind!r}"
    mfu = flops * sps / peak if peak else None
    name = "mnist_accel" + (" (smoke: 8/16 channels, batch 8)" if args.smoke else "")
    rec.row(config=name, params=n_params, batch=bs, dtype=config.model.dtype, steps=steps,
            trace_lower_s=lower_s, compile_s=compile_s, first_step_s=first, steps_per_s=sps,
            images_per_s=sps * bs, flops_per_step=flops, achieved_flops=flops * sps,
            peak_flops=peak, peak_source=source, device_kind=kind, mfu=mfu)
    print(f"config: {name}, {n_params / 1e6:.2f}M params, batch {bs}, {config.model.dtype} "
          f"compute, {steps} timed steps after one untimed")
    print("FLOPs per step: XLA's cost analysis of the compiled train step "
          "(compiled.cost_analysis()['flops']: forward + backward + AdamW + EMA, a multiply-add "
          f"= 2 FLOPs); peak FLOP/s: {fmt(peak, '.4g')} for device kind {kind!r}, {source}; "
          "MFU = FLOPs per step x steps/s / peak\n")
    print("| trace+lower s | compile s | first step s | steps/s | images/s | GFLOP/step | "
          "achieved TFLOP/s | MFU |\n|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {lower_s:.1f} | {compile_s:.1f} | {first:.2f} | {sps:.2f} | {sps * bs:.0f} | "
          f"{flops / 1e9:.2f} | {flops * sps / 1e12:.2f} | "
          f"{'-' if mfu is None else f'{100 * mfu:.1f}%'} |", flush=True)


if __name__ == "__main__":
    main()
