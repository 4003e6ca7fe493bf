"""DPM-Solver++ (Lu et al. 2022), multistep, first or second order, as one ``lax.scan``.

Semantics follow diffusers' ``DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"``
(the data-prediction solver): timestep spacing, ``lower_order_final``, ``final_sigmas_type`` and the
``midpoint`` / ``heun`` second-order variants. The solver history (the previous step's predicted x0)
lives in the scan carry.

In the notation of the paper, with ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)`` and
``lambda_t = log(alpha_t / sigma_t)``, ``h = lambda_t - lambda_s``, the first-order update is
``x_t = sigma_t / sigma_s x_s - alpha_t (e^{-h} - 1) x0_s`` (DDIM), and the second-order multistep
update adds ``-1/2 alpha_t (e^{-h} - 1) D1`` (midpoint) with ``D1 = (x0_s - x0_{s'}) / r``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion import canonical_prediction_type
from jaxdiff.samplers.timesteps import SPACINGS
from jaxdiff.validation import check_clip, check_int
from jaxdiff.schedules import Schedule

__all__ = ["dpm_solver_timesteps", "dpm_solver_sample"]

FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


def dpm_solver_timesteps(
    schedule: Schedule,
    num_steps: int,
    *,
    spacing: str = "linspace",
    steps_offset: int = 0,
    final_sigmas_type: str = "zero",
    lambda_min_clipped: float = -float("inf"),
) -> tuple[np.ndarray, np.ndarray]:
    """Timesteps ``[N]`` int32 (descending) and sigmas ``[N + 1]`` float32, as diffusers has them.

    The grid is ``DPMSolverMultistepScheduler.set_timesteps`` (diffusers 0.42) for ``spacing`` in
    ``"linspace"``, ``"leading"`` (plus ``steps_offset``) and ``"trailing"``. ``sigma = sqrt((1 -
    abar) / abar)`` at each timestep, followed by the final sigma: ``0`` (``final_sigmas_type
    = "zero"``, the last step returns the predicted x0) or the sigma of ``t = 0`` (``"sigma_min"``).
    ``lambda_min_clipped`` drops the noisiest timesteps whose log-SNR/2 ``lambda_t`` lies below it
    (diffusers recommends -5.1 for the cosine schedule, whose last ``alpha_t`` is so small that
    converting an eps prediction to x0 loses all float32 precision).

    ``N == num_steps`` except where diffusers itself differs: ``"trailing"`` with
    ``lambda_min_clipped`` keeps diffusers' step ``T / num_steps`` from the clipped start, so gives
    fewer steps; and diffusers' float ``arange`` sometimes overshoots to ``t = -1`` there, an entry
    dropped here (as :func:`~jaxdiff.samplers.timesteps.ddim_timesteps` does).

    Raises ``ValueError`` naming the argument unless the grid is strictly decreasing inside ``[0,
    T)``. With ``T'`` the training steps left after ``lambda_min_clipped`` (``T`` by default),
    ``"leading"`` and ``"linspace"`` need ``num_steps <= T' - 1``: beyond that diffusers repeats
    timesteps (``"leading"``: ``T' // (num_steps + 1) == 0`` puts every step at ``steps_offset``),
    the solver's ``h`` is 0 and its output NaN. ``"trailing"`` works for every ``num_steps <= T``.
    Also raised: ``steps_offset`` pushing a timestep to ``>= T``, ``lambda_min_clipped`` clipping
    every timestep.
    """
    T = schedule.num_timesteps
    n = check_int("num_steps", num_steps, 1)
    if n > T:
        raise ValueError(f"num_steps must be <= num_train_timesteps ({T}), got {n}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    offset = check_int("steps_offset", steps_offset, 0)
    if final_sigmas_type not in FINAL_SIGMAS_TYPES:
        raise ValueError(
            f"final_sigmas_type must be one of {FINAL_SIGMAS_TYPES}, got {final_sigmas_type!r}"
        )
    acp = np.asarray(schedule.alphas_cumprod, dtype=np.float64)
    lambdas = 0.5 * (np.log(acp) - np.log1p(-acp))
    last_t = T - int(np.searchsorted(lambdas[::-1], lambda_min_clipped))
    if last_t < 1:
        raise ValueError(
            f"lambda_min_clipped={lambda_min_clipped} clips every timestep (max lambda_t is "
            f"{lambdas.max():.3g})"
        )
    if spacing == "linspace":
        ts = np.linspace(0, last_t - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        ratio = last_t // (n + 1)
        ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + offset
    else:
        ts = np.arange(last_t, 0, -T / n).round().astype(np.int64) - 1
        ts = ts[ts >= 0]  # diffusers' float arange can overshoot to -1 (then np.interp clamps)
    if ts.size and ts[0] >= T:
        raise ValueError(
            f"steps_offset={offset} pushes the first timestep to {int(ts[0])} >= "
            f"num_train_timesteps={T}"
        )
    if np.any(np.diff(ts) >= 0):
        raise ValueError(
            f"num_steps={n} repeats timesteps with spacing={spacing!r} over {last_t} usable "
            f"training steps (diffusers repeats them; the solver's h = 0 gives NaN): use "
            f"num_steps <= {last_t - 1} or spacing='trailing'"
        )
    all_sigmas = np.sqrt((1 - acp) / acp)
    sigmas = all_sigmas[ts]  # == diffusers' np.interp at these integer timesteps
    last = 0.0 if final_sigmas_type == "zero" else all_sigmas[0]
    return ts.astype(np.int32), np.concatenate([sigmas, [last]]).astype(np.float32)


class _Carry(NamedTuple):
    x: jax.Array
    prev_x0: jax.Array


def _alpha_sigma_lambda(sigma):
    alpha = 1.0 / jnp.sqrt(sigma**2 + 1.0)
    sig = sigma * alpha
    return alpha, sig, jnp.log(alpha) - jnp.log(sig)


def dpm_solver_sample(
    model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    schedule: Schedule,
    x_T: jax.Array,
    key: jax.Array | None = None,
    *,
    num_steps: int,
    solver_order: int = 2,
    solver_type: str = "midpoint",
    prediction_type: str = "eps",
    spacing: str = "linspace",
    steps_offset: int = 0,
    lower_order_final: bool = True,
    final_sigmas_type: str = "zero",
    lambda_min_clipped: float = -float("inf"),
    clip_x0: float | None = None,
    return_trajectory: bool = False,
):
    """Deterministic DPM-Solver++ sampling from ``x_T: [B, ...]``.

    Args:
      model_fn: ``model_fn(x [B, ...], t [B] int32) -> output [B, ...]`` of ``prediction_type``.
      x_T: ``[B, ...]`` the starting noise; carried in (at least) float32 whatever its dtype or the
        model output's (bf16 models are promoted each step, the state is never re-rounded).
      key: unused (the solver is deterministic); accepted so that every sampler has the signature
        ``(model_fn, schedule, x_T, key, *, num_steps, ...)``.
      num_steps: number of model evaluations (10-25 is typical).
      solver_order: 1 (DDIM) or 2 (DPM-Solver++(2M)).
      solver_type: ``"midpoint"`` or ``"heun"`` form of the second-order update.
      lower_order_final: use lower orders on the last steps when ``num_steps < 15``.
      spacing, steps_offset, final_sigmas_type, lambda_min_clipped: see
        :func:`dpm_solver_timesteps`.
      clip_x0: clip the predicted x0 to ``[-clip_x0, clip_x0]`` (None: no clipping).

    Returns:
      ``x_0`` ``[B, ...]`` float32 (or wider), or with ``return_trajectory`` ``(x_0, xs [N + 1,
      B, ...], pred_x0s [N, B, ...])`` (``xs[0]`` is ``x_T``), as the other samplers return.
    """
    kind = canonical_prediction_type(prediction_type)
    if solver_order not in (1, 2):
        raise ValueError(f"solver_order must be 1 or 2, got {solver_order!r}")
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    clip_x0 = check_clip(clip_x0)
    x_T = jnp.asarray(x_T)
    if x_T.ndim < 1:
        raise ValueError("x_T must be a batch [B, ...], got a scalar")
    x_T = x_T.astype(jnp.promote_types(x_T.dtype, jnp.float32))  # the carry: >= float32
    ts, sigmas = dpm_solver_timesteps(
        schedule, num_steps, spacing=spacing, steps_offset=steps_offset,
        final_sigmas_type=final_sigmas_type, lambda_min_clipped=lambda_min_clipped,
    )
    n = len(ts)
    # Which steps use the first-order update (diffusers' lower_order_final / warm-up rules).
    idx = np.arange(n)
    first = (idx == 0) | (solver_order == 1)
    first |= (idx == n - 1) & ((lower_order_final and n < 15) or final_sigmas_type == "zero")
    # A step that does not move (sigma_min after a grid ending at t = 0): first order returns x
    # exactly, where the second-order heun update would divide 0 by h = 0.
    first |= sigmas[1:] == sigmas[:-1]
    batch = x_T.shape[0]

    def step(carry: _Carry, xs):
        t, sigma_s1, sigma_s0, sigma_t, use_first = xs
        out = model_fn(carry.x, jnp.full((batch,), t, jnp.int32))
        if jnp.shape(out) != x_T.shape:
            raise ValueError(
                f"model_fn must return an output shaped like x {x_T.shape}, got {jnp.shape(out)}"
            )
        alpha_s0, sig_s0, lam_s0 = _alpha_sigma_lambda(sigma_s0)
        alpha_t, sig_t, lam_t = _alpha_sigma_lambda(sigma_t)
        _, _, lam_s1 = _alpha_sigma_lambda(sigma_s1)
        x = carry.x
        out = out.astype(x.dtype)  # a bf16 model output joins the >= float32 carry
        if kind == "eps":
            x0 = (x - sig_s0 * out) / alpha_s0
        elif kind == "x0":
            x0 = out
        else:
            x0 = alpha_s0 * x - sig_s0 * out
        if clip_x0 is not None:
            x0 = jnp.clip(x0, -clip_x0, clip_x0)
        h = lam_t - lam_s0
        phi = jnp.expm1(-h)  # e^{-h} - 1, accurate for small h
        x_first = (sig_t / sig_s0) * x - alpha_t * phi * x0
        r0 = (lam_s0 - lam_s1) / h
        d1 = (x0 - carry.prev_x0) / r0
        if solver_type == "midpoint":
            x_second = x_first - 0.5 * alpha_t * phi * d1
        else:
            x_second = x_first + alpha_t * (phi / h + 1.0) * d1
        x_next = jnp.where(use_first, x_first, x_second).astype(x.dtype)
        return _Carry(x_next, x0), (x_next, x0)

    sig = jnp.asarray(sigmas)
    xs = (
        jnp.asarray(ts),
        jnp.concatenate([sig[:1], sig[:-2]]),  # sigma of the step before (unused at step 0)
        sig[:-1],
        sig[1:],
        jnp.asarray(first),
    )
    init = _Carry(x_T, jnp.zeros(x_T.shape, x_T.dtype))
    final, (traj, pred_x0s) = jax.lax.scan(step, init, xs)
    if return_trajectory:
        return final.x, jnp.concatenate([x_T[None], traj]), pred_x0s
    return final.x
