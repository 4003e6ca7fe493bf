"""Every convolution of jaxdiff's trained models, per shape: XLA:CPU's native convolution against
an im2col + matmul formulation and against torch (oneDNN), forward, input gradient and weight
gradient, at the batch each model trains with. Measures, never asserts.

    python -m benchmarks.bench_conv_shapes                      # all four models
    python -m benchmarks.bench_conv_shapes --models mnist,vae --reps 5

- **Shapes**: found by tracing each model's forward pass (``jax.make_jaxpr``) and collecting its
  ``conv_general_dilated`` equations, so the list is what the model runs, not a hand-written copy.
  Models: ``mnist`` (the UNet of ``experiments/configs/mnist.py``, 28x28x1, its training batch),
  ``latent_mnist`` (the text-to-MNIST UNet on 8x8x4 latents, 12 context tokens),
  ``vae`` (the MNIST autoencoder of ``experiments/configs/vae_mnist.py``, encoder + decoder),
  ``sd15`` (the Stable Diffusion 1.5 UNet, 64x64x4 latents, batch 1 as ``finetune_sd`` trains).
- **Forms**, each jitted with :func:`jaxdiff.cpu_compiler_options` and timed alone:
  ``native`` is ``lax.conv_general_dilated`` (XLA:CPU's Eigen convolution; its gradients are the
  convolutions XLA derives, with the layout transposes it inserts); ``im2col`` gathers the k x k
  shifted (strided) slices of the padded input into ``[B, H', W', k*k*C]`` and does one matmul,
  its gradients by autodiff (what :class:`jaxdiff.models.resnet.Conv3x3` runs on small images);
  ``taps`` sums one matmul per kernel tap over shifted slices, so that its weight gradient is k*k
  matmuls (the custom-VJP formulation); ``nchw`` is the native convolution with NCHW / OIHW
  operands (XLA's other layout; timed without the transposes a model would need);
  ``torch`` is ``torch.nn.functional.conv2d`` and ``torch.nn.grad.conv2d_{input,weight}`` on
  NCHW tensors, in this process, at the same thread count.
- **Columns**: ``n`` the number of calls per forward pass; times in ms per call (median of
  ``--reps`` after one warm-up); ``pick`` the form :class:`~jaxdiff.models.resnet.Conv3x3` (or
  ``nn.Conv`` for 1x1 and stride-2 layers) runs today on the CPU. Totals weight each row by ``n``;
  ``best`` takes the fastest NHWC form per row and direction.
"""

from __future__ import annotations

import argparse
import collections
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import alternate, machine, timed
from jaxdiff.compile_options import cpu_compiler_options
from jaxdiff.models.resnet import IM2COL_MAX_PIXELS, uses_im2col

DN = ("NHWC", "HWIO", "NHWC")
MODELS = ("mnist", "latent_mnist", "vae", "sd15")
Conv = collections.namedtuple("Conv", "x kernel strides padding")


# --------------------------------------------------------------------------- shapes


def _walk(jaxpr, out: list) -> None:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            p = eqn.params
            if p["dimension_numbers"] != jax.lax.conv_dimension_numbers(
                    eqn.invars[0].aval.shape, eqn.invars[1].aval.shape, DN):
                raise ValueError(f"unexpected conv layout {p['dimension_numbers']}")
            out.append(Conv(tuple(eqn.invars[0].aval.shape), tuple(eqn.invars[1].aval.shape),
                            tuple(p["window_strides"]), tuple(map(tuple, p["padding"]))))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _walk(inner, out)


def conv_calls(fn, *args) -> collections.Counter:
    """The convolutions ``fn(*args)`` has (abstract arguments are fine), with their counts.
    Traced with :class:`Conv3x3`'s im2col switched off, so that the 3x3 convolutions it runs as
    matmuls are listed too (the ``pick`` column says which form each one gets)."""
    from jaxdiff.models import resnet

    rule, out = resnet.uses_im2col, []
    resnet.uses_im2col = lambda shape, strides=1: False
    try:
        _walk(jax.make_jaxpr(lambda *a: fn(*a))(*args).jaxpr, out)
    finally:
        resnet.uses_im2col = rule
    return collections.Counter(out)


def model_convs(name: str) -> tuple[collections.Counter, str]:
    """``(convolutions, description)`` of one of :data:`MODELS`' forward pass."""
    from jaxdiff.models import UNet

    sds = jax.ShapeDtypeStruct
    if name == "mnist":
        from experiments.configs import mnist
        from experiments.mnist_lib import build_model

        config = mnist.get_config()
        unet, b = build_model(config), config.training.batch_size
        x, t, y = sds((b, 28, 28, 1), jnp.float32), sds((b,), jnp.int32), sds((b,), jnp.int32)
        params = jax.eval_shape(lambda *a: unet.init(jax.random.key(0), a[0], a[1], labels=a[2]),
                                x, t, y)
        return (conv_calls(lambda p, *a: unet.apply(p, a[0], a[1], labels=a[2]), params, x, t, y),
                f"experiments/configs/mnist.py UNet, batch {b}, 28x28x1")
    if name == "latent_mnist":
        from experiments.configs import latent_mnist
        from experiments.latent_lib import build_unet

        config = latent_mnist.get_config()
        unet, b = build_unet(config), config.training.batch_size
        x, t = sds((b, 8, 8, 4), jnp.float32), sds((b,), jnp.int32)
        ctx = sds((b, config.text.max_length, config.text.hidden_size), jnp.float32)
        return (_unet_convs(unet, x, t, ctx),
                f"experiments/configs/latent_mnist.py UNet, batch {b}, 8x8x4 latents")
    if name == "vae":
        from experiments.configs import vae_mnist
        from experiments.vae_lib import build_model

        config = vae_mnist.get_config()
        vae, b = build_model(config), config.training.batch_size
        x = sds((b, 28, 28, 1), jnp.float32)

        def run(p, images):
            z = vae.apply(p, images, method=vae.encode_moments)
            return vae.apply(p, z[..., : vae.config.latent_channels], method=vae.decode)

        params = jax.eval_shape(lambda images: vae.init(jax.random.key(0), images), x)
        return (conv_calls(run, params, x),
                f"experiments/configs/vae_mnist.py autoencoder, batch {b}")
    if name == "sd15":
        unet, b = UNet(sd15_config()), 1
        x, t = sds((b, 64, 64, 4), jnp.float32), sds((b,), jnp.int32)
        ctx = sds((b, 77, 768), jnp.float32)
        return (_unet_convs(unet, x, t, ctx),
                "Stable Diffusion 1.5 UNet (860M), batch 1, 64x64x4 latents (512 px)")
    raise ValueError(f"--models: unknown model {name!r}, expected one of {MODELS}")


def sd15_config():
    """The Stable Diffusion 1.5 UNet: diffusers' ``UNet2DConditionModel`` defaults with SD 1.5's
    768-wide text states, 8 attention heads and 64x64 latents."""
    from jaxdiff.convert import unet_config_from_diffusers
    from jaxdiff.convert.diffusers_config import UNET2D_CONDITION_DEFAULTS

    return unet_config_from_diffusers(
        {**UNET2D_CONDITION_DEFAULTS, "cross_attention_dim": 768, "attention_head_dim": 8,
         "sample_size": 64}, model_class="UNet2DConditionModel")


def _unet_convs(unet, x, t, ctx) -> collections.Counter:
    params = jax.eval_shape(lambda *a: unet.init(jax.random.key(0), a[0], a[1], context=a[2]),
                            x, t, ctx)
    return conv_calls(lambda p, *a: unet.apply(p, a[0], a[1], context=a[2]), params, x, t, ctx)


# --------------------------------------------------------------------------- forms


def native(x, w, conv: Conv):
    return jax.lax.conv_general_dilated(x, w, conv.strides, conv.padding, dimension_numbers=DN)


def _windows(x, kh: int, kw: int, conv: Conv) -> list:
    """The ``kh * kw`` shifted (strided) slices of the padded input, one per kernel tap,
    row-major, each ``[B, H', W', C]``."""
    (sh, sw), ((pt, pb), (pl, pr)) = conv.strides, conv.padding
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    h, wd = (xp.shape[1] - kh) // sh + 1, (xp.shape[2] - kw) // sw + 1
    return [xp[:, i:i + sh * (h - 1) + 1:sh, j:j + sw * (wd - 1) + 1:sw, :]
            for i in range(kh) for j in range(kw)]


def im2col(x, w, conv: Conv):
    """The same convolution as shifted slices + one matmul (1x1 stride-1: the matmul alone)."""
    kh, kw, c, f = w.shape
    cols = _windows(x, kh, kw, conv)
    cols = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
    return cols @ w.reshape(kh * kw * c, f)


def taps(x, w, conv: Conv):
    """The same convolution as a sum over the k*k kernel taps of (shifted slice) @ (tap's
    [C, F] matrix). Its autodiff weight gradient is k*k matmuls ``slice^T @ grad``: the
    "weight gradient as matrix multiplies" formulation a custom VJP would use."""
    kh, kw, _, _ = w.shape
    return sum(win @ w.reshape(kh * kw, *w.shape[2:])[k]
               for k, win in enumerate(_windows(x, kh, kw, conv)))


def native_nchw(x, w, conv: Conv):
    """The native convolution in the other layout XLA accepts: ``x: [B, C, H, W]``,
    ``w: [F, C, kh, kw]`` (timed on inputs already in that layout, so no transposes are counted:
    the best case for a model kept in NCHW)."""
    return jax.lax.conv_general_dilated(x, w, conv.strides, conv.padding,
                                        dimension_numbers=("NCHW", "OIHW", "NCHW"))


FORMS = {"native": native, "im2col": im2col, "taps": taps}  # NHWC x, HWIO kernel
NCHW_FORMS = {"nchw": native_nchw}


def picked(conv: Conv) -> str:
    """The form jaxdiff runs on the CPU today for this convolution: :class:`Conv3x3`'s rule
    (:func:`jaxdiff.models.resnet.uses_im2col`) for its 3x3 convs with torch's ``padding=1``;
    the native convolution for the rest (1x1, the VAE's padding-0 downsampler)."""
    if conv.kernel[:2] == (3, 3) and conv.padding == ((1, 1), (1, 1)):
        return "im2col" if uses_im2col(conv.x, conv.strides[0]) else "native"
    return "native"


def _median_ms(fn, reps: int) -> float:
    """Median ms of ``fn()`` over ``reps`` calls after one warm-up (jax or torch work)."""
    timed(fn)
    return 1e3 * statistics.median(timed(fn) for _ in range(reps))


def time_jax(form, conv: Conv, reps: int, opts: dict,
             nchw: bool = False) -> tuple[float, float, float]:
    """(forward, input gradient, weight gradient) ms of ``form`` on ``conv`` (``nchw``: the
    inputs are made in NCHW / OIHW before timing)."""
    key = jax.random.key(0)
    x = jax.random.normal(key, conv.x)
    w = jax.random.normal(jax.random.fold_in(key, 1), conv.kernel) * 0.1
    if nchw:
        x, w = x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1)
    g = jax.random.normal(jax.random.fold_in(key, 2),
                          jax.eval_shape(lambda a, b: form(a, b, conv), x, w).shape)
    fwd = jax.jit(lambda a, b: form(a, b, conv), compiler_options=opts)
    dx = jax.jit(lambda a, b, c: jax.vjp(lambda q: form(q, b, conv), a)[1](c)[0],
                 compiler_options=opts)
    dw = jax.jit(lambda a, b, c: jax.vjp(lambda q: form(a, q, conv), b)[1](c)[0],
                 compiler_options=opts)
    return (_median_ms(lambda: fwd(x, w), reps), _median_ms(lambda: dx(x, w, g), reps),
            _median_ms(lambda: dw(x, w, g), reps))


def time_torch(conv: Conv, reps: int) -> tuple[float, float, float]:
    import torch
    import torch.nn.functional as F

    b, h, w, c = conv.x
    kh, kw, _, f = conv.kernel
    pad = conv.padding
    x = torch.randn(b, c, h, w)
    if pad[0][0] != pad[0][1] or pad[1][0] != pad[1][1]:  # asymmetric: pad explicitly
        x = F.pad(x, (pad[1][0], pad[1][1], pad[0][0], pad[0][1]))
        pad = ((0, 0), (0, 0))
    wt = torch.randn(f, c, kh, kw) * 0.1
    kw_args = {"stride": conv.strides, "padding": (pad[0][0], pad[1][0])}
    y = F.conv2d(x, wt, **kw_args)
    g = torch.randn_like(y)

    with torch.no_grad():
        return (_median_ms(lambda: F.conv2d(x, wt, **kw_args), reps),
                _median_ms(lambda: torch.nn.grad.conv2d_input(x.shape, wt, g, **kw_args), reps),
                _median_ms(lambda: torch.nn.grad.conv2d_weight(x, wt.shape, g, **kw_args), reps))


# --------------------------------------------------------------------------- in situ


def step_share(batch: int, reps: int, opts: dict) -> tuple[float, float]:
    """ms per ``experiments/configs/mnist.py`` train step (eps-MSE, gradient, AdamW) at
    ``batch``: as is, and with the weight gradient of every 3x3 stride-1 convolution replaced by
    zeros (a ``custom_vjp`` that still computes the input gradient), so that the difference is
    what those weight gradients, with their layout transposes, cost inside the compiled step."""
    import optax

    from experiments.configs import mnist
    from experiments.mnist_lib import build_model

    unet = build_model(mnist.get_config())
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, 28, 28, 1)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)
    y = jnp.asarray(rng.integers(0, 11, batch), jnp.int32)
    params = unet.init(jax.random.key(0), x, t, labels=y)
    opt = optax.adamw(1e-4)
    conv = jax.lax.conv_general_dilated

    @jax.custom_vjp
    def no_dw(a, w):
        return conv(a, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)

    def fwd(a, w):
        return no_dw(a, w), (a, w)

    def bwd(res, g):
        a, w = res
        da = jax.vjp(lambda q: conv(q, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN),
                     a)[1](g)[0]
        return da, jnp.zeros_like(w)

    no_dw.defvjp(fwd, bwd)

    def patched(lhs, rhs, window_strides, padding, *args, **kwargs):
        if (rhs.shape[:2] == (3, 3) and tuple(window_strides) == (1, 1)
                and tuple(map(tuple, padding)) == ((1, 1), (1, 1))):
            return no_dw(lhs, rhs)
        return conv(lhs, rhs, window_strides, padding, *args, **kwargs)

    def step(p, o):
        loss = lambda q: jnp.mean((unet.apply(q, x, t, labels=y) - x) ** 2)
        value, grads = jax.value_and_grad(loss)(p)
        updates, o = opt.update(grads, o, p)
        return optax.apply_updates(p, updates), o, value

    state = (params, opt.init(params))
    # A new function object per program: jit's trace cache would otherwise hand the second one
    # the first one's trace.
    full = jax.jit(lambda *a: step(*a), compiler_options=opts).lower(*state).compile()
    jax.lax.conv_general_dilated = patched  # only while tracing the second program
    try:
        ablated = jax.jit(lambda *a: step(*a), compiler_options=opts).lower(*state).compile()
    finally:
        jax.lax.conv_general_dilated = conv
    if full.as_text() == ablated.as_text():
        raise RuntimeError("the ablation compiled to the same program")
    med = alternate({"full": lambda: full(*state), "ablated": lambda: ablated(*state)}, reps, 1)
    return 1e3 * med["full"], 1e3 * med["ablated"]


def unet_rule_ab(batch: int, reps: int, opts: dict) -> tuple[float, float, float]:
    """ms per forward+backward (gradient of a mean-square loss w.r.t. the parameters) of the
    SD 1.5 UNet at ``batch``, 64x64x4 latents: with :class:`Conv3x3`'s per-shape rule, and with
    its wide-conv branch off (``IM2COL_WIDE_MAX_PIXELS = 0``: the old rule, stride 1 and at most
    ``IM2COL_MAX_PIXELS`` pixels); and the largest relative difference of the two gradients."""
    from jaxdiff.models import UNet, init_unet
    from jaxdiff.models import resnet

    cfg = sd15_config()
    unet, params = UNet(cfg), init_unet(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, 64, 64, 4)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((batch, 77, 768)), jnp.float32)
    t = jnp.full((batch,), 500, jnp.int32)

    def grad(p):
        return jax.grad(lambda q: jnp.mean(unet.apply({"params": q}, x, t, context=ctx) ** 2))(p)

    # A new function object per program: jit's trace cache would otherwise hand the second one
    # the first one's trace.
    rule = jax.jit(lambda p: grad(p), compiler_options=opts).lower(params).compile()
    wide = resnet.IM2COL_WIDE_MAX_PIXELS
    resnet.IM2COL_WIDE_MAX_PIXELS = 0  # no image is that small: the old rule
    try:
        old = jax.jit(lambda p: grad(p), compiler_options=opts).lower(params).compile()
    finally:
        resnet.IM2COL_WIDE_MAX_PIXELS = wide
    if rule.as_text() == old.as_text():
        raise RuntimeError("the two rules compiled to the same program")
    a, b = rule(params), old(params)
    diff = max(float(jnp.abs(u - v).max() / (jnp.abs(v).max() + 1e-30))
               for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    del a, b
    med = alternate({"rule": lambda: rule(params), "old": lambda: old(params)}, reps, 0)
    return 1e3 * med["rule"], 1e3 * med["old"], diff


# --------------------------------------------------------------------------- main


def _fmt(conv: Conv) -> str:
    b, h, w, c = conv.x
    kh, kw, _, f = conv.kernel
    return f"{b}x{h}x{w}x{c} -> {f}, {kh}x{kw}/{conv.strides[0]}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated, from {','.join(MODELS)}")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no_torch", action="store_true", help="skip the torch columns")
    p.add_argument("--step_batches", default="32,128",
                   help="batches at which to time the mnist train step with and without the "
                        "3x3 weight gradients ('' to skip)")
    p.add_argument("--unet_ab", default="", choices=["", "sd15"],
                   help="sd15: time the SD 1.5 UNet's forward+backward at batch 1 with the "
                        "per-shape rule and with the old one ('' to skip)")
    args = p.parse_args(argv)
    names = [m for m in args.models.split(",") if m]
    for m in names:
        if m not in MODELS:
            p.error(f"--models: unknown model {m!r}, expected names from {','.join(MODELS)}")
    if not args.no_torch:
        import torch

        torch.set_num_threads(_threads())
    opts = cpu_compiler_options()
    print(f"Machine: {machine()}; jax {jax.__version__}" +
          ("" if args.no_torch else f", torch {__import__('torch').__version__} "
           f"(threads {__import__('torch').get_num_threads()})"))
    print(f"Median of {args.reps} after one warm-up, ms per call; fwd / dx / dW = forward, input "
          "gradient, weight gradient.")
    for name in names:
        convs, what = model_convs(name)
        print(f"\n### {name}: {what}\n")
        print("| conv (B x H x W x C -> F, k/stride) | n | pick | native fwd / dx / dW | "
              "im2col fwd / dx / dW | taps fwd / dx / dW | nchw fwd / dx / dW | "
              "torch fwd / dx / dW |")
        print("|---|---:|---|---|---|---|---|---|")
        totals = collections.defaultdict(lambda: np.zeros(3))
        for conv, n in sorted(convs.items(), key=lambda kv: (-kv[0].x[1], kv[0].x[3])):
            row = {k: np.array(time_jax(form, conv, args.reps, opts))
                   for k, form in FORMS.items()}
            row.update({k: np.array(time_jax(form, conv, args.reps, opts, nchw=True))
                        for k, form in NCHW_FORMS.items()})
            if not args.no_torch:
                row["torch"] = np.array(time_torch(conv, args.reps))
            for k, v in row.items():
                totals[k] += n * v
            totals["best"] += n * np.minimum.reduce([row[k] for k in FORMS])  # NHWC forms
            totals["pick"] += n * row[picked(conv)]
            cells = [" / ".join(f"{t:.2f}" for t in row.get(k, [np.nan] * 3))
                     for k in (*FORMS, *NCHW_FORMS, "torch")]
            print(f"| {_fmt(conv)} | {n} | {picked(conv)} | " + " | ".join(cells) + " |",
                  flush=True)
        print("\n| total over the forward pass's convolutions | fwd | dx | dW | sum |")
        print("|---|---:|---:|---:|---:|")
        for k in (*FORMS, *NCHW_FORMS, "best", "pick", "torch"):
            if k in totals:
                t = totals[k]
                print(f"| {k} | {t[0]:.1f} | {t[1]:.1f} | {t[2]:.1f} | {t.sum():.1f} |")


    batches = [int(b) for b in args.step_batches.split(",") if b]
    if batches:
        print("\n### In the compiled step: what the 3x3 weight gradients cost\n")
        print("| mnist train step, batch | as is (ms) | without 3x3 weight gradients (ms) | "
              "their share |")
        print("|---:|---:|---:|---:|")
        for b in batches:
            full, ablated = step_share(b, args.reps, opts)
            print(f"| {b} | {full:.1f} | {ablated:.1f} | {100 * (full - ablated) / full:.0f}% |",
                  flush=True)

    if args.unet_ab:
        rule, old, diff = unet_rule_ab(1, args.reps, opts)
        print(f"\n### The whole {args.unet_ab} UNet, forward + backward, batch 1\n")
        print("| im2col where | ms | speed-up | max rel. grad diff |")
        print("|---|---:|---:|---:|")
        print(f"| at most {IM2COL_MAX_PIXELS} pixels, stride 1 (the old rule) | {old:.0f} | 1.00x "
              "| |")
        print(f"| uses_im2col (the per-shape rule) | {rule:.0f} | {old / rule:.2f}x | "
              f"{diff:.1e} |")


def _threads() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
