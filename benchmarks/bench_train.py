"""Training throughput of an experiments config: the train step's trace + lowering time, its XLA
compile time and its first execution, each separately (``step_fn.lower(...).compile()``), then
steps/s and images/s over timed steps (synthetic data of MNIST's shape; measures, never asserts).

    python -m benchmarks.bench_train    # default config (experiments/configs/mnist.py)
    python -m benchmarks.bench_train --config accel --steps 50 --batch_size 256

Prints a markdown table row with the machine description, for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from benchmarks.common import machine


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="mnist", choices=["mnist", "accel"])
    p.add_argument("--steps", type=int, default=20, help="timed steps after the first")
    p.add_argument("--batch_size", type=int, default=None, help="override the config's")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="override the config's model.dtype (compute; params stay float32)")
    args = p.parse_args()

    from experiments.configs import mnist, mnist_accel
    from experiments.mnist_lib import build_model, build_schedule, init_state, make_loss_fn
    from jaxdiff.training import make_train_step
    from jaxdiff.sharding import make_mesh, shard_batch

    config = (mnist if args.config == "mnist" else mnist_accel).get_config()
    if args.batch_size:
        config.training.batch_size = args.batch_size
    if args.dtype:
        config.model.dtype = args.dtype
    bs = config.training.batch_size
    mesh = make_mesh()
    model, schedule = build_model(config), build_schedule(config)
    state, tx, lr_fn = init_state(config, model, mesh)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    step_fn = make_train_step(make_loss_fn(config, model, schedule), tx, mesh,
                              ema_decay=config.training.ema_decay, lr_schedule=lr_fn)
    rng = np.random.default_rng(0)
    batches = [shard_batch({"image": rng.uniform(-1, 1, (bs, 28, 28, 1)).astype(np.float32),
                            "label": rng.integers(0, 10, bs).astype(np.int32)}, mesh)
               for _ in range(2)]

    t0 = time.perf_counter()
    lowered = step_fn.lower(state, batches[0])  # trace + lower to StableHLO
    t1 = time.perf_counter()
    compiled = lowered.compile()  # XLA compile
    t2 = time.perf_counter()
    state, m = compiled(state, batches[0])  # first execution (allocation, autotuning)
    jax.block_until_ready(m)
    t3 = time.perf_counter()
    lower_s, compile_s, first = t1 - t0, t2 - t1, t3 - t2
    t0 = time.perf_counter()
    for i in range(args.steps):
        state, m = compiled(state, batches[i % 2])
    jax.block_until_ready(m)
    dt = time.perf_counter() - t0
    sps = args.steps / dt
    print("| machine | config | params | batch | dtype | trace+lower s | compile s | first step s "
          "| steps/s | images/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {machine()}, jax {jax.__version__} | {args.config} | {n_params / 1e6:.2f}M | "
          f"{bs} | {config.model.dtype} | {lower_s:.1f} | {compile_s:.1f} | {first:.2f} | "
          f"{sps:.2f} | {sps * bs:.0f} |")


if __name__ == "__main__":
    main()
