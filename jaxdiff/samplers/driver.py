"""The one scan driver every sampler runs on.

A sampler supplies a host-side grid (:class:`~jaxdiff.samplers.timesteps.Grid`) and a scan body
``body(state, x, i, z) -> (state, x_next, pred_x0)``; :func:`run_scan` does the rest, the same way
for every sampler:

- ``x_T`` is checked (a batch ``[B, ...]``) and promoted to at least float32: the carry is never
  re-rounded to bf16 between steps, whatever the model's dtype;
- per-step noise: step ``i`` draws ``jax.random.normal(fold_in(key, i), x.shape, x.dtype)``, or
  reads ``noise[i]`` from a pre-drawn ``[N, B, ...]`` array; a stochastic sampler without either
  raises;
- :func:`checked_model` broadcasts the step's timestep to ``[B]`` and checks the model output's
  shape at trace time;
- the trajectory, when asked for, is ``(x_0, xs [N + 1, B, ...], pred_x0s [N, B, ...])`` with
  ``xs[0] = x_T``;
- ``start_step = s > 0`` runs only the grid's tail, steps ``s .. N - 1`` (image-to-image: ``x_T``
  is then the sample already noised to step ``s``); the noise, the trajectory and the step count
  are then those of the ``N - s`` steps that run, and step ``i`` still draws from
  ``fold_in(key, i)`` with ``i`` its index in the whole grid. ``start_step`` is internal: the
  samplers take ``strength`` and compute it with :func:`strength_start_step`;
- a deterministic sampler accepts ``noise`` too: it is shape-checked and unused, so that callers
  serving every sampler pass it uniformly;
- ``after_step(x_next, i) -> x_next``, when given, rewrites each step's output before it becomes
  the next step's input (and the trajectory's entry): 4-channel inpainting blends the known
  region back in there (:mod:`jaxdiff.pipelines.inpaint`). Samplers that forward it declare
  :attr:`~jaxdiff.samplers.spec.SamplerSpec.after_step`.

The whole trajectory is one ``lax.scan``: one XLA computation, no host round-trip per step.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxdiff.types import ModelFn
from jaxdiff.validation import check_float, check_int

__all__ = ["prepare_x_T", "prepare_noise", "checked_model", "run_scan", "check_start_step",
           "strength_start_step"]


def strength_start_step(num_steps: int, strength: float) -> int:
    """The first grid step that runs for image-to-image ``strength`` (diffusers'
    ``get_timesteps``): ``num_steps - min(int(num_steps * strength), num_steps)``; 0 for
    ``strength = 1`` (text-to-image).

    >>> strength_start_step(10, 0.55), strength_start_step(10, 1.0)
    (5, 0)

    Raises:
      ValueError: naming ``strength`` unless it lies in ``(0, 1]`` and keeps at least one step
        (``int(num_steps * strength) >= 1``); naming ``num_steps`` unless it is an int >= 1.
    """
    n = check_int("num_steps", num_steps, 1)
    strength = check_float("strength", strength, minimum=0.0, maximum=1.0)
    kept = min(int(n * strength), n)
    if kept < 1:
        raise ValueError(
            f"strength={strength} keeps no step of num_steps={n} (int(num_steps * strength) = 0):"
            f" use strength >= {1.0 / n:.4g}"
        )
    return n - kept


def check_start_step(start_step: Any, num_steps: int) -> int:
    """``start_step`` as an int in ``[0, num_steps)`` (the first grid step that runs); else
    ``ValueError`` naming it."""
    return check_int("start_step", start_step, 0, num_steps - 1)


def prepare_x_T(x_T: Any) -> jax.Array:
    """``x_T`` as an array of rank >= 1 in at least float32 (the carry dtype)."""
    x_T = jnp.asarray(x_T)
    if x_T.ndim < 1:
        raise ValueError(f"x_T must be a batch [B, ...], got shape {x_T.shape}")
    if not jnp.issubdtype(x_T.dtype, jnp.floating):
        raise ValueError(f"x_T must be a floating-point array, got dtype {x_T.dtype}")
    return x_T.astype(jnp.promote_types(x_T.dtype, jnp.float32))


def prepare_noise(
    noise: Any, key: jax.Array | None, num_steps: int, x_T: jax.Array, *, stochastic: bool
) -> jax.Array | None:
    """Validate the source of a stochastic sampler's noise; returns ``noise`` as an array or None.

    A stochastic sampler needs ``key`` or ``noise: [num_steps, *x_T.shape]``; a deterministic one
    needs neither (a given ``noise`` is then still shape-checked, and unused).
    """
    if noise is not None:
        noise = jnp.asarray(noise, x_T.dtype)
        if noise.shape != (num_steps, *x_T.shape):
            raise ValueError(
                f"noise must have shape (num_steps, *x_T.shape) = {(num_steps, *x_T.shape)}, "
                f"got {noise.shape}"
            )
        return noise
    if stochastic and key is None:
        raise ValueError("key is required by a stochastic sampler when no noise is given")
    return None


def checked_model(model_fn: ModelFn, out_shape: tuple) -> Callable[[jax.Array, Any], jax.Array]:
    """``fn(x, t)`` calling ``model_fn(x, t [B])`` (a scalar ``t`` broadcast over the batch, int32
    for integer timesteps) and raising at trace time unless the output has shape ``out_shape``."""

    def fn(x: jax.Array, t: Any) -> jax.Array:
        t = jnp.asarray(t)
        if jnp.issubdtype(t.dtype, jnp.integer):
            t = t.astype(jnp.int32)
        out = model_fn(x, jnp.broadcast_to(t, (x.shape[0],)))
        if jnp.shape(out) != tuple(out_shape):
            raise ValueError(
                f"model_fn's output must have shape {tuple(out_shape)}, got {jnp.shape(out)}"
            )
        return out

    return fn


def run_scan(
    body: Callable[[Any, jax.Array, jax.Array, jax.Array | None], tuple],
    init_state: Any,
    x_T: jax.Array,
    key: jax.Array | None,
    num_steps: int,
    *,
    stochastic: bool,
    noise: jax.Array | None = None,
    return_trajectory: bool = False,
    start_step: int = 0,
    after_step: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
):
    """Run ``body`` over ``num_steps`` steps in one ``lax.scan``.

    Args:
      body: ``body(state, x, i, z) -> (state, x_next, pred_x0)`` where ``i`` is the traced step
        index (``int32``, to index the grid), ``z`` the step's standard normal noise ``[B, ...]``
        (``None`` for a deterministic sampler), ``x``/``x_next`` the carry ``[B, ...]``.
      init_state: the solver history pytree (``None`` for one-step samplers).
      x_T: ``[B, ...]`` from :func:`prepare_x_T`.
      key: PRNG key; step ``i`` draws from ``fold_in(key, i)``.
      num_steps: ``N``, the grid length.
      stochastic: whether ``body`` consumes noise.
      noise: optional pre-drawn ``[N - start_step, B, ...]`` (:func:`prepare_noise`), used
        instead of ``key``.
      return_trajectory: also return the path.
      start_step: ``0 <= s < N``: run steps ``s .. N - 1`` only (``x_T`` is the sample at step
        ``s``).
      after_step: optional ``after_step(x_next, i) -> x_next`` (same shape) applied to each
        step's output, ``i`` the step's index in the whole grid; ``None``: the identity.

    Returns:
      ``x_0 [B, ...]`` in ``x_T``'s dtype; with ``return_trajectory`` ``(x_0, xs [M + 1, B, ...],
      pred_x0s [M, B, ...])``, ``M = N - start_step``.
    """
    start = check_start_step(start_step, num_steps)
    noise = prepare_noise(noise, key, num_steps - start, x_T, stochastic=stochastic)

    def step(carry, xs):
        state, x = carry
        i = xs[0]
        z = None
        if stochastic:
            z = xs[1] if noise is not None else jax.random.normal(
                jax.random.fold_in(key, i), x.shape, x.dtype
            )
        state, x_next, pred_x0 = body(state, x, i, z)
        x_next = x_next.astype(x.dtype)
        if after_step is not None:
            x_next = after_step(x_next, i).astype(x.dtype)
        return (state, x_next), ((x_next, pred_x0) if return_trajectory else None)

    xs = (jnp.arange(start, num_steps, dtype=jnp.int32),)
    if stochastic and noise is not None:
        xs = xs + (noise,)
    (_, x_0), traj = jax.lax.scan(step, (init_state, x_T), xs)
    if not return_trajectory:
        return x_0
    path, pred_x0s = traj
    return x_0, jnp.concatenate([x_T[None], path]), pred_x0s
