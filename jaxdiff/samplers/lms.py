"""Linear multistep (LMS, Karras et al. 2022's k-diffusion ``sample_lms``) in sigma space, as one
``lax.scan``: diffusers' ``LMSDiscreteScheduler`` (0.42).

The sigma-space contract of :mod:`~jaxdiff.samplers.euler` (``x_T`` standard normal, scaled by
``init_noise_sigma`` here; the model sees ``x / sqrt(sigma^2 + 1)`` at the grid's fractional
float32 timestep; the result is ``x_0``). The grid is :func:`~jaxdiff.samplers.sigmas.sigma_grid`
(timestep spacing, ``steps_offset``, Karras / exponential / beta sigmas) ending at sigma 0.

The method. Each step turns the model output into the ODE derivative ``d_i = (x - x0_i) /
sigma_i`` (``x0_i`` from :func:`~jaxdiff.samplers.euler.sigma_x0`) and moves along the polynomial
through the last ``q_i = min(i + 1, order)`` derivatives, as functions of sigma::

    x_{i+1} = x_i + sum_{j < q_i} c_{i,j} d_{i-j},
    c_{i,j} = integral from sigma_i to sigma_{i+1} of  prod_{k < q_i, k != j}
              (tau - sigma_{i-k}) / (sigma_{i-j} - sigma_{i-k})  d tau

(the Lagrange basis on the nodes ``sigma_i, ..., sigma_{i-q_i+1}``; ``order = 1`` is Euler).
diffusers integrates these with ``scipy.integrate.quad``; :func:`lms_coefficients` integrates the
polynomials exactly (numpy polynomial arithmetic in float64) for the whole grid on the host,
before the scan, which then reads row ``i`` of the ``[N, order]`` table.

Image-to-image (``strength < 1``) follows diffusers after ``set_begin_index(s)``: the history
starts empty at step ``s`` while ``q_i`` still counts from the grid's first step, so the first
tail steps use the leading coefficients of the higher-order basis on the derivatives they have
(the missing ones are zeros in :class:`LMSState`).

    >>> from jaxdiff.schedules import make_schedule
    >>> sched = make_schedule("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)
    >>> x0 = lms_sample(lambda x, t: 0.1 * x, sched, jnp.ones((1, 4)), num_steps=10)
    >>> x0.shape, x0.dtype
    ((1, 4), dtype('float32'))
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion import canonical_prediction_type
from jaxdiff.samplers.diffusers_names import (
    K_DIFFUSION_DEFAULTS,
    K_DIFFUSION_OPTIONS,
    SCHEDULE_KEYS_NO_RESCALE,
    sigma_schedule_option,
)
from jaxdiff.samplers.driver import checked_model, prepare_x_T, run_scan, strength_start_step
from jaxdiff.samplers.euler import sigma_x0
from jaxdiff.samplers.sigmas import init_noise_sigma, scale_model_input, sigma_grid
from jaxdiff.samplers.spec import DiffusersTwin, SamplerSpec
from jaxdiff.samplers.timesteps import Grid
from jaxdiff.schedules import Schedule
from jaxdiff.types import ModelFn
from jaxdiff.validation import check_int

__all__ = [
    "LMSState",
    "lms_timesteps",
    "lms_coefficients",
    "lms_init",
    "lms_step",
    "lms_sample",
    "LMS",
    "SPECS",
]


class LMSState(NamedTuple):
    """The multistep history carried between :func:`lms_step` calls.

    Attributes:
      derivatives: ``[order - 1, B, ...]`` the previous steps' ODE derivatives ``(x - x0) /
        sigma``, newest first; zeros where no step has run yet (a zero derivative adds nothing,
        which is how diffusers' shorter history enters the sum).
    """

    derivatives: jax.Array


def lms_timesteps(
    schedule: Schedule,
    num_steps: int,
    *,
    spacing: str = "linspace",
    steps_offset: int = 0,
    sigma_schedule: str = "discrete",
) -> Grid:
    """The grid of ``LMSDiscreteScheduler.set_timesteps``: fractional float32 ``timesteps [N]``,
    ``sigmas [N + 1]`` ending at 0 (:func:`~jaxdiff.samplers.sigmas.sigma_grid`; see there for
    the arguments).

    Raises:
      ValueError: naming the argument, for a bad ``num_steps``, ``spacing`` (``"linspace"``,
        ``"leading"``, ``"trailing"``), ``steps_offset`` or ``sigma_schedule`` (``"discrete"``,
        ``"karras"``, ``"exponential"``, ``"beta"``); for an infinite sigma (a zero-terminal-SNR
        schedule, ``alphas_cumprod = 0`` at a grid timestep: diffusers' LMS scheduler has no
        such option) and for repeated sigmas (the Lagrange basis is then undefined).
    """
    grid = sigma_grid(schedule, num_steps, spacing=spacing, steps_offset=steps_offset,
                      sigma_schedule=sigma_schedule, final_sigmas_type="zero")
    if not np.isfinite(grid.sigmas).all():
        raise ValueError("the schedule's sigma is infinite at a grid timestep (alphas_cumprod = "
                         "0: zero terminal SNR); LMS needs finite sigmas")
    if np.any(np.diff(grid.sigmas) >= 0):
        raise ValueError(f"LMS needs strictly decreasing sigmas; the grid of num_steps={num_steps}"
                         f" has repeated ones: {grid.sigmas.tolist()}")
    return grid


def lms_coefficients(sigmas: np.ndarray, order: int = 4) -> np.ndarray:
    """The LMS coefficients of every step of a grid (module docstring), integrated exactly.

    Row ``i`` holds ``c_{i,j}`` for ``j < q_i = min(i + 1, order)`` (the weight of the derivative
    of step ``i - j``) and zeros after; ``order = 1`` gives ``sigma_{i+1} - sigma_i`` (Euler).

    >>> lms_coefficients(np.array([3.0, 2.0, 1.0, 0.0]), order=2)  # Adams-Bashforth 2 in sigma
    array([[-1. ,  0. ],
           [-1.5,  0.5],
           [-1.5,  0.5]])

    Args:
      sigmas: ``[N + 1]`` the grid's sigmas (float32 values, read as float64), strictly
        decreasing and finite.
      order: the method's order, an int ``>= 1``.

    Returns:
      ``[N, order]`` float64 numpy.

    Raises:
      ValueError: naming ``order`` or ``sigmas``.
    """
    order = check_int("order", order, 1)
    s = np.asarray(sigmas, np.float64)
    if s.ndim != 1 or s.shape[0] < 2:
        raise ValueError(f"sigmas must be a 1-D grid [N + 1] with N >= 1, got shape {s.shape}")
    if not np.isfinite(s).all() or np.any(np.diff(s) >= 0):
        raise ValueError(f"sigmas must be finite and strictly decreasing, got {s.tolist()}")
    n = s.shape[0] - 1
    out = np.zeros((n, order), np.float64)
    for i in range(n):
        nodes = s[i - np.arange(min(i + 1, order))] - s[i]  # shifted so that sigma_i is 0
        h = s[i + 1] - s[i]
        for j in range(nodes.shape[0]):
            others = np.delete(nodes, j)
            # prod_k (u - others_k), highest power first; its antiderivative vanishes at u = 0
            antiderivative = np.polyint(np.atleast_1d(np.poly(others)))
            out[i, j] = np.polyval(antiderivative, h) / np.prod(nodes[j] - others)
    return out


def lms_init(x: jax.Array, order: int = 4) -> LMSState:
    """The empty history for ``x: [B, ...]`` (zeros in ``x``'s dtype, at least float32)."""
    order = check_int("order", order, 1)
    dtype = jnp.promote_types(jnp.result_type(x), jnp.float32)
    return LMSState(jnp.zeros((order - 1, *jnp.shape(x)), dtype))


def lms_step(
    model_output: jax.Array,
    x: jax.Array,
    state: LMSState,
    sigma: jax.Array | float,
    coefficients: jax.Array,
    *,
    prediction_type: str = "eps",
) -> tuple[LMSState, jax.Array, jax.Array]:
    """One LMS step (``LMSDiscreteScheduler.step``): pure and jittable.

    Args:
      model_output: ``[B, ...]`` the model's output for ``scale_model_input(x, sigma)``.
      x: ``[B, ...]`` the sigma-space sample at ``sigma``.
      state: the history (:func:`lms_init` before the first step).
      sigma: scalar ``> 0``, this step's sigma.
      coefficients: ``[order]`` this step's row of :func:`lms_coefficients` (it already holds
        the step to the next sigma).
      prediction_type: ``"eps"``, ``"x0"`` or ``"v"`` (or diffusers' names).

    Returns:
      ``(state, x_next, pred_x0)``: the updated history, ``x_next [B, ...]`` and the predicted
      ``x0 [B, ...]``, both in ``x``'s dtype promoted to at least float32.

    Raises:
      ValueError: for a ``model_output`` not of ``x``'s shape, or a history whose length is not
        ``len(coefficients) - 1`` or whose samples are not of ``x``'s shape.
    """
    kind = canonical_prediction_type(prediction_type)
    if jnp.shape(model_output) != jnp.shape(x):
        raise ValueError(f"model_output must have x's shape {jnp.shape(x)}, got "
                         f"{jnp.shape(model_output)}")
    order = jnp.shape(coefficients)[0] if jnp.ndim(coefficients) == 1 else None
    want = (None if order is None else order - 1, *jnp.shape(x))
    if order is None or jnp.shape(state.derivatives) != want:
        raise ValueError(f"coefficients must be [order] with state.derivatives [order - 1, "
                         f"*x.shape]; got coefficients {jnp.shape(coefficients)}, "
                         f"state.derivatives {jnp.shape(state.derivatives)}, x {jnp.shape(x)}")
    dtype = jnp.promote_types(jnp.result_type(x), jnp.float32)
    x = jnp.asarray(x, dtype)
    sigma = jnp.asarray(sigma, jnp.float32)
    coefficients = jnp.asarray(coefficients, jnp.float32)
    pred_x0 = sigma_x0(jnp.asarray(model_output).astype(dtype), x, sigma, kind)
    derivative = (x - pred_x0) / sigma
    history = state.derivatives.astype(dtype)
    # diffusers' order: x + (((c_0 d_i) + c_1 d_{i-1}) + ...).
    total = coefficients[0] * derivative
    for j in range(1, order):
        total = total + coefficients[j] * history[j - 1]
    history = jnp.concatenate([derivative[None], history[:-1]]) if order > 1 else history
    return LMSState(history), x + total, pred_x0


def lms_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    x_T: jax.Array,
    key: jax.Array | None = None,
    *,
    num_steps: int,
    prediction_type: str = "eps",
    spacing: str = "linspace",
    steps_offset: int = 0,
    sigma_schedule: str = "discrete",
    order: int = 4,
    noise: jax.Array | None = None,
    return_trajectory: bool = False,
    strength: float = 1.0,
    after_step=None,
):
    """Sample with LMS (``LMSDiscreteScheduler``) in one ``lax.scan`` of ``num_steps`` model calls.

    Args:
      model_fn: ``model_fn(x_t [B, ...], t [B] float32) -> [B, ...]`` (eps, x0 or v).
      schedule: the (concrete) training schedule.
      x_T: ``[B, ...]`` STANDARD NORMAL noise; scaled by ``init_noise_sigma`` here.
      key: unused (deterministic); may be ``None``.
      num_steps: ``1 <= num_steps <= T``.
      prediction_type: ``"eps"``, ``"x0"`` or ``"v"`` (or diffusers' names).
      spacing, steps_offset, sigma_schedule: the grid (:func:`lms_timesteps`).
      order: the multistep order, an int ``>= 1`` (diffusers' ``step(..., order=4)``, which its
        pipelines leave at 4).
      noise: shape-checked (``[M, B, ...]``, ``M`` the steps that run) and unused.
      return_trajectory: also return ``(xs [M + 1, B, ...], pred_x0s [M, B, ...])``.
      strength: image-to-image strength in ``(0, 1]``: run the last ``int(num_steps *
        strength)`` steps only, from step ``s = num_steps - int(num_steps * strength)``, with an
        empty history (module docstring). With ``strength < 1``, ``x_T`` is the SIGMA-SPACE
        sample at ``sigmas[s]`` (``x0 + sigma noise``: :func:`jaxdiff.samplers.noise_to_img2img`),
        not scaled by ``init_noise_sigma``.
      after_step: optional ``(x_next, i) -> x_next`` applied to each step's output
        (:func:`jaxdiff.samplers.driver.run_scan`; 4-channel inpainting's blending).

    Returns:
      ``x_0 [B, ...]`` float32 (or wider), or ``(x_0, xs, pred_x0s)``.

    Raises:
      ValueError: naming the argument, for a bad grid or option, a mis-shaped ``noise`` or model
        output.
    """
    kind = canonical_prediction_type(prediction_type)
    grid = lms_timesteps(schedule, num_steps, spacing=spacing, steps_offset=steps_offset,
                         sigma_schedule=sigma_schedule)
    coefficients = jnp.asarray(lms_coefficients(grid.sigmas, order), jnp.float32)
    start = strength_start_step(num_steps, strength)
    x_T = prepare_x_T(x_T)
    if start == 0:
        x_T = x_T * init_noise_sigma(grid, spacing)
    model = checked_model(model_fn, x_T.shape)
    ts, sig = jnp.asarray(grid.timesteps), jnp.asarray(grid.sigmas)

    def body(state, x, i, z):
        out = model(scale_model_input(x, sig[i]), ts[i])
        return lms_step(out, x, state, sig[i], coefficients[i], prediction_type=kind)

    return run_scan(body, lms_init(x_T, order), x_T, key, num_steps, stochastic=False,
                    noise=noise, return_trajectory=return_trajectory, start_step=start,
                    after_step=after_step)


def _grid(schedule: Schedule, num_steps: int, *, strength: float = 1.0, spacing: str = "linspace",
          steps_offset: int = 0, sigma_schedule: str = "discrete", **_) -> Grid:
    return lms_timesteps(schedule, num_steps, spacing=spacing, steps_offset=steps_offset,
                         sigma_schedule=sigma_schedule)


LMS = SamplerSpec(
    name="lms",
    after_step=True,
    sample=lms_sample,
    grid=_grid,
    options=dict(prediction_type="eps", spacing="linspace", steps_offset=0,
                 sigma_schedule="discrete", order=4),
    noise_space="sigma_ve",
    stochastic=lambda o: False,
    diffusers=DiffusersTwin(
        "LMSDiscreteScheduler",
        # Its constructor: the schedule's keys but rescale_betas_zero_snr (which diffusers then
        # ignores, and so does the schedule import) and the k-diffusion family's options.
        defaults=dict(K_DIFFUSION_DEFAULTS),
        options=dict(K_DIFFUSION_OPTIONS,
                     sigma_schedule=lambda c: sigma_schedule_option(c, "LMSDiscreteScheduler")),
        schedule_keys=SCHEDULE_KEYS_NO_RESCALE,
    ),
)
SPECS = (LMS,)
