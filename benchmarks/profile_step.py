"""Where the time of a jaxdiff UNet train step goes: a ``jax.profiler`` trace of the compiled step,
its XLA ops grouped by kind (forward / input-gradient / weight-gradient convolution, dot, reduce,
transpose, elementwise), as a markdown table. Measures, never asserts.

    python -m benchmarks.profile_step                   # the default CPU training model, batch 128
    python -m benchmarks.profile_step --model preset --batch 64 --forward_only
    JAXDIFF_CPU_COMPILER_OPTIONS=0 python -m benchmarks.profile_step   # XLA:CPU's defaults

Op times are summed over the threads that ran them (XLA:CPU runs ops on a small thread pool), so
the "busy" total can exceed the wall time of a step; their ratio is the average parallelism.
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.bench_vs_torch import jaxdiff_config
from benchmarks.common import machine
from jaxdiff.compile_options import cpu_compiler_options

FUSION = re.compile(r"%?([\w.\-]+) = (\S+) fusion\(.*?\), kind=\w+, calls=%?([\w.\-]+)")
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\(")
CONV = re.compile(r"convolution\(.*?\), window=\{(.*?)\}, dim_labels=(\S+)")


def hlo_kinds(hlo: str) -> dict:
    """Fusion / instruction name -> a short kind, from the optimized HLO text."""
    bodies, name, buf = {}, None, []
    for line in hlo.split("\n"):
        if line and not line.startswith(" ") and "{" in line:
            name, buf = line.split(" ")[0].lstrip("%"), []
        elif line.startswith("}"):
            if name:
                bodies[name] = " ".join(buf)
            name = None
        elif name:
            buf.append(line.strip())
    kinds = {}
    for line in hlo.split("\n"):
        m = FUSION.search(line)
        if m:
            out_shape, body = m.group(2), bodies.get(m.group(3), "")
            kinds[m.group(1)] = classify(out_shape, body)
            continue
        m = INSTRUCTION.search(line)  # an op XLA runs on its own (e.g. an Eigen convolution)
        if m and m.group(3) not in ("parameter", "constant", "get-tuple-element", "tuple",
                                    "bitcast"):
            kinds.setdefault(m.group(1), classify(m.group(2), " " + line.split("=", 1)[1]))
    return kinds


def classify(out_shape: str, body: str) -> str:
    conv = CONV.search(body)
    if conv:
        # The weight gradient is a convolution whose window spans the image ("size=28x28"),
        # giving [C_in, kh, kw, C_out]; forward and input-gradient convolutions have the kernel's
        # window ("size=3x3" or "size=1x1").
        size = re.search(r"size=(\d+)x(\d+)", conv.group(1))
        if size and int(size.group(1)) > 3:
            return "conv: weight gradient"
        return "conv: forward / input gradient"
    for op in ("dot", "reduce", "transpose", "concatenate", "pad", "slice"):
        if f" {op}(" in body:
            return op
    return "elementwise"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cpu", choices=["cpu", "preset"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="traced steps (after 2 untraced)")
    p.add_argument("--forward_only", action="store_true", help="profile one forward pass")
    p.add_argument("--top", type=int, default=0,
                   help="also list the N slowest ops with their kind and output shape")
    args = p.parse_args(argv)

    from jaxdiff.models import UNet, init_unet

    cfg = jaxdiff_config(args.model)
    unet, params = UNet(cfg), init_unet(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    b = args.batch
    x = jnp.asarray(rng.standard_normal((b, 28, 28, cfg.in_channels)), jnp.float32)
    noise = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, b), jnp.int32)
    labels = jnp.asarray(rng.integers(0, (cfg.num_classes or 0) + 1, b), jnp.int32)
    opt = optax.adamw(1e-4)
    opts = cpu_compiler_options()  # {} with JAXDIFF_CPU_COMPILER_OPTIONS=0: XLA's defaults

    def loss(p):
        return jnp.mean((unet.apply({"params": p}, x, t, labels=labels) - noise) ** 2)

    if args.forward_only:
        fn = jax.jit(lambda p, o: (p, o, unet.apply({"params": p}, x, t, labels=labels)),
                     compiler_options=opts)
    else:
        def train_step(p, o):
            value, grads = jax.value_and_grad(loss)(p)
            updates, o = opt.update(grads, o, p)
            return optax.apply_updates(p, updates), o, value

        fn = jax.jit(train_step, compiler_options=opts)
    state = (params, opt.init(params))
    hlo = fn.lower(*state).compile().as_text()
    kinds = hlo_kinds(hlo)
    for _ in range(2):
        state = fn(*state)[:2]
        jax.block_until_ready(state)
    walls = []
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for _ in range(args.steps):
            t0 = time.perf_counter()
            out = fn(*state)
            jax.block_until_ready(out)
            walls.append(time.perf_counter() - t0)
            state = out[:2]
        jax.profiler.stop_trace()
        trace = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0]
        data = jax.profiler.ProfileData.from_file(trace)
        per_kind, count, per_op = (collections.Counter(), collections.Counter(),
                                   collections.Counter())
        for plane in data.planes:
            for line in plane.lines:
                if line.name.startswith("python") or "PjRt" in line.name:
                    continue  # host-side waiting, not op execution
                for ev in line.events:
                    if ev.name.startswith("ThunkExecutor"):
                        continue
                    kind = kinds.get(ev.name, "other (unfused ops)")
                    per_kind[kind] += ev.duration_ns / 1e6 / args.steps
                    per_op[ev.name] += ev.duration_ns / 1e6 / args.steps
                    count[kind] += 1
    wall = float(np.median(walls)) * 1e3
    busy = sum(per_kind.values())
    what = "forward pass" if args.forward_only else "train step (loss + grad + AdamW)"
    print(f"Machine: {machine()}; jax {jax.__version__}")
    print(f"Model: --model {args.model}, batch {b}, {what}: {wall:.0f} ms wall per step (median "
          f"of {args.steps}, traced); ops busy {busy:.0f} ms summed over threads -> average "
          f"parallelism {busy / wall:.2f}")
    if busy < 0.9 * wall:
        print(f"Note: {wall - busy:.0f} ms of the wall time are not attributed to any op: XLA ops "
              "that hand their work to Eigen's thread pool (convolutions, without YNNPACK) finish "
              "asynchronously, and the trace does not time them.")
    print()
    print("| op kind | ms / step (summed over threads) | share | ops / step |")
    print("|---|---:|---:|---:|")
    for kind, ms in per_kind.most_common():
        print(f"| {kind} | {ms:.0f} | {100 * ms / busy:.0f}% | {count[kind] // args.steps} |")
    if args.top:
        shapes = dict(re.findall(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ", hlo, re.M))
        print(f"\nThe {args.top} slowest ops (summed over threads):\n")
        print("| ms / step | kind | op | output shape |")
        print("|---:|---|---|---|")
        for name, ms in per_op.most_common(args.top):
            print(f"| {ms:.1f} | {kinds.get(name, 'other (unfused ops)')} | `{name}` | "
                  f"`{shapes.get(name, '?')}` |")


if __name__ == "__main__":
    main()
