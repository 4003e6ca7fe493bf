"""jaxdiff against diffusers (PyTorch) on the same UNet and weights: training throughput, DDIM-50
sampling with classifier-free guidance, compile time, memory, and achieved FLOP/s.

    python -m benchmarks.bench_vs_torch                          # the default CPU training model
    python -m benchmarks.bench_vs_torch --model preset           # mnist_unet_config(), 1.66M params
    python -m benchmarks.bench_vs_torch --torch_compile          # also torch.compile (inductor)

Both sides run in this one process, alternating after warm-up; the table reports medians and the
ratio. Measures, never asserts.

- **Model**: ``--model cpu`` is the UNet of ``experiments/configs/mnist.py`` (what
  ``train_mnist`` trains by default); ``--model preset`` is ``mnist_unet_config()``. The PyTorch
  side is the equivalent diffusers ``UNet2DConditionModel`` (plus an ``nn.Embedding`` for
  cross-attention class tokens); its random weights are converted with
  :func:`jaxdiff.convert.convert_unet_state_dict` and the outputs compared once.
- **Train step**: eps-MSE loss, gradient, AdamW update (no EMA or clipping on either side; the
  full jaxdiff step with both is ``benchmarks/bench_train.py``), batch ``--batch`` 28x28x1.
- **Sampling**: ``--samples`` images, DDIM ``--steps`` steps, guidance scale 2 (both branches in
  one batched call of 2x``--samples``): jaxdiff's scanned ``ddim_sample`` (one XLA computation),
  a Python loop over a jitted jaxdiff step, and the diffusers ``DDIMScheduler`` loop around the
  PyTorch model, from the same noise (their results are compared).
- **Memory**: the peak resident-set growth while running the timed call (sampled every 2 ms from
  ``/proc/self/statm``; parameters and optimizer state allocated beforehand are not counted), and
  for jaxdiff also XLA's own figure for the compiled step's temporaries (``memory_analysis``).
- **FLOP/s**: XLA's ``cost_analysis`` FLOP count of the jaxdiff train step over its median time,
  against the measured peak of a float32 matrix multiply (``--matmul`` size) on this machine.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff.compile_options import cpu_compiler_options

from benchmarks.common import (alternate, diffusers_twin, machine, peak_rss_growth, sync,
                               timed, torch_forward, xla_bytes)


# --------------------------------------------------------------------------- models


def jaxdiff_config(which: str):
    """``--model cpu``: the UNet config of ``experiments/configs/mnist.py``; ``preset``: the
    ``mnist_unet_config()`` preset."""
    from jaxdiff.models import mnist_unet_config

    if which == "preset":
        return mnist_unet_config()
    from experiments.configs import mnist
    from experiments.mnist_lib import build_model

    return build_model(mnist.get_config()).config


# --------------------------------------------------------------------------- measuring


def peak_cuda_growth(fn) -> int:
    """Peak growth of torch's CUDA allocations over ``fn()``, in bytes."""
    import torch

    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    sync(fn())
    return torch.cuda.max_memory_allocated() - base


def matmul_peak(n: int, device: str, reps: int = 5) -> tuple[float, float]:
    """Measured float32 matmul FLOP/s of ``[n, n] @ [n, n]``: (jax, torch on ``device``)."""
    import torch

    a = jax.random.normal(jax.random.key(0), (n, n))
    mm = jax.jit(jnp.dot)
    timed(lambda: mm(a, a))
    jt = statistics.median(timed(lambda: mm(a, a)) for _ in range(reps))
    ta = torch.randn(n, n, device=device)
    timed(lambda: torch.mm(ta, ta))
    tt = statistics.median(timed(lambda: torch.mm(ta, ta)) for _ in range(reps))
    return 2 * n**3 / jt, 2 * n**3 / tt


# --------------------------------------------------------------------------- main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cpu", choices=["cpu", "preset"])
    p.add_argument("--batch", type=int, default=128, help="training batch")
    p.add_argument("--samples", type=int, default=64, help="images per sampling run")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance_scale", type=float, default=2.0)
    p.add_argument("--reps", type=int, default=5, help="timed train steps per side")
    p.add_argument("--sample_reps", type=int, default=3, help="timed sampling runs per side")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--matmul", type=int, default=2048)
    p.add_argument("--torch_compile", action="store_true", help="also time torch.compile")
    p.add_argument("--torch_device", default=None,
                   help="cpu or cuda (default: cuda when torch sees a GPU)")
    p.add_argument("--matmul_precision", default="tf32", choices=["tf32", "highest"],
                   help="on a GPU: float32 matmuls/convs may use TF32 on both sides (jax's "
                        "default; torch's allow_tf32 set to match), or full float32 on both")
    args = p.parse_args(argv)

    import diffusers
    import flax
    import torch
    from diffusers import DDIMScheduler

    from jaxdiff.models import UNet
    from jaxdiff.samplers import classifier_free_guidance, ddim_sample, ddim_step, ddim_timesteps
    from jaxdiff.schedules import make_schedule

    device = args.torch_device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device != "cpu"
    if on_gpu:
        tf32 = args.matmul_precision == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    if args.matmul_precision == "highest":
        jax.config.update("jax_default_matmul_precision", "highest")
    cfg = jaxdiff_config(args.model)
    model, emb, params = diffusers_twin(cfg)
    model = model.to(device)
    emb = emb.to(device) if emb is not None else None
    tforward = torch_forward(model, emb, cfg)
    unet = UNet(cfg)
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    null = cfg.num_classes

    def jforward(params, x, t, labels):
        return unet.apply({"params": params}, x, t, labels=labels)

    # ----- inputs, same numbers on both sides (NCHW for torch)
    rng = np.random.default_rng(0)
    B = args.batch
    x = rng.standard_normal((B, 28, 28, 1)).astype(np.float32)
    noise = rng.standard_normal(x.shape).astype(np.float32)
    t = rng.integers(0, 1000, B).astype(np.int64)
    labels = rng.integers(0, null + 1, B).astype(np.int64)
    def nchw(a):
        return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).to(device)

    tx_, tn_ = nchw(x), nchw(noise)
    tt_, tl_ = torch.from_numpy(t).to(device), torch.from_numpy(labels).to(device)
    jx, jn, jt, jl = map(jnp.asarray, (x, noise, t.astype(np.int32), labels.astype(np.int32)))

    model.train(False)
    with torch.no_grad():
        ref = tforward(tx_, tt_, tl_).cpu().numpy().transpose(0, 2, 3, 1)
    fwd_err = float(np.abs(np.asarray(jforward(params, jx, jt, jl)) - ref).max()
                    / np.abs(ref).max())  # fmt: skip

    # ----- train steps: loss, grad, AdamW
    lr = 1e-4
    opt = optax.adamw(lr, weight_decay=0.0)

    def jloss(params, x, noise, t, labels):
        return jnp.mean((jforward(params, x, t, labels) - noise) ** 2)

    opts = cpu_compiler_options()  # {} off the CPU or with JAXDIFF_CPU_COMPILER_OPTIONS=0

    @functools.partial(jax.jit, compiler_options=opts)
    def jstep(params, opt_state, x, noise, t, labels):
        loss, grads = jax.value_and_grad(jloss)(params, x, noise, t, labels)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    jstate = [params, opt.init(params)]

    def run_jstep():
        jstate[0], jstate[1], loss = jstep(*jstate, jx, jn, jt, jl)
        return loss

    t0 = time.perf_counter()
    lowered = jstep.lower(*jstate, jx, jn, jt, jl)
    compiled = lowered.compile()
    jcompile_train = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    step_flops = float(cost.get("flops", float("nan")))
    mem = compiled.memory_analysis()
    xla_temp = getattr(mem, "temp_size_in_bytes", float("nan"))

    # the timed AdamW steps change the torch weights; sampling below starts from the initial ones
    initial = copy.deepcopy((model.state_dict(), emb.state_dict() if emb is not None else None))
    tparams = list(model.parameters()) + (list(emb.parameters()) if emb is not None else [])
    topt = torch.optim.AdamW(tparams, lr=lr, weight_decay=0.0)

    def make_tstep(fwd):
        def tstep():
            topt.zero_grad(set_to_none=True)
            loss = ((fwd(tx_, tt_, tl_) - tn_) ** 2).mean()
            loss.backward()
            topt.step()
            return loss.detach()

        return tstep

    model.train(True)
    train_fns = {"jaxdiff (jit)": run_jstep, "diffusers (torch eager)": make_tstep(tforward)}
    tcompile_train = None
    if args.torch_compile:
        try:
            cmodel = torch.compile(model)
            cforward = torch_forward(cmodel, emb, cfg)
            cstep = make_tstep(cforward)
            tcompile_train = timed(cstep)
            train_fns["diffusers (torch.compile)"] = cstep
        except Exception as e:  # report, do not hide
            tcompile_train = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
    train_t = alternate(train_fns, args.reps, args.warmup)
    if on_gpu:  # torch: its allocator's peak; jaxdiff: XLA's figure for the compiled step
        train_mem = {k: peak_cuda_growth(f) for k, f in train_fns.items() if "jaxdiff" not in k}
        train_mem["jaxdiff (jit)"] = xla_bytes(compiled)
    else:
        train_mem = {k: peak_rss_growth(f) for k, f in train_fns.items()}
    model.load_state_dict(initial[0])
    if emb is not None:
        emb.load_state_dict(initial[1])
    model.train(False)

    # ----- sampling: DDIM with classifier-free guidance, same noise on all sides
    S, steps, w = args.samples, args.steps, args.guidance_scale
    sched = make_schedule("cosine", 1000)
    x_T = rng.standard_normal((S, 28, 28, 1)).astype(np.float32)
    slabels = (np.arange(S) % null).astype(np.int32)
    jx_T, jsl = jnp.asarray(x_T), jnp.asarray(slabels)

    def guided(params):
        return classifier_free_guidance(lambda x, t, c: jforward(params, x, t, c), jsl, null, w)

    jsample = jax.jit(lambda params, x: ddim_sample(guided(params), sched, x, num_steps=steps),
                      compiler_options=opts)
    t0 = time.perf_counter()
    jsample_c = jsample.lower(params, jx_T).compile()
    jcompile_sample = time.perf_counter() - t0

    ts, ts_prev, _ = ddim_timesteps(sched, steps, "leading")

    @functools.partial(jax.jit, compiler_options=opts)
    def jstep1(params, x, t, t_prev):
        out = guided(params)(x, jnp.full((S,), t, jnp.int32))
        return ddim_step(sched, out, x, t, t_prev, None, eta=0.0, prediction_type="eps",
                         clip_x0=None, set_alpha_to_one=True)[0]

    t0 = time.perf_counter()
    jax.block_until_ready(jstep1(params, jx_T, ts[0], ts_prev[0]))
    jcompile_step = time.perf_counter() - t0

    def jloop():
        x = jx_T
        for a, b in zip(ts, ts_prev):
            x = jstep1(params, x, a, b)
        return x

    tsched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                           clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading")
    tl_s = torch.from_numpy(slabels.astype(np.int64)).to(device)
    tl_both = torch.cat([tl_s, torch.full_like(tl_s, null)])

    @torch.no_grad()
    def tloop():
        tsched.set_timesteps(steps)
        x = nchw(x_T)
        for tt in tsched.timesteps:
            out = tforward(torch.cat([x, x]), tt, tl_both)
            cond, uncond = out.chunk(2)
            x = tsched.step(uncond + w * (cond - uncond), tt, x).prev_sample
        return x

    sample_fns = {
        "jaxdiff ddim_sample (one lax.scan)": lambda: jsample_c(params, jx_T),
        "jaxdiff Python loop over a jitted step": jloop,
        "diffusers DDIMScheduler loop (torch eager)": tloop,
    }
    def host(a):
        return a.cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)

    outs = {k: host(f()) for k, f in sample_fns.items()}
    tref = outs["diffusers DDIMScheduler loop (torch eager)"].transpose(0, 2, 3, 1)
    scale = np.abs(tref).max()
    sample_err = {k: float(np.abs(v - tref).max() / scale) for k, v in outs.items()
                  if not k.startswith("diffusers")}  # fmt: skip
    sample_t = alternate(sample_fns, args.sample_reps, 0)  # the outputs above were the warm-up
    if on_gpu:
        sample_mem = {"jaxdiff ddim_sample (one lax.scan)": xla_bytes(jsample_c),
                      "jaxdiff Python loop over a jitted step": float("nan"),
                      "diffusers DDIMScheduler loop (torch eager)": peak_cuda_growth(tloop)}
    else:
        sample_mem = {k: peak_rss_growth(f) for k, f in sample_fns.items()}

    jpeak, tpeak = matmul_peak(args.matmul, device)

    # ----- report
    mib = lambda b: "n/a" if b != b else f"{b / 2**20:.0f}"  # noqa: E731
    mem_head = ("device memory (MiB): torch peak growth / XLA temp+output" if on_gpu
                else "peak RSS growth (MiB)")
    print(f"Machine: {machine()}; torch device {device}, threads {torch.get_num_threads()}"
          + (f"; float32 matmul precision: {args.matmul_precision} on both sides" if on_gpu
             else ""))
    print(f"Versions: jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}, "
          f"torch {torch.__version__}, diffusers {diffusers.__version__}")
    print(f"Model: --model {args.model} ({n_params / 1e6:.2f}M params), float32; forward outputs "
          f"agree to {fwd_err:.1e} (relative)")
    print()
    print(f"Train step (loss + grad + AdamW), batch {B}, median of {args.reps} after "
          f"{args.warmup} warm-up:")
    print()
    print(f"| side | ms / step | images / s | vs torch eager | {mem_head} |")
    print("|---|---:|---:|---:|---:|")
    ref_t = train_t["diffusers (torch eager)"]
    for k, v in train_t.items():
        print(f"| {k} | {v * 1e3:.1f} | {B / v:.0f} | {ref_t / v:.2f}x | {mib(train_mem[k])} |")
    print()
    print(f"DDIM-{steps}, {S} images, guidance scale {w:g} (model batch {2 * S}), median of "
          f"{args.sample_reps} after 1 warm-up:")
    print()
    print(f"| side | s / run | ms / step | vs diffusers loop | max rel. diff to diffusers | "
          f"{mem_head} |")
    print("|---|---:|---:|---:|---:|---:|")
    ref_s = sample_t["diffusers DDIMScheduler loop (torch eager)"]
    for k, v in sample_t.items():
        err = f"{sample_err[k]:.1e}" if k in sample_err else "(reference)"
        print(f"| {k} | {v:.3f} | {v / steps * 1e3:.1f} | {ref_s / v:.2f}x | {err} | "
              f"{mib(sample_mem[k])} |")
    print()
    print(f"| compile (jaxdiff, XLA:{jax.default_backend().upper()}) | s |")
    print("|---|---:|")
    print(f"| train step | {jcompile_train:.1f} |")
    print(f"| ddim_sample, {steps} steps (scan) | {jcompile_sample:.1f} |")
    print(f"| one guided DDIM step (for the loop) | {jcompile_step:.1f} |")
    if tcompile_train is not None:
        val = f"{tcompile_train:.1f}" if isinstance(tcompile_train, float) else tcompile_train
        print(f"| torch.compile, first train step (diffusers) | {val} |")
    print()
    jt_train = train_t["jaxdiff (jit)"]
    print(f"Train step: XLA counts {step_flops / 1e9:.1f} GFLOP, i.e. "
          f"{step_flops / jt_train / 1e9:.1f} GFLOP/s achieved; float32 matmul {args.matmul}^3 "
          f"peak on this machine: {jpeak / 1e9:.1f} GFLOP/s (jax), {tpeak / 1e9:.1f} GFLOP/s "
          f"(torch) -> {100 * step_flops / jt_train / max(jpeak, tpeak):.0f}% of peak. XLA "
          f"temporaries of the compiled train step: {mib(xla_temp)} MiB.")


if __name__ == "__main__":
    main()
