"""The per-step overhead that one ``lax.scan`` removes: scanned samplers vs a Python loop over a
jitted step, on a tiny Flax conv net (measures, never asserts).

    python -m benchmarks.bench_samplers                    # 1,000-step DDPM and 50-step DDIM
    python -m benchmarks.bench_samplers --repeats 7 --batch 64 --models conv --conv_width 32
    python -m benchmarks.bench_samplers --registry_steps 20   # + every registered sampler

The second table (``--registry_steps N``, 0 to skip) runs every sampler of the registry
(``jaxdiff.samplers.sampler_names()``) for ``N`` steps on the MLP stand-in, whose compute is a
few microseconds, so that the time per model evaluation is mostly the sampler's own per-step
work inside the scan (its algebra, noise draws, history), comparable across samplers.

Two stand-in models: a 3-layer conv net (compute-bound on CPU: the loop overhead is a small part of
a step) and a 2-hidden-layer MLP (a few microseconds of compute, so the per-step dispatch of the
Python loop shows). For each sampler: compile time of the scanned sampler and of the single step
(reported apart), then the median wall time over ``--repeats`` runs after one warm-up run, per
step. The loop dispatches each step asynchronously and blocks once at the end (the best case for a
Python loop). Prints a markdown table and the machine description, for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks.common import machine
from jaxdiff.compile_options import cpu_compiler_options
from jaxdiff.samplers import (
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    ddpm_sample,
    ddpm_step,
    ddpm_timesteps,
    get_sampler,
    sampler_names,
)
from jaxdiff.schedules import make_schedule


class TinyNet(nn.Module):
    """Three 3x3 convs, a sinusoidal time embedding added after the first: ``[B, H, W, C]`` in
    and out."""

    width: int = 16

    @nn.compact
    def __call__(self, x, t):
        half = 8
        freqs = jnp.exp(-jnp.log(10000.0) * jnp.arange(half) / half)
        args = t.astype(jnp.float32)[:, None] * freqs[None]
        emb = nn.Dense(self.width)(jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1))
        h = nn.silu(nn.Conv(self.width, (3, 3))(x) + emb[:, None, None, :])
        h = nn.silu(nn.Conv(self.width, (3, 3))(h))
        return nn.Conv(x.shape[-1], (3, 3))(h)


class TinyMLP(nn.Module):
    """Flatten, two hidden layers with the time embedding added, unflatten: ``[B, H, W, C]`` in
    and out."""

    width: int = 64

    @nn.compact
    def __call__(self, x, t):
        half = 8
        freqs = jnp.exp(-jnp.log(10000.0) * jnp.arange(half) / half)
        args = t.astype(jnp.float32)[:, None] * freqs[None]
        emb = nn.Dense(self.width)(jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1))
        h = nn.silu(nn.Dense(self.width)(x.reshape(x.shape[0], -1)) + emb)
        h = nn.silu(nn.Dense(self.width)(h))
        return nn.Dense(x[0].size)(h).reshape(x.shape)


def _timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _compile(jitted, *args):
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def bench(name, sample_fn, step_fn, ts, ts_prev, params, x, key, repeats):
    """Returns a table row: compile times (s) and per-step medians (ms) of scan and loop."""
    opts = cpu_compiler_options()
    scan, scan_compile = _compile(jax.jit(sample_fn, compiler_options=opts), params, x, key)
    step, step_compile = _compile(jax.jit(step_fn, compiler_options=opts), params, x, ts[0],
                                  ts_prev[0], jnp.int32(0), key)
    ts_dev, tp_dev = list(jnp.asarray(ts)), list(jnp.asarray(ts_prev))
    idx = [jnp.int32(i) for i in range(len(ts))]

    def run_scan():
        jax.block_until_ready(scan(params, x, key))

    def run_loop():
        y = x
        for t, tp, i in zip(ts_dev, tp_dev, idx):
            y = step(params, y, t, tp, i, key)
        jax.block_until_ready(y)

    n = len(ts)
    scan_s, loop_s = _timed(run_scan, repeats), _timed(run_loop, repeats)
    per_step = 1e3 / n
    return (name, n, scan_compile, scan_s * per_step, step_compile, loop_s * per_step,
            loop_s / scan_s)


def rows_for(net, args):
    sched = make_schedule("linear", 1000)
    B = args.batch
    x = jax.random.normal(jax.random.key(0), (B, 28, 28, 1))
    params = net.init(jax.random.key(1), x, jnp.zeros((B,), jnp.int32))
    key = jax.random.key(2)

    def model(params, y, t):
        return net.apply(params, y, t)

    num_ddpm = args.ddpm_steps
    ddpm_kw = dict(variance_type="fixed_small", prediction_type="eps", clip_x0=1.0)
    ddim_kw = dict(prediction_type="eps", clip_x0=1.0)

    def ddpm_scan(params, y, key):
        return ddpm_sample(partial(model, params), sched, y, key, num_steps=num_ddpm, **ddpm_kw)

    def ddpm_one(params, y, t, tp, i, key):
        z = jax.random.normal(jax.random.fold_in(key, i), y.shape, y.dtype)
        return ddpm_step(sched, model(params, y, jnp.full((B,), t)), y, t, tp, z, **ddpm_kw)[0]

    def ddim_scan(params, y, key):
        return ddim_sample(partial(model, params), sched, y, key, num_steps=args.ddim_steps,
                           **ddim_kw)

    def ddim_one(params, y, t, tp, i, key):
        out = model(params, y, jnp.full((B,), t))
        return ddim_step(sched, out, y, t, tp, None, eta=0.0, set_alpha_to_one=True, **ddim_kw)[0]

    n_params = sum(a.size for a in jax.tree.leaves(params))
    label = f"{type(net).__name__}({net.width}), {n_params:,} params"
    return [
        (label,) + bench("DDPM", ddpm_scan, ddpm_one, *ddpm_timesteps(sched, num_ddpm)[:2],
                         params, x, key, args.repeats),
        (label,) + bench("DDIM (eta=0)", ddim_scan, ddim_one,
                         *ddim_timesteps(sched, args.ddim_steps)[:2], params, x, key, args.repeats),
    ]


def registry_rows(net, args):
    """One row per registered sampler: NFE, compile time, median time per step and per NFE."""
    sched = make_schedule("linear", 1000)
    x = jax.random.normal(jax.random.key(0), (args.batch, 28, 28, 1))
    params = net.init(jax.random.key(1), x, jnp.zeros((args.batch,), jnp.int32))
    key = jax.random.key(2)
    n = args.registry_steps
    rows = []
    for name in sampler_names():
        sampler = get_sampler(name)
        nfe = sampler.model_evaluations(sched, n)
        fn = jax.jit(lambda p, y, k, s=sampler: s(partial(net.apply, p), sched, y, k,
                                                    num_steps=n),
                     compiler_options=cpu_compiler_options())
        compiled, compile_s = _compile(fn, params, x, key)
        run_s = _timed(lambda: jax.block_until_ready(compiled(params, x, key)), args.repeats)
        rows.append((name, n, nfe, compile_s, run_s * 1e3 / n, run_s * 1e3 / nfe))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--models", default="conv,mlp", help="comma-separated: conv, mlp")
    p.add_argument("--conv_width", type=int, default=16, help="channels of the conv stand-in")
    p.add_argument("--mlp_width", type=int, default=64, help="hidden units of the MLP stand-in")
    p.add_argument("--ddpm_steps", type=int, default=1000)
    p.add_argument("--ddim_steps", type=int, default=50)
    p.add_argument("--registry_steps", type=int, default=20,
                   help="steps for the every-sampler table (0: skip it)")
    args = p.parse_args()

    nets = {"conv": TinyNet(args.conv_width), "mlp": TinyMLP(args.mlp_width)}
    rows = [r for m in args.models.split(",") for r in rows_for(nets[m], args)]
    print(f"\nSamplers, batch {args.batch} of 28x28x1, median of {args.repeats} runs after a "
          f"warm-up. Machine: {machine()}\n")
    print("| model | sampler | steps | scan compile (s) | scan per step (ms) | step compile (s) "
          "| Python loop per step (ms) | loop / scan |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, name, n, sc, sps, stc, lps, ratio in rows:
        print(f"| {label} | {name} | {n} | {sc:.2f} | {sps:.3f} | {stc:.2f} | {lps:.3f} "
              f"| {ratio:.2f}x |")
    if args.registry_steps > 0:
        net = nets["mlp"]
        print(f"\nEvery registered sampler, {args.registry_steps} steps, on "
              f"{type(net).__name__}({net.width}) (compute of a few microseconds per call), batch "
              f"{args.batch}: the time per model evaluation is mostly the sampler's own work.\n")
        print("| sampler | steps | NFE | compile (s) | per step (ms) | per NFE (ms) |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, n, nfe, comp, per_step, per_nfe in registry_rows(net, args):
            print(f"| {name} | {n} | {nfe} | {comp:.2f} | {per_step:.3f} | {per_nfe:.3f} |")


if __name__ == "__main__":
    main()
