"""Samplers: one contract for all of them, one scan driver, one registry.

The contract. Each sampler family ``NAME`` (one file) provides

- a grid function ``NAME_timesteps(schedule, num_steps, **options) -> Grid``: the timesteps,
  previous timesteps and sigmas, computed on the host (numpy) exactly as the diffusers scheduler
  computes them, so that the scan runs over static shapes;
- a step function ``NAME_step(...)``: one update, pure, jittable, usable on its own (the parity
  tests drive it step by step against diffusers). One-step samplers return ``(x_prev, pred_x0)``;
  multistep solvers take and return their history as an explicit state pytree (``(state, x_next,
  pred_x0)``, e.g. :class:`DPMSolverState`). A step that adds noise takes it as an argument
  (``[B, ...]`` standard normal) and raises if it is ``None``; a deterministic step (DDIM with
  ``eta = 0``) accepts ``None``;
- ``NAME_sample(model_fn, schedule, x_T, key, *, num_steps, ..., noise=None,
  return_trajectory=False)``: the whole trajectory as one ``lax.scan`` on the shared driver
  (:mod:`jaxdiff.samplers.driver`). ``model_fn(x [B, ...], t [B] int32) -> [B, ...]``; ``x_T`` is
  carried in at least float32; ``key`` is required by stochastic samplers (step ``i`` draws from
  ``fold_in(key, i)``) unless ``noise [num_steps, B, ...]`` is given, and may be ``None`` for
  deterministic ones; with ``return_trajectory`` the result is ``(x_0, xs [N + 1, B, ...],
  pred_x0s [N, B, ...])``.

The sigma-space samplers (Euler, Euler ancestral, Heun, KDPM2: :mod:`jaxdiff.samplers.euler`)
take a STANDARD NORMAL ``x_T`` (scaled by ``init_noise_sigma`` inside) and call ``model_fn`` at
fractional float32 timesteps; the two-stage steps (:func:`heun_step`, :func:`kdpm2_step`) take
``model_fn`` itself and make both model calls within one scan step.

Every sampler is reachable by name through :func:`get_sampler` (the registry), which the
experiments' ``--sampler`` flags use; the exception is EDM (:func:`edm_sample`), whose
raw-network model contract and sigma grid have no ``Schedule`` (see :mod:`jaxdiff.samplers.edm`).
Image-to-image: every registered sampler but LCM (DDIM, DDPM, DPM-Solver, UniPC, Euler, Euler
ancestral, Heun, KDPM2 and their presets) takes ``start_step=s`` (a call
argument, also through :class:`Sampler`) and runs only steps ``s .. N - 1`` of its grid, from a
sample noised to step ``s`` (:mod:`jaxdiff.samplers.img2img`: ``strength_start_step``,
``noise_to_start``); LCM takes ``strength`` instead (its grid depends on it, as in diffusers'
``LatentConsistencyModelImg2ImgPipeline``). ``img2img_kwargs`` / ``noise_to_img2img`` serve
all of them (``IMG2IMG_SAMPLERS``).
Classifier-free guidance is a model-function transform (:func:`classifier_free_guidance`) that
works with every sampler.
"""

from jaxdiff.samplers.ddim import check_eta, ddim_sample, ddim_step
from jaxdiff.samplers.ddpm import VARIANCE_TYPES, ddpm_posterior, ddpm_sample, ddpm_step
from jaxdiff.samplers.dpm_solver import (
    DPM_ALGORITHM_TYPES,
    DPM_SIGMA_SCHEDULES,
    FINAL_SIGMAS_TYPES,
    SOLVER_TYPES,
    DPMSolverState,
    dpm_solver_init,
    dpm_solver_options_from_diffusers,
    dpm_solver_sample,
    dpm_solver_step,
    dpm_solver_timesteps,
)
from jaxdiff.samplers.edm import (
    EDM_SIGMA_SCHEDULES,
    EDM_SOLVERS,
    edm_churn,
    edm_sample,
    edm_sigmas,
    edm_step,
)
from jaxdiff.samplers.euler import (
    churn_gammas,
    euler_ancestral_sample,
    euler_ancestral_step,
    euler_sample,
    euler_step,
    euler_timesteps,
    sigma_x0,
)
from jaxdiff.samplers.guidance import classifier_free_guidance, rescale_guidance
from jaxdiff.samplers.heun import heun_sample, heun_step, heun_timesteps
from jaxdiff.samplers.img2img import (
    IMG2IMG_SAMPLERS,
    img2img_kwargs,
    noise_to_img2img,
    noise_to_start,
    sampler_grid,
    strength_start_step,
)
from jaxdiff.samplers.kdpm2 import (
    KDPM2Grid,
    kdpm2_ancestral_sample,
    kdpm2_sample,
    kdpm2_step,
    kdpm2_timesteps,
)
from jaxdiff.samplers.lcm import (
    lcm_min_strength,
    lcm_sample,
    lcm_scalings,
    lcm_step,
    lcm_timesteps,
)
from jaxdiff.samplers.registry import (
    SAMPLERS,
    Sampler,
    get_sampler,
    sampler_names,
    sampler_options,
)
from jaxdiff.samplers.timesteps import SPACINGS, Grid, ddim_timesteps, ddpm_timesteps
from jaxdiff.samplers.unipc import (
    UNIPC_SOLVER_TYPES,
    UniPCState,
    unipc_init,
    unipc_orders,
    unipc_sample,
    unipc_step,
    unipc_timesteps,
)

__all__ = [
    "churn_gammas",
    "euler_ancestral_sample",
    "euler_ancestral_step",
    "euler_sample",
    "euler_step",
    "euler_timesteps",
    "sigma_x0",
    "heun_sample",
    "heun_step",
    "heun_timesteps",
    "IMG2IMG_SAMPLERS",
    "img2img_kwargs",
    "noise_to_img2img",
    "noise_to_start",
    "sampler_grid",
    "strength_start_step",
    "KDPM2Grid",
    "kdpm2_ancestral_sample",
    "kdpm2_sample",
    "kdpm2_step",
    "kdpm2_timesteps",
    "DPMSolverState",
    "DPM_ALGORITHM_TYPES",
    "DPM_SIGMA_SCHEDULES",
    "EDM_SIGMA_SCHEDULES",
    "EDM_SOLVERS",
    "FINAL_SIGMAS_TYPES",
    "Grid",
    "SAMPLERS",
    "SOLVER_TYPES",
    "SPACINGS",
    "Sampler",
    "VARIANCE_TYPES",
    "check_eta",
    "classifier_free_guidance",
    "ddim_sample",
    "ddim_step",
    "ddim_timesteps",
    "ddpm_posterior",
    "ddpm_sample",
    "ddpm_step",
    "ddpm_timesteps",
    "dpm_solver_init",
    "dpm_solver_options_from_diffusers",
    "dpm_solver_sample",
    "dpm_solver_step",
    "dpm_solver_timesteps",
    "edm_churn",
    "edm_sample",
    "edm_sigmas",
    "edm_step",
    "get_sampler",
    "lcm_min_strength",
    "lcm_sample",
    "lcm_scalings",
    "lcm_step",
    "lcm_timesteps",
    "rescale_guidance",
    "sampler_names",
    "sampler_options",
    "UNIPC_SOLVER_TYPES",
    "UniPCState",
    "unipc_init",
    "unipc_orders",
    "unipc_sample",
    "unipc_step",
    "unipc_timesteps",
]
