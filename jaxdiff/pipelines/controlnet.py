"""ControlNet in the Stable Diffusion pipeline: loading a diffusers ``ControlNetModel`` folder
(:func:`load_controlnet`), checking and preparing :func:`~jaxdiff.pipelines.generate`'s
ControlNet arguments (:func:`prepare_controlnets`), the per-step window
(:func:`controlnet_keep`) and the residuals inside the jitted program
(:func:`controlnet_residuals`), as diffusers' ``StableDiffusionControlNetPipeline``.

A ControlNet is ``(config, params)``: a :class:`~jaxdiff.models.ControlNetConfig` and its
``"params"`` tree. Several ControlNets (diffusers' ``MultiControlNetModel``) are a list of them,
with one control image, scale and window each; their residuals are summed.

Control images are preprocessed as diffusers' control image processor does
(``VaeImageProcessor(do_normalize=False)``): ``[B, H, W, C]`` / ``[H, W, C]`` uint8 (0-255) or
float in ``[0, 1]`` (:func:`~jaxdiff.pipelines.prepare_image`), RESIZED (nearest neighbour, as
diffusers resizes arrays) to the generation's ``height`` x ``width`` (a wrong size is resized,
not an error; ``height`` / ``width`` default to the first control image's size rounded down to
a multiple of 8), kept in ``[0, 1]``; a batch of one is repeated over the prompts.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.convert.diffusers_controlnet import (
    controlnet_config_from_diffusers,
    convert_controlnet_state_dict,
)
from jaxdiff.models.controlnet import ControlNet
from jaxdiff.models.controlnet_config import ControlNetConfig
from jaxdiff.models.controlnet_unet import check_controlnet_matches_unet
from jaxdiff.models.unet_config import UNetConfig
from jaxdiff.pipelines.checkpoint_files import read_config, read_weights
from jaxdiff.pipelines.images import prepare_image
from jaxdiff.validation import check_float

__all__ = ["ControlInputs", "controlnet_keep", "controlnet_residuals", "load_controlnet",
           "prepare_controlnets"]


def load_controlnet(folder: str, *, dtype: Any = jnp.float32,
                    variant: str | None = None) -> tuple[ControlNetConfig, dict]:
    """A diffusers ``ControlNetModel`` folder (``config.json`` and
    ``diffusion_pytorch_model[.<variant>].safetensors`` / ``.bin``, or a sharded index) ->
    ``(config, params)`` for :func:`~jaxdiff.pipelines.generate`'s ``controlnet=``.

    Args:
      folder: the folder ``ControlNetModel.save_pretrained`` wrote.
      dtype: the compute and parameter dtype (float32, bfloat16 or float16).
      variant: the weights variant (``"fp16"``: ``diffusion_pytorch_model.fp16.safetensors``).

    Raises:
      ValueError: one line naming the folder: not a folder, no / unreadable ``config.json``,
        a ``_class_name`` other than ``ControlNetModel``, an unsupported config option, no
        weights file (listing what was looked for), weights that do not fit the config.
    """
    if not isinstance(folder, (str, os.PathLike)) or not os.path.isdir(folder):
        raise ValueError(f"controlnet: {folder!r} is not a folder (a diffusers ControlNetModel "
                         "folder holds config.json and diffusion_pytorch_model.safetensors)")
    folder = os.fspath(folder)
    if jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    raw = read_config(os.path.join(folder, "config.json"), "controlnet")
    cls = raw.get("_class_name", "ControlNetModel")
    if cls != "ControlNetModel":
        raise ValueError(f"controlnet: {folder}/config.json is a {cls}, not a ControlNetModel")
    try:
        config = controlnet_config_from_diffusers(raw, dtype=dtype, param_dtype=dtype)
    except ValueError as e:
        raise ValueError(f"controlnet: {folder}/config.json: {e}") from None
    state = read_weights(folder, ("diffusion_pytorch_model",), variant)
    try:
        params = convert_controlnet_state_dict(state, config)
    except ValueError as e:
        raise ValueError(f"controlnet: {folder}: weights: {e}") from None
    return config, params


def controlnet_keep(num_steps: int, start: float, end: float) -> np.ndarray:
    """``[num_steps]`` float32, 1 where step ``i`` lies in the window ``[start, end]`` of the
    schedule, else 0: diffusers' ``controlnet_keep``, ``1 - (i / N < start or (i + 1) / N >
    end)``."""
    i = np.arange(num_steps)
    off = (i / num_steps < start) | ((i + 1) / num_steps > end)
    return (1.0 - off).astype(np.float32)


class ControlInputs(NamedTuple):
    """Checked ControlNet inputs: ``configs`` (static, part of the program key) and ``args``
    (the program's ``control`` argument: ``{"params": [...], "images": [...], "scales": [n],
    "keep": [n, N]}``)."""

    configs: tuple[ControlNetConfig, ...]
    guess_mode: bool
    args: dict
    height: int
    width: int


def _per_net(name: str, value: Any, n: int, multi: bool) -> list:
    if multi and isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} ControlNets")
        return list(value)
    return [value] * n


def _check_window(starts: list, ends: list) -> None:
    for k, (s, e) in enumerate(zip(starts, ends)):
        s = check_float("control_guidance_start", s, minimum=0.0, maximum=1.0)
        e = check_float("control_guidance_end", e, minimum=0.0, maximum=1.0)
        if s >= e:
            raise ValueError(f"control_guidance_start ({s}) must be smaller than "
                             f"control_guidance_end ({e}) (ControlNet {k})")


def prepare_controlnets(
    unet_config: UNetConfig, controlnet: Any, control_image: Any, *, scale: Any,
    guess_mode: bool, start: Any, end: Any, batch: int, num_steps: int, multiple: int,
    height: int | None, width: int | None,
) -> ControlInputs:
    """Check :func:`~jaxdiff.pipelines.generate`'s ControlNet arguments and prepare the control
    images (module docstring). ``controlnet``: ``(config, params)`` or a list of them;
    ``control_image``: one image for one ControlNet, a list of one per ControlNet for several;
    ``scale``, ``start``, ``end``: a number for all, or one per ControlNet.

    Raises:
      ValueError: naming the argument: ``controlnet`` not of that form; a ControlNet that does
        not fit the UNet (:func:`~jaxdiff.models.check_controlnet_matches_unet`); a count of
        control images (scales, window ends) other than the ControlNets'; a control image of
        the wrong rank, channels, dtype or range, or a batch neither 1 nor the prompts';
        a window outside ``[0, 1]`` or with ``start >= end``; ``guess_mode`` not a bool.
    """
    single = (isinstance(controlnet, tuple) and len(controlnet) == 2
              and isinstance(controlnet[0], ControlNetConfig))
    nets = [controlnet] if single else controlnet
    if isinstance(nets, tuple):
        nets = list(nets)
    if not isinstance(nets, list) or not nets:
        raise ValueError("controlnet must be (config, params) (load_controlnet) or a non-empty "
                         "list of them")
    for k, net in enumerate(nets):
        if not (isinstance(net, (tuple, list)) and len(net) == 2
                and isinstance(net[0], ControlNetConfig)):
            raise ValueError(f"controlnet[{k}] must be (ControlNetConfig, params) "
                             f"(load_controlnet), got {type(net).__name__}")
        try:
            check_controlnet_matches_unet(net[0], unet_config)
        except ValueError as e:
            raise ValueError(f"controlnet{'' if single else f'[{k}]'}: {e}") from None
    n, multi = len(nets), not single
    if control_image is None:
        raise ValueError("controlnet needs control_image")
    if multi:
        if not isinstance(control_image, (list, tuple)):
            raise ValueError(f"control_image must be a list of {n} images for {n} ControlNets, "
                             f"got {type(control_image).__name__}")
        if len(control_image) != n:
            raise ValueError(f"control_image has {len(control_image)} images for {n} "
                             "ControlNets (one each)")
        images = list(control_image)
    else:
        images = [control_image]
    if not isinstance(guess_mode, (bool, np.bool_)):
        raise ValueError(f"guess_mode must be a bool, got {guess_mode!r}")
    scales = [check_float("controlnet_conditioning_scale", s)
              for s in _per_net("controlnet_conditioning_scale", scale, n, multi)]
    starts = _per_net("control_guidance_start", start, n, multi)
    ends = _per_net("control_guidance_end", end, n, multi)
    _check_window(starts, ends)
    prepared = []
    for k, (img, (cfg, _)) in enumerate(zip(images, nets)):
        name = "control_image" if single else f"control_image[{k}]"
        if height is None:
            first = prepare_image(img, channels=cfg.conditioning_channels, multiple=multiple,
                                  name=name)
            height, width = first.shape[1:3]
        arr = prepare_image(img, channels=cfg.conditioning_channels, multiple=multiple,
                            height=height, width=width, name=name)
        if arr.shape[0] == 1 and batch > 1:
            arr = np.repeat(arr, batch, axis=0)
        if arr.shape[0] != batch:
            raise ValueError(f"{name} has batch {arr.shape[0]} for {batch} prompts (give 1 or "
                             f"{batch})")
        prepared.append(arr)
    # diffusers: guess mode whenever the (first) ControlNet pools its conditions globally
    guess = bool(guess_mode) or nets[0][0].global_pool_conditions
    keep = np.stack([controlnet_keep(num_steps, float(s), float(e))
                     for s, e in zip(starts, ends)])
    args = {"params": [p for _, p in nets], "images": prepared,
            "scales": np.asarray(scales, np.float32), "keep": keep}
    return ControlInputs(tuple(c for c, _ in nets), guess, args, int(height), int(width))


def controlnet_residuals(configs: Sequence[ControlNetConfig], guess_mode: bool, guided: bool,
                         grid: np.ndarray, control: dict, x: jax.Array, t: jax.Array,
                         inputs: dict) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """The summed residuals of the ControlNets for one UNet call (inside the program).

    Args:
      configs, guess_mode: as :class:`ControlInputs`.
      guided: ``x`` is the guided batch ``[cond; uncond]`` (``2B`` rows, the conditional first,
        as :func:`~jaxdiff.samplers.classifier_free_guidance` stacks them).
      grid: ``[N]`` the sampler's timesteps; the step of a call is that of the nearest grid
        timestep (its ``keep`` row entry scales the ControlNet).
      control: :class:`ControlInputs`' ``args`` (arrays).
      x, t: the UNet's latents ``[N', h, w, C]`` and timesteps (scalar or ``[N']``).
      inputs: ``context`` (and ``added_cond``) for the ControlNets, batch ``N'``.

    With ``guess_mode`` and ``guided`` the ControlNets see the conditional half only and the
    unconditional half's residuals are zero (diffusers' guess mode); otherwise every row, the
    control images repeated for both halves.
    """
    rows = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t), (rows,))
    step = jnp.argmin(jnp.abs(jnp.asarray(grid, jnp.float32) - t[0].astype(jnp.float32)))
    half = guided and guess_mode
    if half:
        b = rows // 2
        x, t = x[:b], t[:b]
        inputs = jax.tree.map(lambda a: a[:b], inputs)
    down = mid = None
    for k, cfg in enumerate(configs):
        image = control["images"][k].astype(cfg.unet.dtype)
        if guided and not guess_mode:
            image = jnp.concatenate([image, image], axis=0)
        scale = control["scales"][k] * control["keep"][k, step]
        d, m = ControlNet(cfg).apply({"params": control["params"][k]}, x.astype(cfg.unet.dtype),
                                     t, image, conditioning_scale=scale,
                                     guess_mode=guess_mode, **inputs)
        down = list(d) if down is None else [a + r for a, r in zip(down, d)]
        mid = m if mid is None else mid + m
    if half:
        down = [jnp.concatenate([r, jnp.zeros_like(r)], axis=0) for r in down]
        mid = jnp.concatenate([mid, jnp.zeros_like(mid)], axis=0)
    return tuple(down), mid
