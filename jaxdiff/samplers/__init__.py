"""Samplers: one contract for all of them, one scan driver, one declared spec each, one registry.

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
- ``NAME_sample(model_fn, schedule, x_T, key, *, num_steps, **options, noise=None,
  return_trajectory=False, strength=1.0)``: the whole trajectory as one ``lax.scan`` on the
  shared driver (:mod:`jaxdiff.samplers.driver`). ``model_fn(x [B, ...], t [B] int32) -> [B,
  ...]``; ``x_T`` is carried in at least float32; ``key`` is required by stochastic samplers (step
  ``i`` draws from ``fold_in(key, i)``) unless ``noise [M, B, ...]`` is given (``M`` the steps
  that run), and may be ``None`` for deterministic ones, which accept ``noise`` too
  (shape-checked, unused); ``strength`` in ``(0, 1]`` is image-to-image, 1 text-to-image
  (:mod:`jaxdiff.samplers.img2img`); with ``return_trajectory`` the result is ``(x_0, xs [M + 1,
  B, ...], pred_x0s [M, B, ...])``;
- at its bottom, the sampler's :class:`SamplerSpec` (:mod:`jaxdiff.samplers.spec`): its name,
  sample and grid functions, options with their defaults, noise space, whether it is stochastic,
  its image-to-image mode, presets and diffusers twin. The registry
  (:mod:`jaxdiff.samplers.registry`: :func:`get_sampler`, :func:`sampler_names`; "one file plus
  one line" adds a sampler), image-to-image and the diffusers scheduler import / export
  (:mod:`jaxdiff.convert`) read the specs and nothing else.

The sigma-space samplers (Euler, Euler ancestral, Heun, KDPM2, LMS:
:mod:`jaxdiff.samplers.euler`) take a STANDARD NORMAL ``x_T`` (scaled by ``init_noise_sigma``
inside) and call ``model_fn`` at fractional float32 timesteps; the two-stage steps
(:func:`heun_step`, :func:`kdpm2_step`) take ``model_fn`` itself and make both model calls within
one scan step.

Image-to-image is the same two calls for every registered sampler::

    x = noise_to_img2img(sampler, schedule, N, x0, noise, strength)
    out = sampler(model_fn, schedule, x, key, num_steps=N, strength=strength)

EDM (:func:`edm_sample`, :mod:`jaxdiff.samplers.edm`) is a separate family, not in the registry:
its model is the raw EDM network (float ``c_noise``, preconditioned inputs) and it has no
``Schedule``, so a registry entry would feed the discrete-time models that every registry user
passes the wrong inputs. It shares the driver and the churn options' names (``s_churn``, ...).
Classifier-free guidance is a model-function transform (:func:`classifier_free_guidance`) that
works with every sampler.
"""

from jaxdiff.samplers.ddim import check_eta, ddim_sample, ddim_step
from jaxdiff.samplers.ddpm import VARIANCE_TYPES, ddpm_posterior, ddpm_sample, ddpm_step
from jaxdiff.samplers.deis import (
    DEISState,
    deis_coefficients,
    deis_init,
    deis_orders,
    deis_sample,
    deis_step,
    deis_timesteps,
)
from jaxdiff.samplers.dpm_solver import (
    DPM_ALGORITHM_TYPES,
    DPM_SIGMA_SCHEDULES,
    FINAL_SIGMAS_TYPES,
    SOLVER_TYPES,
    DPMSolverState,
    dpm_solver_init,
    dpm_solver_sample,
    dpm_solver_step,
    dpm_solver_timesteps,
)
from jaxdiff.samplers.dpm_solver_singlestep import (
    SINGLESTEP_ALGORITHM_TYPES,
    DPMSolverSinglestepState,
    SinglestepGrid,
    dpm_solver_singlestep_init,
    dpm_solver_singlestep_orders,
    dpm_solver_singlestep_sample,
    dpm_solver_singlestep_step,
    dpm_solver_singlestep_timesteps,
)
from jaxdiff.samplers.driver import strength_start_step
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
from jaxdiff.samplers.guidance import classifier_free_guidance, prompt_guidance, rescale_guidance
from jaxdiff.samplers.heun import heun_sample, heun_step, heun_timesteps
from jaxdiff.samplers.img2img import (
    check_strength,
    img2img_key,
    img2img_start_step,
    noise_to_img2img,
    sampler_grid,
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
from jaxdiff.samplers.tcd import tcd_sample, tcd_step, tcd_timesteps
from jaxdiff.samplers.lms import (
    LMSState,
    lms_coefficients,
    lms_init,
    lms_sample,
    lms_step,
    lms_timesteps,
)
from jaxdiff.samplers.pndm import (
    PNDMGrid,
    PNDMPlan,
    PNDMState,
    pndm_init,
    pndm_plan,
    pndm_sample,
    pndm_step,
    pndm_timesteps,
)
from jaxdiff.samplers.registry import (
    SAMPLER_MODULES,
    Sampler,
    diffusers_twins,
    get_sampler,
    register_sampler,
    sampler_names,
    sampler_options,
    sampler_spec,
    sampler_specs,
    unregister_sampler,
)
from jaxdiff.samplers.spec import DiffusersTwin, SamplerSpec
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
    "check_strength",
    "img2img_key",
    "img2img_start_step",
    "noise_to_img2img",
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
    "DiffusersTwin",
    "Grid",
    "SAMPLER_MODULES",
    "SamplerSpec",
    "SOLVER_TYPES",
    "SPACINGS",
    "Sampler",
    "VARIANCE_TYPES",
    "check_eta",
    "classifier_free_guidance",
    "prompt_guidance",
    "ddim_sample",
    "ddim_step",
    "ddim_timesteps",
    "ddpm_posterior",
    "ddpm_sample",
    "ddpm_step",
    "ddpm_timesteps",
    "DEISState",
    "deis_coefficients",
    "deis_init",
    "deis_orders",
    "deis_sample",
    "deis_step",
    "deis_timesteps",
    "diffusers_twins",
    "dpm_solver_init",
    "dpm_solver_sample",
    "dpm_solver_step",
    "dpm_solver_timesteps",
    "DPMSolverSinglestepState",
    "SINGLESTEP_ALGORITHM_TYPES",
    "SinglestepGrid",
    "dpm_solver_singlestep_init",
    "dpm_solver_singlestep_orders",
    "dpm_solver_singlestep_sample",
    "dpm_solver_singlestep_step",
    "dpm_solver_singlestep_timesteps",
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
    "tcd_sample",
    "tcd_step",
    "tcd_timesteps",
    "LMSState",
    "lms_coefficients",
    "lms_init",
    "lms_sample",
    "lms_step",
    "lms_timesteps",
    "PNDMGrid",
    "PNDMPlan",
    "PNDMState",
    "pndm_init",
    "pndm_plan",
    "pndm_sample",
    "pndm_step",
    "pndm_timesteps",
    "register_sampler",
    "rescale_guidance",
    "sampler_names",
    "sampler_options",
    "sampler_spec",
    "sampler_specs",
    "unregister_sampler",
    "UNIPC_SOLVER_TYPES",
    "UniPCState",
    "unipc_init",
    "unipc_orders",
    "unipc_sample",
    "unipc_step",
    "unipc_timesteps",
]
