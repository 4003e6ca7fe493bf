"""DDIM (Song et al. 2021): a step function and one ``lax.scan`` over the timesteps.

Matches ``diffusers.DDIMScheduler`` (0.42): the same timestep grids (:func:`ddim_timesteps`), the
same ``prev_timestep = t - T // num_steps``, ``set_alpha_to_one`` for the final step, clipping of
the predicted ``x0`` and ``use_clipped_model_output``. ``eta = 0`` is deterministic; ``eta = 1`` is
DDPM-like ancestral sampling on the sub-sequence.

Clipping: with ``clip_x0`` and the default ``use_clipped_model_output=False`` (diffusers'
default, kept for parity) the update combines the clipped ``x0`` with the model's unclipped eps,
two predictions that disagree wherever clipping bites. On schedules whose early ``x0`` predictions
lie far outside the data range (cosine, near ``T``) this degrades samples as ``num_steps`` grows:
see the README's results for the MNIST model of ``experiments/``
(``python -m experiments.eval_sweep --ddim_clip diffusers``). Pass
``use_clipped_model_output=True`` whenever you clip.

    >>> sample = jax.jit(lambda p, x: ddim_sample(partial(apply, p), sched, x, num_steps=50))
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxdiff.diffusion import canonical_prediction_type
from jaxdiff.samplers.timesteps import ddim_timesteps, gather
from jaxdiff.validation import check_clip, check_nonnegative_float, check_timestep, concrete
from jaxdiff.schedules import Schedule

__all__ = ["ddim_step", "ddim_sample"]

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def _x0_eps(model_output, x_t, a_t, prediction_type):
    """``(pred_x0, pred_eps)`` from a model output, in diffusers' operation order."""
    b_t = 1.0 - a_t
    if prediction_type == "eps":
        return (x_t - jnp.sqrt(b_t) * model_output) / jnp.sqrt(a_t), model_output
    if prediction_type == "x0":
        return model_output, (x_t - jnp.sqrt(a_t) * model_output) / jnp.sqrt(b_t)
    return (
        jnp.sqrt(a_t) * x_t - jnp.sqrt(b_t) * model_output,
        jnp.sqrt(a_t) * model_output + jnp.sqrt(b_t) * x_t,
    )


def ddim_step(
    schedule: Schedule,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array | int,
    t_prev: jax.Array | int,
    noise: jax.Array | None,
    *,
    eta: float | jax.Array,
    prediction_type: str,
    clip_x0: float | None,
    set_alpha_to_one: bool,
    use_clipped_model_output: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """One DDIM update ``x_t -> x_{t_prev}`` (``DDIMScheduler.step``).

    Args:
      schedule: the training schedule (``[T]`` arrays).
      model_output: ``[B, ...]`` like ``x_t``: eps, x0 or v by ``prediction_type``.
      x_t: ``[B, ...]`` the current sample.
      t: 0-d int timestep in ``[0, T)``; t_prev: 0-d int, negative for the final step (then
        ``alpha_cumprod_prev`` is 1 with ``set_alpha_to_one``, else ``alphas_cumprod[0]``). Concrete
        out-of-range values raise; traced ones read NaN. Non-integer dtypes and non-scalar shapes
        (a ``[B]`` t would broadcast against the channel axis) raise ``ValueError``.
      noise: ``[B, ...]`` standard normal noise, used when ``eta > 0`` (may be ``None`` at
        ``eta == 0``).
      eta: ``>= 0``; may be traced (then noise is always required and scaled by ``std = 0`` at 0).
      prediction_type: ``"eps"``/``"epsilon"``, ``"x0"``/``"sample"`` or ``"v"``/``"v_prediction"``.
      clip_x0: clip the predicted ``x0`` to ``[-clip_x0, clip_x0]``; ``None`` for no clipping.
      use_clipped_model_output: re-derive eps from the clipped ``x0`` (GLIDE).

    Returns:
      ``(x_prev, pred_x0)``, both ``[B, ...]``; ``x_prev`` has ``x_t``'s dtype (computed in at
      least float32).
    """
    prediction_type = canonical_prediction_type(prediction_type)
    clip_x0 = check_clip(clip_x0)
    T = schedule.num_timesteps
    check_timestep("t", t, T)
    check_timestep("t_prev", t_prev, T, allow_negative=True)
    if model_output.shape != x_t.shape:
        raise ValueError(
            f"model_output must have x_t's shape {x_t.shape}, got {model_output.shape}"
        )
    if concrete(eta) is not None:
        eta = check_nonnegative_float("eta", eta)
    stochastic = not isinstance(eta, float) or eta > 0
    if stochastic:
        if noise is None:
            raise ValueError("noise is required when eta > 0 (or eta is traced)")
        if noise.shape != x_t.shape:
            raise ValueError(f"noise must have x_t's shape {x_t.shape}, got {noise.shape}")

    dtype = jnp.promote_types(x_t.dtype, jnp.float32)  # compute in >= float32 (bf16 models)
    out_dtype = x_t.dtype
    x_t, model_output = x_t.astype(dtype), model_output.astype(dtype)
    acp = schedule.alphas_cumprod
    final_alpha = jnp.float32(1.0) if set_alpha_to_one else acp[0]
    t_prev = jnp.asarray(t_prev)
    a_t = gather(acp, t)
    # Gather at max(t_prev, 0): the final step's negative t_prev is never read (checkify flags it).
    a_prev = jnp.where(t_prev >= 0, gather(acp, jnp.maximum(t_prev, 0)), final_alpha)
    b_t = 1.0 - a_t
    b_prev = 1.0 - a_prev

    pred_x0, pred_eps = _x0_eps(model_output, x_t, a_t, prediction_type)
    if clip_x0 is not None:
        pred_x0 = jnp.clip(pred_x0, -clip_x0, clip_x0)
    variance = (b_prev / b_t) * (1.0 - a_t / a_prev)
    std = eta * jnp.sqrt(variance)
    if use_clipped_model_output:
        pred_eps = (x_t - jnp.sqrt(a_t) * pred_x0) / jnp.sqrt(b_t)
    direction = jnp.sqrt(1.0 - a_prev - std**2) * pred_eps
    x_prev = jnp.sqrt(a_prev) * pred_x0 + direction
    if stochastic:
        x_prev = x_prev + std * noise
    return x_prev.astype(out_dtype), pred_x0


def ddim_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    x_T: jax.Array,
    key: jax.Array | None = None,
    *,
    num_steps: int,
    eta: float = 0.0,
    spacing: str = "leading",
    steps_offset: int = 0,
    set_alpha_to_one: bool = True,
    prediction_type: str = "eps",
    clip_x0: float | None = None,
    use_clipped_model_output: bool = False,
    noise: jax.Array | None = None,
    return_trajectory: bool = False,
):
    """Sample with DDIM in one ``lax.scan`` over ``num_steps`` timesteps.

    Args:
      model_fn: ``model_fn(x: [B, ...], t: [B] int32) -> [B, ...]`` (eps, x0 or v).
      schedule: the training schedule; ``T = schedule.num_timesteps``.
      x_T: ``[B, ...]`` the starting noise; the scan carries it in (at least) float32, so a bf16
        ``x_T`` or model output is never re-rounded to bf16 between steps.
      key: a PRNG key, required when ``eta > 0`` and ``noise`` is None (step ``i`` draws from
        ``fold_in(key, i)``); ignored otherwise.
      num_steps: ``1 <= num_steps <= T``. eta: a concrete float ``>= 0``.
      spacing, steps_offset: the timestep grid (:func:`ddim_timesteps`).
      set_alpha_to_one, prediction_type, clip_x0, use_clipped_model_output: see :func:`ddim_step`.
      noise: optional ``[num_steps, B, ...]`` pre-drawn noise used instead of drawing from ``key``.
      return_trajectory: also return the path.

    Returns:
      ``x_0: [B, ...]`` float32 (or wider); with ``return_trajectory``, ``(x_0, xs, pred_x0s)``
      where ``xs: [num_steps + 1, B, ...]`` holds ``x_T`` then every step's output and ``pred_x0s:
      [num_steps, B, ...]`` every step's predicted ``x0``.
    """
    prediction_type = canonical_prediction_type(prediction_type)
    eta = check_nonnegative_float("eta", eta)
    clip_x0 = check_clip(clip_x0)
    ts, ts_prev = ddim_timesteps(schedule.num_timesteps, num_steps, spacing, steps_offset)
    x_T = jnp.asarray(x_T)
    if x_T.ndim < 1:
        raise ValueError(f"x_T must have a batch axis, got shape {x_T.shape}")
    x_T = x_T.astype(jnp.promote_types(x_T.dtype, jnp.float32))  # the carry: >= float32
    stochastic = eta > 0
    if noise is not None:
        noise = jnp.asarray(noise, x_T.dtype)
        if noise.shape != (len(ts), *x_T.shape):
            raise ValueError(
                f"noise must have shape (num_steps, *x_T.shape) = {(len(ts), *x_T.shape)}, "
                f"got {noise.shape}"
            )
    elif stochastic and key is None:
        raise ValueError("key is required when eta > 0 and no noise is given")
    batch = x_T.shape[0]

    def body(x, xs):
        t, t_prev, i = xs[:3]
        out = model_fn(x, jnp.full((batch,), t, jnp.int32))
        if out.shape != x.shape:
            raise ValueError(f"model_fn's output must have x's shape {x.shape}, got {out.shape}")
        z = None
        if stochastic:
            z = xs[3] if noise is not None else jax.random.normal(
                jax.random.fold_in(key, i), x.shape, x.dtype
            )
        x_prev, pred_x0 = ddim_step(
            schedule, out, x, t, t_prev, z,
            eta=eta, prediction_type=prediction_type, clip_x0=clip_x0,
            set_alpha_to_one=set_alpha_to_one, use_clipped_model_output=use_clipped_model_output,
        )
        return x_prev, ((x_prev, pred_x0) if return_trajectory else None)

    xs = (jnp.asarray(ts), jnp.asarray(ts_prev), jnp.arange(len(ts), dtype=jnp.int32))
    if stochastic and noise is not None:
        xs = xs + (noise,)
    x_0, traj = jax.lax.scan(body, x_T, xs)
    if not return_trajectory:
        return x_0
    path, pred_x0s = traj
    return x_0, jnp.concatenate([x_T[None], path]), pred_x0s
