"""LoRA as a transform of the parameter tree: ``W' = W + scale * down @ up``.

A LoRA adapter for one model is a nested dict that mirrors the model's ``"params"`` tree down to
each adapted layer, where it holds ``{"down": [..., d_in, r], "up": [r, d_out]}`` instead of the
layer's ``{"kernel", "bias"}``. The layer's kernel (a Dense ``[d_in, d_out]`` or a Conv
``[kh, kw, d_in, d_out]``, both with the output last, as Flax lays them out) gets the low-rank
update ``tensordot(down, up, 1)``, of the kernel's shape. For a whole Stable Diffusion the adapter
is ``{"unet": ..., "text_encoder": ...}``, mirroring ``StableDiffusion.params``.

Why a tree transform and not wrapped modules (flax, qwix): the models stay as they are (no
LoRA-aware layers, no method interception), the adapter is a plain pytree that Orbax checkpoints
and optax trains (the base params are simply not in the trainable tree, so optimizer state exists
only for the adapter), several adapters compose by adding their deltas, and the adapter's
addresses are the converters' addresses (``jaxdiff.convert.torch_io.torch_key``), so diffusers /
peft / kohya files map onto it by name. The merge costs ``d_in * r * d_out`` per layer, a fraction
``r / tokens`` of the layer's own matmul.

Two ways to use an adapter:

- **fused**: :func:`merge_lora` once, outside ``jit``; the model runs at its plain speed and a new
  scale means a new merge;
- **unfused**: call :func:`merge_lora` *inside* the jitted function with ``scale`` a traced
  argument (a JAX scalar): changing the scale then reuses the compiled program. Training is this
  form, with the adapter the differentiated argument.

For example:

    >>> import jax, jax.numpy as jnp
    >>> params = {"attn": {"to_q": {"kernel": jnp.ones((4, 6))}}, "norm": {"scale": jnp.ones(4)}}
    >>> lora = init_lora(params, r"to_q$", rank=2, key=jax.random.key(0))
    >>> jax.tree.map(jnp.shape, lora)
    {'attn': {'to_q': {'down': (4, 2), 'up': (2, 6)}}}
    >>> bool(jnp.all(merge_lora(params, lora, 1.0)["attn"]["to_q"]["kernel"] == 1))  # up is 0
    True
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

__all__ = [
    "UNET_ATTENTION", "UNET_FEED_FORWARD", "TEXT_ATTENTION",
    "lora_layers", "init_lora", "lora_delta", "merge_lora", "merge_loras", "check_lora",
    "lora_scale", "lora_rank", "lora_param_count", "layer_path",
]

# Regular expressions over a layer's path (``"/"``-joined Flax module names, e.g.
# ``down_blocks_1/attentions_0/transformer_blocks_0/attn1/to_q``), matched with ``re.search``.
UNET_ATTENTION = r"/attn[12]/(to_q|to_k|to_v|to_out_0)$"
"""The UNet's attention projections (self and cross attention): diffusers' LoRA scripts' targets
``to_q, to_k, to_v, to_out.0``."""
UNET_FEED_FORWARD = r"/ff/(net_0/proj|net_2)$"
"""The UNet transformer blocks' feed-forward layers (``ff.net.0.proj``, ``ff.net.2``)."""
TEXT_ATTENTION = r"/self_attn/(q_proj|k_proj|v_proj|out_proj)$"
"""The CLIP text encoder's attention projections (``q_proj, k_proj, v_proj, out_proj``)."""


def layer_path(path: Sequence[str]) -> str:
    """A layer's address as a string: ``("down_blocks_0", "attn1", "to_q")`` ->
    ``"down_blocks_0/attn1/to_q"``."""
    return "/".join(path)


def lora_layers(params: Mapping[str, Any], pattern: str | Iterable[str]) -> dict:
    """The layers a LoRA on ``pattern`` adapts: ``{layer path tuple: kernel shape}``.

    A layer is a module of ``params`` with a ``kernel`` of rank 2 (Dense) or 4 (Conv); it is
    chosen when one of the regular expressions ``pattern`` matches ``"/" + its path`` (so
    ``r"/to_q$"`` and ``r"^/mid_block/"`` anchor on whole names).

    Raises:
      ValueError: ``pattern`` is not a valid regular expression, or matches no layer (the
        message lists a few of the layers there are).
    """
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as e:
        raise ValueError(f"LoRA target pattern {patterns!r} is not a valid regular expression: "
                         f"{e}") from None
    found, kernels = {}, []
    for path, leaf in flatten_dict(dict(params)).items():
        if path[-1] != "kernel" or np.ndim(leaf) not in (2, 4):
            continue
        name = "/" + layer_path(path[:-1])
        kernels.append(name)
        if any(c.search(name) for c in compiled):
            found[path[:-1]] = tuple(np.shape(leaf))
    if not found:
        sample = ", ".join(kernels[:6]) + (", ..." if len(kernels) > 6 else "")
        raise ValueError(f"LoRA targets {patterns!r} match no layer with a kernel; the layers "
                         f"are named like: {sample}")
    return found


def init_lora(params: Mapping[str, Any], pattern: str | Iterable[str], *, rank: int,
              key: jax.Array, dtype: Any = jnp.float32) -> dict:
    """A fresh adapter on the layers :func:`lora_layers` chooses: it changes nothing yet.

    ``down`` is drawn as peft draws ``lora_A`` (uniform in ``+-1/sqrt(fan_in)``, ``fan_in`` the
    kernel's input size times its window), ``up`` is zero, so the adapted model starts equal to
    the base model.

    Args:
      params: the base model's ``"params"`` tree (arrays or ``ShapeDtypeStruct``).
      pattern: regular expression(s) naming the target layers (:data:`UNET_ATTENTION`, ...).
      rank: ``r >= 1``, at most every target layer's ``min(fan_in, d_out)``.
      key: the PRNG key for ``down`` (each layer folds in its index in sorted path order).
      dtype: the adapter's dtype (float32: it is what is trained).

    Raises:
      ValueError: a rank that is not a positive integer or larger than a target layer (naming
        the layer and its shape), or a pattern that matches nothing.
    """
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    layers = lora_layers(params, pattern)
    out = {}
    for i, (path, shape) in enumerate(sorted(layers.items())):
        fan_in, d_out = int(np.prod(shape[:-1])), shape[-1]
        if rank > min(fan_in, d_out):
            raise ValueError(f"rank {rank} is larger than layer {layer_path(path)} (kernel "
                             f"{shape}: at most {min(fan_in, d_out)})")
        bound = 1.0 / math.sqrt(fan_in)
        down = jax.random.uniform(jax.random.fold_in(key, i), (*shape[:-1], rank), dtype,
                                  -bound, bound)
        out[path] = {"down": down, "up": jnp.zeros((rank, d_out), dtype)}
    return unflatten_dict(out)


def _adapted(lora: Mapping[str, Any]) -> dict:
    """``{layer path: {"down", "up"}}`` of an adapter tree."""
    flat = flatten_dict(dict(lora))
    layers: dict = {}
    for path, leaf in flat.items():
        if path[-1] not in ("down", "up"):
            raise ValueError(f"a LoRA adapter holds only 'down' / 'up' leaves, got "
                             f"{layer_path(path)}")
        layers.setdefault(path[:-1], {})[path[-1]] = leaf
    for path, pair in layers.items():
        if len(pair) != 2:
            raise ValueError(f"LoRA layer {layer_path(path)} needs both 'down' and 'up', got "
                             f"{sorted(pair)}")
    return layers


def check_lora(params: Mapping[str, Any], lora: Mapping[str, Any]) -> None:
    """Checks that ``lora`` fits ``params``: every adapted layer exists there with a kernel, and
    ``down [..., d_in, r]`` / ``up [r, d_out]`` agree with it and with each other.

    Raises:
      ValueError: listing every layer that is missing or whose shapes disagree (an adapter for
        another architecture), with the shapes.
    """
    flat = flatten_dict(dict(params))
    problems = []
    for path, pair in sorted(_adapted(lora).items()):
        kernel = flat.get(path + ("kernel",))
        d, u = np.shape(pair["down"]), np.shape(pair["up"])
        if kernel is None:
            problems.append(f"{layer_path(path)}: no such layer with a kernel in the model")
            continue
        k = tuple(np.shape(kernel))
        if len(u) != 2 or len(d) != len(k) or d[:-1] != k[:-1] or u[1] != k[-1] or d[-1] != u[0]:
            problems.append(f"{layer_path(path)}: down {d} @ up {u} does not make the kernel "
                            f"{k}")
    if problems:
        raise ValueError(f"LoRA does not fit the model ({len(problems)} layer(s)): "
                         + "; ".join(problems))


def lora_delta(down: jax.Array, up: jax.Array) -> jax.Array:
    """``tensordot(down, up, 1)``: ``[..., d_in, r] x [r, d_out] -> [..., d_in, d_out]``, in
    float32 (or wider)."""
    dtype = jnp.promote_types(jnp.result_type(down, up), jnp.float32)
    return jnp.tensordot(down.astype(dtype), up.astype(dtype), axes=1)


def merge_loras(params: Mapping[str, Any],
                adapters: Sequence[Tuple[Mapping[str, Any], Any]]) -> dict:
    """``params`` with every adapter's delta added: ``W + sum_i scale_i * down_i @ up_i``.

    Args:
      params: the base ``"params"`` tree (not modified).
      adapters: ``(lora, scale)`` pairs; ``scale`` a Python float or a JAX scalar (traced under
        ``jit``: a new value does not recompile). Each adapter's own ``alpha / rank`` factor
        (:func:`lora_scale`) belongs in its ``scale``.

    Returns:
      A new tree like ``params``; adapted kernels keep their dtype (the sum is done in float32),
      everything else is the same array.

    Shapes are checked when tracing (:func:`check_lora`).
    """
    flat = flatten_dict(dict(params))
    deltas: dict = {}
    for lora, scale in adapters:
        check_lora(params, lora)
        for path, pair in _adapted(lora).items():
            d = jnp.asarray(scale, jnp.float32) * lora_delta(pair["down"], pair["up"])
            deltas[path] = d if path not in deltas else deltas[path] + d
    for path, d in deltas.items():
        kernel = flat[path + ("kernel",)]
        flat[path + ("kernel",)] = (kernel.astype(d.dtype) + d).astype(kernel.dtype)
    return unflatten_dict(flat)


def merge_lora(params: Mapping[str, Any], lora: Mapping[str, Any], scale: Any = 1.0) -> dict:
    """One adapter: :func:`merge_loras` with ``[(lora, scale)]``."""
    return merge_loras(params, [(lora, scale)])


def lora_scale(rank: int, alpha: float | None) -> float:
    """The update's factor ``alpha / rank`` (peft's and kohya's convention); ``alpha`` None
    means ``alpha = rank`` (factor 1)."""
    return 1.0 if alpha is None else float(alpha) / float(rank)


def lora_rank(lora: Mapping[str, Any]) -> int:
    """The largest rank among an adapter's layers."""
    return max(int(np.shape(p["up"])[0]) for p in _adapted(lora).values())


def lora_param_count(lora: Mapping[str, Any]) -> int:
    """Number of scalars in an adapter."""
    return int(sum(np.size(x) for x in jax.tree.leaves(lora)))
